"""The demo's summary: ``DIR/report.md``, ``DIR/report.html``, ``DIR/demo.json`` and the printed table.

Sections: the verdict against the demo's quality targets (default plan), time per stage,
Table 1 (AUC per finding and mean, with patient-bootstrap 95% CIs), Table 2 (box accuracy at
IoU T = 0.1..0.7 with the cross-validated CAM threshold), with ``--ablation`` the four rows
side by side (Table 1 and Table 3 layouts) and their differences from the full DLRV, then
where to look. The paper's numbers (METHOD.md) are shown labelled as the paper's: they are
for DenseNet-121 on the real ChestX-ray14, not for this synthetic task.

The ablation rows and their paired differences from the full DLRV come from
:mod:`cxrloc.evaluate.compare` (what ``cxrloc compare`` writes), on the four evaluate folders.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrloc.evaluate.compare import (
    DEFAULT_RESAMPLES,
    LOC_TS,
    TABLE3_TS,
    Comparison,
    compare_runs,
    headline,
    load_runs,
)
from cxrloc.evaluate.compare_report import comparison_sections
from cxrloc.evaluate.report import (
    PAPER_AUC_DLRV,
    PAPER_LOC_MEAN,
    PAPER_MEAN_AUC,
    _ci,
    _f,
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
VARIANT_LABEL = {"baseline": "Baseline (BCE only)", "dlrv_no_rv": "DLRV w/o RV", "dlrv_no_dl": "DLRV w/o DL",
                 "dlrv": "DLRV (full)"}


def write_demo_report(result: DemoResult) -> dict[str, Path]:
    """Write DIR/report.md, DIR/report.html and DIR/demo.json; return their paths."""
    out = result.out
    comparison = ablation_comparison(result) if len(result.variants) > 1 else None
    sections = demo_sections(result, comparison)
    figures = _figures(result)
    paths = {"report_md": out / "report.md", "report_html": out / "report.html", "json": out / "demo.json"}
    md = render_markdown(sections, {})
    md += "\n" + "\n".join(f"## {title}\n\n![{title}]({path.relative_to(out).as_posix()})\n" for title, path in figures)
    atomic_write_text(paths["report_md"], md)
    html = render_html(sections, {title.replace(" ", "_"): path for title, path in figures}, title="cxrloc demo")
    atomic_write_text(paths["report_html"], html)
    atomic_write_json(paths["json"], summary_dict(result, comparison))
    return paths


def summary_dict(result: DemoResult, comparison: Comparison | None) -> dict[str, Any]:
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
        "differences_from_dlrv": {v: {k: d.to_dict() for k, d in dd.items()}
                                  for v, dd in (comparison.differences if comparison else {}).items()},
        "overlays": [str(p) for p in result.overlays],
    }


def targets(result: DemoResult) -> dict[str, Any]:
    """The default demo's targets (mean AUC >= 0.90, mean box accuracy at T=0.3 >= 0.5) and whether they are met."""
    h = headline(result.metrics["dlrv"])
    loc = h["box_accuracy_mean"].get("0.3")
    return {"mean_auc": {"target": TARGET_MEAN_AUC, "value": h["mean_auc"], "met": h["mean_auc"] >= TARGET_MEAN_AUC},
            "box_accuracy_t0.3": {"target": TARGET_LOC_T03, "value": loc, "met": loc is not None and loc >= TARGET_LOC_T03}}


# --------------------------------------------------------------------------- sections


def _precision_lines(result: DemoResult) -> list[str]:
    """Which precision each training ran in and why (``train.precision: auto`` follows the CPU)."""
    lines = []
    for stage in result.stages:
        p = stage.info.get("precision") if stage.name.startswith("train") else None
        if p:
            lines.append(f"`{stage.name}` trained in {p['used']}: {p['reason']}.")
    return lines


def demo_sections(result: DemoResult, comparison: Comparison | None) -> list[dict[str, Any]]:
    """The report as sections of text and tables (rendered by :mod:`cxrloc.evaluate.report`)."""
    m = result.machine
    h = headline(result.metrics["dlrv"])
    intro = [
        f"Plan `{result.plan.name}`: {result.plan.images} synthetic images of {result.plan.size} px "
        f"(`cxrloc synth --seed {result.seed} --difficulty {result.difficulty}`), config `{result.plan.config}`; "
        f"total {result.seconds:.0f} s on {m['cpu']} ({m.get('cpu_summary', '?')}; {m['cores']} cores, {result.threads} torch thread(s); "
        f"1-minute load average {result.load_before:.1f} at the start).",
        f"**DLRV: mean AUC {h['mean_auc']:.3f} [{h['mean_auc_ci'][0]:.3f}, {h['mean_auc_ci'][1]:.3f}]; mean box accuracy "
        + ", ".join(f"T={t}: {_f(h['box_accuracy_mean'].get(t), 2)}" for t in TABLE3_TS) + "**, "
        "learned from image-level labels only.",
        *_precision_lines(result),
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
    if comparison is not None:
        sections.extend(comparison_sections(comparison, labels=VARIANT_LABEL, notes=[ABLATION_BUDGET]))
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


# --------------------------------------------------------------------------- the ablation


ABLATION_BUDGET = (
    "All four rows have the same budget: the same data, image size, backbone, epochs, learning-rate schedule, "
    "anchors per step and seed; only the loss terms of eq. 9 differ (the rows without distance learning send "
    "one image per anchor through the backbone instead of three, so they train faster)."
)


def ablation_comparison(result: DemoResult, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Comparison:
    """Every variant minus the full DLRV (mean AUC, box accuracy at T = 0.1/0.3/0.5/0.7), paired bootstrap."""
    from cxrloc.data.cache import Cache

    runs = load_runs([result.out / "evaluate" / v for v in result.variants], names=result.variants)
    return compare_runs(runs, Cache(result.out / "cache").boxes, reference="dlrv", resamples=resamples, seed=seed)


def summary_text(result: DemoResult) -> str:
    """The summary for the terminal: report.md without its figures (the same numbers)."""
    text = (result.out / "report.md").read_text()
    cut = text.find("\n## Figure 3 style")
    if cut < 0:
        cut = text.find("\n## predict overlay")
    return text[: cut if cut > 0 else None].rstrip()
