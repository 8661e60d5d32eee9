"""The demo's summary: ``DIR/report.md``, ``DIR/report.html``, ``DIR/demo.json`` and the printed table.

Sections: the verdict against the demo's quality targets (default plan), time per stage,
Table 1 (AUC per finding and mean, with patient-bootstrap 95% CIs), Table 2 (box accuracy at
IoU T = 0.1..0.7 with the cross-validated CAM threshold), with ``--ablation`` the four rows
side by side (Table 1 and Table 3 layouts) and their differences from the full DLRV, then
where to look. The paper's numbers (METHOD.md) are shown labelled as the paper's: they are
for DenseNet-121 on the real ChestX-ray14, not for this synthetic task.

Noise in the ablation (ours): a difference is computed *paired*, on the same bootstrap
resamples for both models. AUC: the patient-level resamples of
:func:`cxrloc.evaluate.auc.bootstrap_auc` (same seed and split, so the same patients are drawn
for both); box accuracy: resamples of the box images. A difference whose 95% interval holds 0
is reported as "within noise"; the report also says whether the two models' own intervals
overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrloc.evaluate.report import (
    PAPER_AUC_DLRV,
    PAPER_LOC_MEAN,
    PAPER_MEAN_AUC,
    render_html,
    render_markdown,
)
from cxrloc.fileio import atomic_write_json, atomic_write_text
from cxrloc.labels import BOX_FINDINGS, FINDINGS, SHORT_NAMES

if TYPE_CHECKING:
    from cxrloc.demo import DemoResult

#: quality targets of the default demo (issue 8): mean AUC and mean box accuracy at T = 0.3
TARGET_MEAN_AUC = 0.90
TARGET_LOC_T03 = 0.5
LOC_TS = ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7")
TABLE3_TS = ("0.1", "0.3", "0.5", "0.7")
VARIANT_LABEL = {"baseline": "Baseline (BCE only)", "dlrv_no_rv": "DLRV w/o RV", "dlrv_no_dl": "DLRV w/o DL",
                 "dlrv": "DLRV (full)"}
PAPER_ROW = {"baseline": "DenseNet-121 baseline", "dlrv_no_rv": "DLRV w/o RV", "dlrv_no_dl": "DLRV w/o DL",
             "dlrv": "DLRV"}
DIFF_RESAMPLES = 1000


@dataclass
class Difference:
    """A paired difference (variant minus full DLRV) with its bootstrap 95% interval."""

    value: float
    low: float
    high: float
    intervals_overlap: bool

    @property
    def within_noise(self) -> bool:
        return self.low <= 0.0 <= self.high


def write_demo_report(result: DemoResult) -> dict[str, Path]:
    """Write DIR/report.md, DIR/report.html and DIR/demo.json; return their paths."""
    out = result.out
    diffs = ablation_differences(result) if len(result.variants) > 1 else {}
    sections = demo_sections(result, diffs)
    figures = _figures(result)
    paths = {"report_md": out / "report.md", "report_html": out / "report.html", "json": out / "demo.json"}
    md = render_markdown(sections, {})
    md += "\n" + "\n".join(f"## {title}\n\n![{title}]({path.relative_to(out).as_posix()})\n" for title, path in figures)
    atomic_write_text(paths["report_md"], md)
    html = render_html(sections, {title.replace(" ", "_"): path for title, path in figures})
    atomic_write_text(paths["report_html"], html.replace("<title>cxrloc evaluation</title>", "<title>cxrloc demo</title>"))
    atomic_write_json(paths["json"], summary_dict(result, diffs))
    return paths


def summary_dict(result: DemoResult, diffs: dict[str, dict[str, Difference]]) -> dict[str, Any]:
    """Everything the report shows, as plain JSON."""
    from cxrloc.demo import plan_dict

    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "plan": plan_dict(result.plan), "seed": result.seed, "difficulty": result.difficulty,
        "threads": result.threads, "load_average_before": result.load_before, "seconds_total": result.seconds,
        "machine": result.machine,
        "stages": [{"name": s.name, "folder": str(s.folder), "status": s.status, "seconds": s.seconds,
                    "seconds_original": s.seconds_original, "info": s.info} for s in result.stages],
        "results": {v: headline(m) for v, m in result.metrics.items()},
        "targets": targets(result) if result.plan.name == "default" else None,
        "differences_from_dlrv": {v: {k: d.__dict__ | {"within_noise": d.within_noise} for k, d in dd.items()}
                                  for v, dd in diffs.items()},
        "overlays": [str(p) for p in result.overlays],
    }


def headline(m: dict[str, Any]) -> dict[str, Any]:
    """Mean AUC (+ CI), per-finding AUC and mean box accuracy per T of one evaluate metrics.json."""
    cls = m["classification"]
    loc = m.get("localization", {})
    table = (loc.get("cross_validated") or loc.get("fixed") or {}).get("iou", {}) if loc.get("available") else {}
    return {
        "mean_auc": cls["mean_auc"], "mean_auc_ci": [cls["mean_ci_low"], cls["mean_ci_high"]],
        "auc": {f: cls["per_finding"][f]["auc"] for f in FINDINGS},
        "box_accuracy_mean": {t: table.get("Mean", {}).get(t) for t in LOC_TS},
        "box_accuracy": {f: {t: table.get(f, {}).get(t) for t in LOC_TS} for f in BOX_FINDINGS if f in table},
        "boxes": loc.get("num_boxes", 0),
    }


def targets(result: DemoResult) -> dict[str, Any]:
    """The default demo's targets (mean AUC >= 0.90, mean box accuracy at T=0.3 >= 0.5) and whether they are met."""
    h = headline(result.metrics["dlrv"])
    loc = h["box_accuracy_mean"].get("0.3")
    return {"mean_auc": {"target": TARGET_MEAN_AUC, "value": h["mean_auc"], "met": h["mean_auc"] >= TARGET_MEAN_AUC},
            "box_accuracy_t0.3": {"target": TARGET_LOC_T03, "value": loc, "met": loc is not None and loc >= TARGET_LOC_T03}}


# --------------------------------------------------------------------------- sections


def demo_sections(result: DemoResult, diffs: dict[str, dict[str, Difference]]) -> list[dict[str, Any]]:
    """The report as sections of text and tables (rendered by :mod:`cxrloc.evaluate.report`)."""
    m = result.machine
    h = headline(result.metrics["dlrv"])
    intro = [
        f"Plan `{result.plan.name}`: {result.plan.images} synthetic images of {result.plan.size} px "
        f"(`cxrloc synth --seed {result.seed} --difficulty {result.difficulty}`), config `{result.plan.config}`; "
        f"total {result.seconds:.0f} s on {m['cpu']} ({m['cores']} cores, {result.threads} torch thread(s); "
        f"1-minute load average {result.load_before:.1f} at the start).",
        f"**DLRV: mean AUC {h['mean_auc']:.3f} [{h['mean_auc_ci'][0]:.3f}, {h['mean_auc_ci'][1]:.3f}]; mean box accuracy "
        + ", ".join(f"T={t}: {_f(h['box_accuracy_mean'].get(t), 2)}" for t in TABLE3_TS) + "**, "
        "learned from image-level labels only.",
        "The paper's numbers, where shown, are the paper's (DenseNet-121 on the real ChestX-ray14), "
        "not comparable with this synthetic task; they give the scale.",
    ]
    if result.plan.name == "default":
        t = targets(result)
        intro.append("Targets of the default demo: mean AUC >= 0.90 "
                      f"({'met' if t['mean_auc']['met'] else 'NOT met'}), mean box accuracy at T=0.3 >= 0.5 "
                      f"({'met' if t['box_accuracy_t0.3']['met'] else 'NOT met'}).")
    sections: list[dict[str, Any]] = [{"title": "cxrloc demo", "text": intro}]
    sections.append({
        "title": "Time per stage", "text": ["`reused`: finished by an earlier run with the same arguments (its time then in parentheses)."],
        "header": ["Stage", "Status", "Seconds", "Output"],
        "rows": [[s.name, s.status, f"{s.seconds:.1f}" if s.status != "reused" else f"0 ({s.seconds_original:.1f})",
                  f"`{s.folder.relative_to(result.out).as_posix()}/`"] for s in result.stages]
        + [["**total**", "", f"{result.seconds:.1f}", ""]],
    })
    sections.append(_auc_section(result))
    sections.append(_loc_section(result))
    if len(result.variants) > 1:
        sections.extend(_ablation_sections(result, diffs))
    sections.append(_where_section(result))
    return sections


def _auc_section(result: DemoResult) -> dict[str, Any]:
    cls = result.metrics["dlrv"]["classification"]
    rows = [[name, _f(cls["per_finding"][name]["auc"], 3), _ci(cls["per_finding"][name]["ci_low"], cls["per_finding"][name]["ci_high"]),
             str(cls["per_finding"][name]["n_pos"]), _f(PAPER_AUC_DLRV[name], 3)] for name in FINDINGS]
    rows.append(["**Mean**", _f(cls["mean_auc"], 3), _ci(cls["mean_ci_low"], cls["mean_ci_high"]), "",
                 _f(PAPER_MEAN_AUC["DLRV"], 3)])
    boot = cls["bootstrap"]
    return {"title": "Table 1: ROC AUC per finding (DLRV, synthetic test split)",
            "text": [f"95% CI: percentile interval over {boot['resamples']} patient-level bootstrap resamples."],
            "header": ["Finding", "AUC", "95% CI", "test positives", "paper's DLRV (real data)"], "rows": rows}


def _loc_section(result: DemoResult) -> dict[str, Any]:
    loc = result.metrics["dlrv"].get("localization", {})
    if not loc.get("available"):
        return {"title": "Table 2: box accuracy", "text": [f"Not computed: {loc.get('reason', 'no boxes')}."]}
    cv = loc.get("cross_validated")
    table = (cv or loc["fixed"])["iou"]
    how = (f"CAM threshold chosen by {cv['folds']}-fold cross-validation over the box images "
           f"(chosen: {', '.join(f'{t:g}' for t in cv['chosen_thresholds'])})") if cv else \
        f"fixed CAM threshold {loc['fixed']['cam_threshold']:g}"
    rows = [[SHORT_NAMES.get(f, f)] + [_f(table[f].get(t), 2) for t in LOC_TS] + [str(table["n"].get(f, 0))]
            for f in BOX_FINDINGS if f in table]
    rows.append(["**Mean**"] + [_f(table["Mean"].get(t), 2) for t in LOC_TS] + [str(table["n"].get("Mean", ""))])
    rows.append(["paper's DLRV mean (real data)"] + [_f(PAPER_LOC_MEAN["DLRV"].get(float(t)), 2) for t in LOC_TS] + [""])
    base = loc["baseline_centered"]["iou"]["Mean"]
    rows.append([f"centred box, {loc['baseline_centered']['fraction']:g} of the image (no model)"]
                + [_f(base.get(t), 2) for t in LOC_TS] + [""])
    return {"title": "Table 2: box accuracy (IoU > T) per finding",
            "text": [f"{loc['num_boxes']} ground-truth boxes on {loc['num_box_images']} test images; box = "
                     f"`{loc['box_mode']}` of the eq. 11 map of the true finding"
                     + (" (averaged with the mirrored image's map: `eval.hflip_tta`)" if loc.get("hflip_tta") else "")
                     + f"; {how}."],
            "header": ["Finding"] + [f"T={t}" for t in LOC_TS] + ["boxes"], "rows": rows}


def _ablation_sections(result: DemoResult, diffs: dict[str, dict[str, Difference]]) -> list[dict[str, Any]]:
    variants = result.variants
    heads = {v: headline(result.metrics[v]) for v in variants}
    t1 = [[VARIANT_LABEL[v]] + [_f(heads[v]["auc"][f], 3) for f in FINDINGS] + [_f(heads[v]["mean_auc"], 3),
                                                                               _ci(*heads[v]["mean_auc_ci"])]
          for v in variants]
    t1 += [[f"paper: {PAPER_ROW[v]}"] + [_f(PAPER_AUC_DLRV[f], 3) if v == "dlrv" else "" for f in FINDINGS]
           + [_f(PAPER_MEAN_AUC[PAPER_ROW[v]], 3), ""] for v in variants]
    t3 = [[VARIANT_LABEL[v]] + [_f(heads[v]["box_accuracy_mean"].get(t), 2) for t in TABLE3_TS] for v in variants]
    t3 += [[f"paper: {PAPER_ROW[v]}"] + [_f(PAPER_LOC_MEAN[PAPER_ROW[v]].get(float(t)), 2) for t in TABLE3_TS]
           for v in variants if PAPER_ROW[v] in PAPER_LOC_MEAN]
    d_rows = []
    for v in variants:
        if v == "dlrv":
            continue
        cells = [VARIANT_LABEL[v]]
        for key in ("auc", *(f"loc@{t}" for t in TABLE3_TS)):
            d = diffs[v][key]
            cells.append(f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] " + ("within noise" if d.within_noise else
                                                                            ("worse" if d.high < 0 else "better")))
        d_rows.append(cells)
    noise_text = [
        "Each cell: variant minus full DLRV, paired 95% bootstrap interval (the same resamples for both models: "
        f"{DIFF_RESAMPLES} patient resamples for AUC, {DIFF_RESAMPLES} box-image resamples for box accuracy). "
        "**within noise** = the interval holds 0: this run cannot tell the two apart.",
        "All four rows have the same budget: the same data, image size, backbone, epochs, learning-rate schedule, "
        "anchors per step and seed; only the loss terms of eq. 9 differ (the rows without distance learning send "
        "one image per anchor through the backbone instead of three, so they train faster).",
    ]
    overl = [f"{VARIANT_LABEL[v]}: mean-AUC intervals {'overlap' if diffs[v]['auc'].intervals_overlap else 'do not overlap'}"
             for v in variants if v != "dlrv"]
    if overl:
        noise_text.append("Unpaired view: " + "; ".join(overl) + ".")
    return [
        {"title": "Ablation, Table 1 layout: AUC per finding", "text": [],
         "header": ["Method"] + [SHORT_NAMES.get(f, f) for f in FINDINGS] + ["Mean", "95% CI"], "rows": t1},
        {"title": "Ablation, Table 3 layout: mean box accuracy at IoU > T", "text": [],
         "header": ["Method"] + [f"T={t}" for t in TABLE3_TS], "rows": t3},
        {"title": "Differences from the full DLRV (is it noise?)", "text": noise_text,
         "header": ["Variant", "mean AUC"] + [f"box acc T={t}" for t in TABLE3_TS], "rows": d_rows},
    ]


def _where_section(result: DemoResult) -> dict[str, Any]:
    rel = lambda p: f"`{Path(p).relative_to(result.out).as_posix()}`"  # noqa: E731
    rows = [
        ["full evaluation report (tables beside the paper's, ROC curves, accuracy vs T)", rel(result.out / "evaluate/dlrv/report.html")],
        ["Figure-3 style panel: image, heatmap, predicted (red) and true (green) box", rel(result.out / "evaluate/dlrv/examples.png")],
        ["every number (JSON)", rel(result.out / "evaluate/dlrv/metrics.json")],
        ["`cxrloc predict` overlays and JSON of a few test images", rel(result.out / "predict/")],
        ["training history per epoch, checkpoints", rel(result.out / "train/dlrv/summary.json") + ", " + rel(result.out / "train/dlrv/checkpoints/")],
        ["training curves: `tensorboard --logdir " + (result.out / "train").as_posix() + "`", rel(result.out / "train/dlrv/logs/")],
        ["the synthetic dataset (ChestX-ray14 layout, true boxes in synth_truth_boxes.csv)", rel(result.out / "synth/")],
        ["this summary as JSON", rel(result.out / "demo.json")],
    ]
    return {"title": "Where to look", "text": [], "header": ["What", "Where (under the demo folder)"], "rows": rows}


def _figures(result: DemoResult) -> list[tuple[str, Path]]:
    figs = []
    panel = result.out / "evaluate" / "dlrv" / "examples.png"
    if panel.is_file():
        figs.append(("Figure 3 style examples", panel))
    figs += [(f"predict overlay {p.stem}", p) for p in result.overlays if p.is_file()]
    return figs


# --------------------------------------------------------------------------- paired differences


def ablation_differences(result: DemoResult, resamples: int = DIFF_RESAMPLES, seed: int = 0) -> dict[str, dict[str, Difference]]:
    """Variant minus full DLRV for mean AUC and mean box accuracy at T = 0.1/0.3/0.5/0.7, paired bootstrap."""
    from cxrloc.config import Config
    from cxrloc.data.cache import Cache
    from cxrloc.evaluate.auc import bootstrap_auc
    from cxrloc.evaluate.runner import Predictions
    from cxrloc.evaluate.scoring import evaluate_predictions

    cache = Cache(result.out / "cache")
    auc_samples: dict[str, np.ndarray] = {}
    correct: dict[str, np.ndarray] = {}  # (n_boxes, len(TABLE3_TS)) 0/1 with the out-of-fold CAM threshold
    box_findings = box_images = None
    for v in result.variants:
        preds = Predictions.load(result.out / "evaluate" / v / "predictions.npz")
        auc = bootstrap_auc(preds.labels, preds.probs, preds.patient_ids, n_resamples=resamples, seed=seed,
                            keep_samples=True)
        auc_samples[v] = np.nanmean(np.where(auc.defined[None, :], auc.samples, np.nan), axis=1)
        eval_cfg = Config.from_dict({"eval": {**result.metrics[v]["config"].get("eval", {}), "bootstrap": 0}}).eval
        ev = evaluate_predictions(preds, cache.boxes, eval_cfg, progress=False)
        if ev.box_scores is not None:
            values = ev.cv.oof_iou if ev.cv is not None else ev.box_scores.iou[:, ev.box_scores.column(eval_cfg.map_threshold)]
            correct[v] = (values[:, None] > np.array([float(t) for t in TABLE3_TS])[None, :]).astype(np.float64)
            box_findings, box_images = ev.box_scores.findings.astype(str), ev.box_scores.image_ids.astype(str)
    rng = np.random.default_rng(seed)
    weights = None
    if box_images is not None:
        _, img = np.unique(box_images, return_inverse=True)
        counts = rng.multinomial(img.max() + 1, np.full(img.max() + 1, 1.0 / (img.max() + 1)), size=resamples)
        weights = counts[:, img].astype(np.float64)  # (B, n_boxes)
        names, fidx = np.unique(box_findings, return_inverse=True)
    out: dict[str, dict[str, Difference]] = {}
    for v in result.variants:
        if v == "dlrv":
            continue
        d: dict[str, Difference] = {}
        diff = auc_samples[v] - auc_samples["dlrv"]
        ha, hd = headline(result.metrics[v]), headline(result.metrics["dlrv"])
        overlap = ha["mean_auc_ci"][0] <= hd["mean_auc_ci"][1] and hd["mean_auc_ci"][0] <= ha["mean_auc_ci"][1]
        d["auc"] = _difference(ha["mean_auc"] - hd["mean_auc"], diff, overlap)
        for j, t in enumerate(TABLE3_TS):
            if weights is None or v not in correct or "dlrv" not in correct:
                d[f"loc@{t}"] = Difference(float("nan"), float("nan"), float("nan"), True)
                continue
            point = _mean_of_findings(correct[v][:, j], correct["dlrv"][:, j], np.ones((1, len(fidx))), fidx, len(names))[0]
            samples = _mean_of_findings(correct[v][:, j], correct["dlrv"][:, j], weights, fidx, len(names))
            d[f"loc@{t}"] = _difference(float(point), samples, overlap=True)
        out[v] = d
    return out


def _mean_of_findings(a: np.ndarray, b: np.ndarray, w: np.ndarray, fidx: np.ndarray, n_findings: int) -> np.ndarray:
    """Per resample: mean over findings of the weighted accuracy of ``a`` minus that of ``b``; (B,)."""
    onehot = np.eye(n_findings)[fidx]  # (n, F)
    n = w @ onehot  # (B, F) weighted box counts per finding
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_a = (w * a) @ onehot / n
        acc_b = (w * b) @ onehot / n
    return np.nanmean(acc_a - acc_b, axis=1)


def _difference(point: float, samples: np.ndarray, overlap: bool) -> Difference:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return Difference(point, float("nan"), float("nan"), overlap)
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return Difference(float(point), float(lo), float(hi), overlap)


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _ci(lo: float | None, hi: float | None) -> str:
    return "n/a" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def summary_text(result: DemoResult) -> str:
    """The summary for the terminal: report.md without its figures (the same numbers)."""
    text = (result.out / "report.md").read_text()
    cut = text.find("\n## Figure 3 style")
    if cut < 0:
        cut = text.find("\n## predict overlay")
    return text[: cut if cut > 0 else None].rstrip()
