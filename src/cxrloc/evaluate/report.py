"""Evaluation outputs: metrics.json, report.md, report.html and figures, beside the paper's numbers.

Files written to the output folder:
    metrics.json                every number, the config, the checkpoint identity, the paper's numbers
    report.md / report.html     Table 1 (AUC, 95% CI) and Table 2 (accuracy at T) with the paper's values
    roc_curves.png              ROC curve per finding
    localization_accuracy.png   accuracy against T per finding (cross-validated CAM threshold)
    examples.png                Figure-3 style: image | heatmap overlay with predicted (red) and
                                true (green) box, finding, probability and IoU

The paper's numbers are those of METHOD.md (Zhang et al., BMVC 2020, Tables 1-3); the row
compared with is chosen from the checkpoint's variant (full DLRV, w/o DL, w/o RV, baseline).
Plots use Matplotlib's object API with the Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_curve

from cxrloc import __version__
from cxrloc.evaluate.boxes import scale_boxes, upsample_map
from cxrloc.evaluate.runner import Predictions
from cxrloc.evaluate.scoring import Evaluation, dict_to_table
from cxrloc.fileio import atomic_write_json, atomic_write_text, atomic_write_with
from cxrloc.labels import BOX_FINDINGS, FINDINGS, SHORT_NAMES

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the paper's numbers (METHOD.md)

PAPER_AUC_DLRV: dict[str, float] = dict(zip(FINDINGS, (
    0.845, 0.905, 0.877, 0.817, 0.859, 0.824, 0.804, 0.871, 0.810, 0.862, 0.896, 0.849, 0.829, 0.927), strict=True))
PAPER_MEAN_AUC: dict[str, float] = {
    "Wang et al. 2017": 0.745, "DenseNet-121 baseline": 0.789, "Li et al.": 0.81, "CIA-Net": 0.83,
    "DLRV": 0.855, "DLRV w/o RV": 0.798, "DLRV w/o DL": 0.833, "DLRV random mining": 0.840,
}
#: Table 2 / Table 3: mean localization accuracy at T = 0.1 / 0.3 / 0.5 / 0.7
PAPER_LOC_MEAN: dict[str, dict[float, float]] = {
    "Wang et al. 2017": {0.1: 0.57, 0.3: 0.22, 0.5: 0.06, 0.7: 0.01},
    "Li et al. (box supervision)": {0.1: 0.73, 0.3: 0.50, 0.5: 0.27, 0.7: 0.12},
    "CIA-Net": {0.1: 0.60, 0.3: 0.38, 0.5: 0.24, 0.7: 0.13},
    "DLRV": {0.1: 0.65, 0.3: 0.50, 0.5: 0.27, 0.7: 0.13},
    "DLRV w/o DL": {0.1: 0.62, 0.3: 0.49, 0.5: 0.27, 0.7: 0.06},
    "DLRV w/o RV": {0.1: 0.60, 0.3: 0.48, 0.5: 0.24, 0.7: 0.10},
}
PAPER_LOC_DLRV_T01: dict[str, float] = dict(zip(BOX_FINDINGS, (0.59, 0.99, 0.85, 0.76, 0.61, 0.23, 0.68, 0.49), strict=True))
#: checkpoint variant -> the paper's row it reproduces
VARIANT_ROW: dict[str, str] = {
    "dlrv": "DLRV", "dlrv_no_dl": "DLRV w/o DL", "dlrv_no_rv": "DLRV w/o RV",
    "baseline": "DenseNet-121 baseline", "dlrv_random_mining": "DLRV random mining",
}


def paper_reference(variant: str) -> dict[str, Any]:
    """The paper's numbers for a variant: mean AUC, per-finding AUC and localization where published."""
    row = VARIANT_ROW.get(variant, "DLRV")
    full = row == "DLRV"
    return {
        "row": row,
        "mean_auc": PAPER_MEAN_AUC.get(row),
        "auc": dict(PAPER_AUC_DLRV) if full else {},
        "localization_mean": {f"{k:g}": v for k, v in PAPER_LOC_MEAN.get(row, {}).items()},
        "localization_t0.1": dict(PAPER_LOC_DLRV_T01) if full else {},
        "table1_means": dict(PAPER_MEAN_AUC),
        "table2_means": {name: {f"{k:g}": v for k, v in d.items()} for name, d in PAPER_LOC_MEAN.items()},
    }


def variant_of(config: dict[str, Any]) -> str:
    """Variant name of a config dict (as in ``Config.variant``, plus the random-mining ablation)."""
    if config.get("external"):  # another model's scores (cxrloc.evaluate.external)
        return "external"
    loss = config.get("loss", {})
    dl, rv = loss.get("use_dl", True), loss.get("use_rv", True)
    if not dl and not rv:
        return "baseline"
    if not dl:
        return "dlrv_no_dl"
    if not rv:
        return "dlrv_no_rv"
    if config.get("mining", {}).get("ordering") == "random":
        return "dlrv_random_mining"
    return "dlrv"


# --------------------------------------------------------------------------- writing


def write_report(
    out_dir: str | Path,
    evaluation: Evaluation,
    preds: Predictions,
    identity: dict[str, Any],
    config: dict[str, Any],
    image_loader: Callable[[str], np.ndarray] | None = None,
    examples_per_finding: int = 3,
    seed: int = 0,
) -> dict[str, Path]:
    """Write metrics.json, report.md, report.html and the figures (atomically, file by file).

    Args:
        out_dir: output folder (created).
        evaluation: from :func:`cxrloc.evaluate.scoring.evaluate_predictions`.
        preds: the predictions scored (ROC curves, maps for the examples).
        identity: ``{"checkpoint": {...}, "data": {...}}`` (what was evaluated).
        config: the model's config dict (its variant picks the paper's row).
        image_loader: ``image_id -> (S, S) uint8`` for the example figure; None skips it.
        examples_per_finding: examples per finding in the example figure.
        seed: picks the examples.

    Returns:
        name -> path of every file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variant = variant_of(config)
    paper = paper_reference(variant)
    metrics = {
        "cxrloc_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **identity,
        "variant": variant,
        "config": config,
        **evaluation.metrics,
        "paper": paper,
    }
    paths: dict[str, Path] = {"metrics": out / "metrics.json"}
    atomic_write_json(paths["metrics"], metrics)
    figures: dict[str, Path] = {"roc_curves": out / "roc_curves.png"}
    _save(figures["roc_curves"], roc_figure(preds))
    loc = evaluation.metrics["localization"]
    if loc.get("available"):
        figures["localization_accuracy"] = out / "localization_accuracy.png"
        _save(figures["localization_accuracy"], accuracy_figure(loc, paper))
        if image_loader is not None and evaluation.box_scores is not None:
            figures["examples"] = out / "examples.png"
            _save(figures["examples"], examples_figure(evaluation, preds, image_loader, examples_per_finding, seed))
    sections = report_sections(metrics)
    paths["report_md"] = out / "report.md"
    atomic_write_text(paths["report_md"], render_markdown(sections, figures))
    paths["report_html"] = out / "report.html"
    atomic_write_text(paths["report_html"], render_html(sections, figures))
    paths.update(figures)
    return paths


# --------------------------------------------------------------------------- tables

Section = dict[str, Any]  # {"title": str, "text": [str], "header": [str], "rows": [[str]]}


def report_sections(m: dict[str, Any]) -> list[Section]:
    """The report as sections of text and tables (rendered to Markdown and HTML)."""
    paper = m["paper"]
    cls = m["classification"]
    ckpt = m.get("checkpoint", {})
    data = m.get("data", {})
    ext = m.get("predictions")
    what = (f"Scores of `{ext['name']}` from `{ext['scores']}` (sha256 {ext['scores_sha256'][:12]}...; maps: "
            f"{'`' + ext['maps'] + '`' if ext.get('maps') else 'none'}), scored by `cxrloc evaluate --predictions`."
            if ext else
            f"Checkpoint `{ckpt.get('path', '?')}` (sha256 {str(ckpt.get('sha256', '?'))[:12]}..., config "
            f"`{ckpt.get('config_name', '?')}`, variant `{m['variant']}`, epoch {ckpt.get('epoch', '?')}).")
    sections: list[Section] = [{
        "title": "Evaluation",
        "text": [
            what,
            f"Data `{data.get('cache', '?')}`, split `{data.get('split', '?')}`: {m['num_images']} images of "
            f"{m['num_patients']} patients. Paper row compared with: **{paper['row']}**.",
        ],
    }]
    boot = cls["bootstrap"]
    rows = []
    for name in FINDINGS:
        f = cls["per_finding"][name]
        rows.append([name, _f(f["auc"], 3), _ci(f["ci_low"], f["ci_high"]), _f(paper["auc"].get(name), 3),
                     str(f["n_pos"]), str(f["n_neg"])])
    rows.append(["**Mean**", _f(cls["mean_auc"], 3), _ci(cls["mean_ci_low"], cls["mean_ci_high"]),
                 _f(paper["mean_auc"], 3), "", ""])
    text = [f"{int(boot['confidence'] * 100)}% CI: {boot['method']} interval over {boot['resamples']} "
            f"bootstrap resamples of {boot['unit']}s (seed {boot['seed']})."]
    if cls["excluded"]:
        text.append(f"AUC undefined (a single class in this split), excluded from the mean: {', '.join(cls['excluded'])}.")
    sections.append({"title": "Table 1: ROC AUC per finding", "text": text,
                     "header": ["Finding", "AUC (ours)", "95% CI", f"paper ({paper['row']})", "positives", "negatives"],
                     "rows": rows})
    sections.append({"title": "Table 1 (paper): mean AUC of the published methods", "text": [],
                     "header": ["Method", "mean AUC"],
                     "rows": [[k, _f(v, 3)] for k, v in paper["table1_means"].items()] + [["**ours**", _f(cls["mean_auc"], 3)]]})
    loc = m["localization"]
    if not loc.get("available"):
        sections.append({"title": "Localization", "text": [f"Not computed: {loc.get('reason')}."]})
        return sections
    tta = "; maps and scores averaged with the mirrored image (`eval.hflip_tta`, not the paper's)" if loc.get("hflip_tta") else ""
    intro = (f"{loc['num_boxes']} ground-truth boxes on {loc['num_box_images']} images; box mode `{loc['box_mode']}`{tta}; "
             "a box is correct when IoU > T; the map of the ground-truth finding is used whatever its score. "
             "Cells show ours (paper's DLRV value in parentheses where published).")
    cv = loc.get("cross_validated")
    if cv:
        chosen = ", ".join(f"{t:g}" for t in cv["chosen_thresholds"])
        sections.append(_loc_section(f"Table 2: localization accuracy, CAM threshold by {cv['folds']}-fold CV", cv["iou"], loc, paper,
                                     [intro, f"CAM thresholds chosen per fold (folds by image, seed {cv['seed']}): {chosen}."]))
        sections.append(_loc_section("Table 2 (IoBB): accuracy with IoBB > T, same thresholds", cv["iobb"], loc, None,
                                     ["IoBB = intersection / predicted box area (Wang et al. 2017)."]))
    else:
        sections.append({"title": "Localization: cross-validation skipped", "text": [loc.get("cross_validated_reason", "")]})
    fixed = loc["fixed"]
    sections.append(_loc_section(f"Localization accuracy at the fixed CAM threshold {fixed['cam_threshold']:g}", fixed["iou"],
                                 loc, paper, [] if cv else [intro]))
    sections.append(_loc_section(f"IoBB accuracy at the fixed CAM threshold {fixed['cam_threshold']:g}", fixed["iobb"], loc, None, []))
    ours_mean = (cv or fixed)["iou"]["Mean"]
    compare = [[name] + [_f(d.get(k), 2) for k in ("0.1", "0.3", "0.5", "0.7")] for name, d in paper["table2_means"].items()]
    compare.append([f"**ours** ({'CV' if cv else 'fixed'} threshold)"] + [_f(ours_mean.get(k), 2) for k in ("0.1", "0.3", "0.5", "0.7")])
    base = loc["baseline_centered"]
    compare.append([f"centred box, {base['fraction']:g} of the image (no model)"]
                   + [_f(base["iou"]["Mean"].get(k), 2) for k in ("0.1", "0.3", "0.5", "0.7")])
    sections.append({"title": "Tables 2-3 (paper): mean localization accuracy", "text": [],
                     "header": ["Method", "T=0.1", "T=0.3", "T=0.5", "T=0.7"], "rows": compare})
    sweep = loc["sweep"]["mean_iou_accuracy"]
    ts = [f"{t:g}" for t in loc["iou_thresholds"]]
    sections.append({"title": "Mean accuracy at every CAM threshold (sensitivity, not a result: chosen on the test boxes)",
                     "text": [], "header": ["CAM threshold"] + [f"T={t}" for t in ts],
                     "rows": [[k] + [_f(v.get(t), 2) for t in ts] for k, v in sweep.items()]})
    return sections


def _loc_section(title: str, table: dict[str, Any], loc: dict[str, Any], paper: dict[str, Any] | None,
                 text: list[str]) -> Section:
    ts = [f"{t:g}" for t in loc["iou_thresholds"]]
    rows = []
    for name in [*BOX_FINDINGS, "Mean"]:
        if name not in table:
            continue
        cells = []
        for t in ts:
            ref = None
            if paper is not None:
                ref = paper["localization_mean"].get(t) if name == "Mean" else (
                    paper["localization_t0.1"].get(name) if t == "0.1" else None)
            cells.append(_f(table[name].get(t), 2) + (f" ({ref:.2f})" if ref is not None else ""))
        label = f"{SHORT_NAMES.get(name, name)}" if name != "Mean" else "**Mean**"
        rows.append([label] + cells + [str(table["n"].get(name, ""))])
    return {"title": title, "text": text, "header": ["Finding"] + [f"T={t}" for t in ts] + ["boxes"], "rows": rows}


def render_markdown(sections: list[Section], figures: dict[str, Path]) -> str:
    """Sections and figures (linked by file name) as Markdown."""
    lines = []
    for i, s in enumerate(sections):
        lines.append(f"{'#' if i == 0 else '##'} {s['title']}\n")
        lines.extend(f"{t}\n" for t in s.get("text", []) if t)
        if s.get("rows"):
            lines.append("| " + " | ".join(s["header"]) + " |")
            lines.append("|" + "|".join("---" for _ in s["header"]) + "|")
            lines.extend("| " + " | ".join(r) + " |" for r in s["rows"])
            lines.append("")
    for name, path in figures.items():
        lines.append(f"## {name.replace('_', ' ').capitalize()}\n\n![{name}]({path.name})\n")
    return "\n".join(lines)


def render_html(sections: list[Section], figures: dict[str, Path], title: str = "cxrloc evaluation") -> str:
    """Sections and figures (embedded as base64 PNG, so the file stands alone) as HTML."""
    def cell(text: str) -> str:
        t = html.escape(text)
        return f"<b>{t[6:-6]}</b>" if t.startswith("**") and t.endswith("**") else t.replace("**", "")

    def para(text: str) -> str:
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)).replace("**", "")

    body = []
    for i, s in enumerate(sections):
        body.append(f"<h{1 if i == 0 else 2}>{html.escape(s['title'])}</h{1 if i == 0 else 2}>")
        body.extend(f"<p>{para(t)}</p>" for t in s.get("text", []) if t)
        if s.get("rows"):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in s["header"])
            rows = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in s["rows"])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    for name, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f"<h2>{html.escape(name.replace('_', ' ').capitalize())}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _ci(lo: float | None, hi: float | None) -> str:
    return "n/a" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


# --------------------------------------------------------------------------- figures


def roc_figure(preds: Predictions) -> Figure:
    """ROC curve of every finding with both classes present (one axes)."""
    fig = Figure(figsize=(8, 7), dpi=100)
    ax = fig.add_subplot()
    colors = _colors(len(FINDINGS))
    for c, name in enumerate(FINDINGS):
        y = preds.labels[:, c]
        if y.min() == y.max():
            continue
        fpr, tpr, _ = roc_curve(y, preds.probs[:, c])
        area = float(np.trapezoid(tpr, fpr))
        ax.plot(fpr, tpr, color=colors[c], lw=1.2, label=f"{name} ({area:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curves (AUC)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    return fig


def accuracy_figure(loc: dict[str, Any], paper: dict[str, Any]) -> Figure:
    """Localization accuracy against T per finding, the mean, and the paper's mean."""
    chosen = loc.get("cross_validated") or loc["fixed"]
    table = dict_to_table(chosen["iou"])
    ts = np.array(loc["iou_thresholds"], dtype=float)
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    colors = _colors(len(BOX_FINDINGS))
    for i, name in enumerate(BOX_FINDINGS):
        if name in table.index and not table.loc[name].isna().all():
            ax.plot(ts, [table.loc[name].get(t, np.nan) for t in ts], marker="o", ms=3, color=colors[i], lw=1, label=name)
    ax.plot(ts, [table.loc["Mean"].get(t, np.nan) for t in ts], color="k", lw=2.5, label="Mean (ours)")
    ref = paper.get("localization_mean") or {}
    if ref:
        ax.plot([float(k) for k in ref], list(ref.values()), "k--", marker="s", lw=1.2, label=f"Mean ({paper['row']}, paper)")
    kind = "CV threshold" if loc.get("cross_validated") else f"fixed threshold {loc['fixed']['cam_threshold']:g}"
    ax.set(xlabel="IoU threshold T", ylabel="accuracy (IoU > T)", ylim=(0, 1.02), title=f"Localization accuracy ({kind})")
    ax.legend(fontsize=7, ncol=2)
    return fig


def examples_figure(
    evaluation: Evaluation,
    preds: Predictions,
    image_loader: Callable[[str], np.ndarray],
    per_finding: int = 3,
    seed: int = 0,
) -> Figure:
    """Figure-3 style panel: for a few boxes per finding, the image and the heatmap overlay with boxes.

    Predicted box (red) = the cross-validated one when available, else the fixed threshold's;
    true box green; the title gives the probability of the finding and the IoU.
    """
    scores = evaluation.box_scores
    assert scores is not None
    cv = evaluation.cv
    fixed_col = scores.column(evaluation.metrics["localization"]["fixed"]["cam_threshold"])
    pred_boxes = cv.oof_pred_boxes if cv is not None else scores.pred_boxes[:, fixed_col]
    ious = cv.oof_iou if cv is not None else scores.iou[:, fixed_col]
    rng = np.random.default_rng(seed)
    picks = []
    for name in BOX_FINDINGS:
        idx = np.flatnonzero(scores.findings == name)
        if len(idx):
            picks.append((name, np.sort(rng.choice(idx, size=min(per_finding, len(idx)), replace=False))))
    n_rows = max(1, len(picks))
    fig = Figure(figsize=(2.2 * 2 * per_finding, 2.4 * n_rows), dpi=90)
    for r, (name, idx) in enumerate(picks):
        for k, i in enumerate(idx):
            image_id = str(scores.image_ids[i])
            image = image_loader(image_id)
            side_h, side_w = image.shape
            W, H = preds.size_of(image_id)
            heat = upsample_map(preds.grid_map(image_id, name), (side_w, side_h))
            prob = preds.probs[preds.position(image_id), FINDINGS.index(name)]
            ax_img = fig.add_subplot(n_rows, 2 * per_finding, r * 2 * per_finding + 2 * k + 1)
            ax_img.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax_img.set_title(f"{SHORT_NAMES[name]} {image_id}", fontsize=6)
            ax_ov = fig.add_subplot(n_rows, 2 * per_finding, r * 2 * per_finding + 2 * k + 2)
            ax_ov.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax_ov.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            for box, color in ((scores.gt_boxes[i], "lime"), (pred_boxes[i], "red")):
                x, y, w, h = scale_boxes(box, (W, H), (side_w, side_h))
                ax_ov.add_patch(Rectangle((x, y), w, h, fill=False, ec=color, lw=1.2))
            ax_ov.set_title(f"p={prob:.2f} IoU={ious[i]:.2f}", fontsize=6)
            for ax in (ax_img, ax_ov):
                ax.set_xticks([])
                ax.set_yticks([])
    fig.tight_layout()
    return fig


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def _save(path: Path, fig: Figure) -> None:
    FigureCanvasAgg(fig)
    atomic_write_with(path, lambda f: fig.savefig(f, format="png"))
