"""The report of ``cxrloc compare``: sections (Markdown/HTML), JSON and the forest plot of a :class:`Comparison`.

What the numbers mean and how they are computed: :mod:`cxrloc.evaluate.compare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cxrloc import __version__
from cxrloc.evaluate.compare import LOC_TS, TABLE3_TS, Comparison, Difference, headline, seed_groups
from cxrloc.evaluate.report import (
    PAPER_AUC_DLRV,
    PAPER_LOC_MEAN,
    PAPER_MEAN_AUC,
    VARIANT_ROW,
    Section,
    _ci,
    _f,
    _save,
    render_html,
    render_markdown,
)
from cxrloc.fileio import atomic_write_json, atomic_write_text
from cxrloc.labels import FINDINGS, SHORT_NAMES


def comparison_sections(comp: Comparison, labels: dict[str, str] | None = None,
                        notes: Sequence[str] = ()) -> list[Section]:
    """Table 1 and Table 3 layouts and the differences, as report sections (no title section).

    ``labels`` renames runs for display; ``notes`` are added to the differences' text.
    """
    label = lambda name: (labels or {}).get(name, name)  # noqa: E731
    heads = {r.name: headline(r.metrics) for r in comp.runs}
    paper_rows = list(dict.fromkeys(VARIANT_ROW[r.variant] for r in comp.runs if r.variant in VARIANT_ROW))
    t1 = [[label(r.name)] + [_f(heads[r.name]["auc"][f], 3) for f in FINDINGS]
          + [_f(heads[r.name]["mean_auc"], 3), _ci(*heads[r.name]["mean_auc_ci"])] for r in comp.runs]
    t1 += [[f"paper: {row}"] + [_f(PAPER_AUC_DLRV[f], 3) if row == "DLRV" else "" for f in FINDINGS]
           + [_f(PAPER_MEAN_AUC.get(row), 3), ""] for row in paper_rows]
    t3 = [[label(r.name)] + [_f(heads[r.name]["box_accuracy_mean"].get(t), 2) for t in LOC_TS]
          + [str(heads[r.name]["cam_threshold"] or "")] for r in comp.runs]
    t3 += [[f"paper: {row}"] + [_f(PAPER_LOC_MEAN[row].get(float(t)), 2) if float(t) in PAPER_LOC_MEAN[row] else ""
                                for t in LOC_TS] + [""] for row in paper_rows if row in PAPER_LOC_MEAN]
    ref = label(comp.reference)
    d_rows = [[label(name)] + [_cell(d[k]) for k in ("auc", *(f"loc@{t}" for t in TABLE3_TS))]
              for name, d in comp.differences.items()]
    text = [
        f"Each cell: run minus **{ref}**, with the paired 95% bootstrap interval (the same resamples for both runs: "
        f"{comp.resamples} patient resamples for AUC, {comp.resamples} resamples of the box images' patients for "
        "box accuracy; "
        f"seed {comp.seed}). **within noise** = the interval holds 0: this test set cannot tell the two apart.",
        *notes,
    ]
    unpaired = [f"{label(n)}: {'overlap' if d['auc'].intervals_overlap else 'do not overlap'}"
                for n, d in comp.differences.items()]
    if unpaired:
        text.append("Unpaired view, the runs' own mean-AUC intervals: " + "; ".join(unpaired) + ".")
    text.append("The intervals cover the sampling of the test set only, not the spread between training runs "
                "(seeds, data order); give runs of other seeds too to see that spread (a section then lists it).")
    f_rows = [[name] + [_cell(comp.finding_differences[n][name]) for n in comp.finding_differences] for name in FINDINGS]
    groups = seed_groups(comp)
    g_rows = [[g, str(len(s["runs"]))] + [_sd_cell(s["mean_auc"], 3)] + [_sd_cell(s["box_accuracy_mean"][t], 2)
                                         for t in TABLE3_TS] for g, s in groups.items()]
    protocol = [f"**Scored differently**: `{key}` is " + ", ".join(f"{v} for {label(n)}" for n, v in values.items())
                + "; the differences below include that." for key, values in comp.protocol_differences.items()]
    sections = [
        {"title": "Table 1 layout: AUC per finding", "text": protocol,
         "header": ["Method"] + [SHORT_NAMES.get(f, f) for f in FINDINGS] + ["Mean", "95% CI"], "rows": t1},
        {"title": "Table 3 layout: mean box accuracy at IoU > T",
         "text": [f"{comp.num_boxes} ground-truth boxes; each run with its own CAM threshold (last column)."]
         if comp.num_boxes else ["No ground-truth boxes in this split: AUC only."],
         "header": ["Method"] + [f"T={t}" for t in LOC_TS] + ["CAM threshold"], "rows": t3},
        {"title": f"Differences from {ref} (is it noise?)", "text": text,
         "header": ["Run", "mean AUC"] + [f"box acc T={t}" for t in TABLE3_TS], "rows": d_rows},
        {"title": f"AUC per finding: difference from {ref}", "text": [],
         "header": ["Finding"] + [label(n) for n in comp.finding_differences], "rows": f_rows},
    ]
    if groups:
        sections.append({"title": "Across runs of one config (training seeds)",
                         "text": ["Mean ± sample standard deviation [min, max] over the runs of each config given "
                                  "more than once."],
                         "header": ["Config", "runs", "mean AUC"] + [f"box acc T={t}" for t in TABLE3_TS],
                         "rows": g_rows})
    return sections


def comparison_dict(comp: Comparison) -> dict[str, Any]:
    """Everything the report shows, as plain JSON (NaN as null)."""
    p0 = comp.runs[0].predictions
    return {
        "cxrloc_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "reference": comp.reference,
        "bootstrap": {"resamples": comp.resamples, "seed": comp.seed, "paired": True,
                      "units": {"auc": "patient", "box_accuracy": "patient of the box images"}, "confidence": 0.95},
        "test_set": {"split": p0.meta.get("split"), "cache": p0.meta.get("cache", {}).get("root"),
                     "images": len(p0), "patients": len(np.unique(p0.patient_ids)), "boxes": comp.num_boxes},
        "runs": [{"name": r.name, "group": r.group, "folder": str(r.folder), "variant": r.variant, "source": r.source,
                  **headline(r.metrics)} for r in comp.runs],
        "protocol_differences": comp.protocol_differences,
        "seed_groups": seed_groups(comp),
        "differences": {n: {k: d.to_dict() for k, d in dd.items()} for n, dd in comp.differences.items()},
        "auc_differences_per_finding": {n: {f: d.to_dict() for f, d in dd.items()}
                                        for n, dd in comp.finding_differences.items()},
    }


def differences_figure(comp: Comparison) -> Figure:
    """Forest plot: AUC difference from the reference per finding (and the mean), 95% paired intervals."""
    others = list(comp.finding_differences)
    rows = [*FINDINGS, "Mean"]
    fig = Figure(figsize=(7, 0.35 * len(rows) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    step = 0.7 / max(len(others), 1)
    for k, name in enumerate(others):
        ds = [comp.finding_differences[name][f] for f in FINDINGS] + [comp.differences[name]["auc"]]
        y = np.arange(len(rows))[::-1] + (k - (len(others) - 1) / 2) * step
        v = np.array([d.value for d in ds])
        lo, hi = np.array([d.low for d in ds]), np.array([d.high for d in ds])
        ok = np.isfinite(v) & np.isfinite(lo)
        ax.errorbar(v[ok], y[ok], xerr=[v[ok] - lo[ok], hi[ok] - v[ok]], fmt="o", ms=3, capsize=2, label=name)
    ax.axvline(0.0, color="0.4", lw=0.8)
    ax.set_yticks(np.arange(len(rows))[::-1], [SHORT_NAMES.get(f, f) for f in rows])
    ax.set_xlabel(f"AUC minus {comp.reference} (paired 95% interval)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def write_comparison(comp: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write compare.md, compare.html, compare.json and differences.png (each atomically); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "figure": out / "differences.png", "report_md": out / "compare.md",
             "report_html": out / "compare.html"}
    atomic_write_json(paths["json"], comparison_dict(comp))
    _save(paths["figure"], differences_figure(comp))
    p0 = comp.runs[0].predictions
    intro = {"title": "cxrloc compare", "text": [
        f"{len(comp.runs)} runs scored on the same {len(p0)} `{p0.meta.get('split')}` images of "
        f"{len(np.unique(p0.patient_ids))} patients (cache `{p0.meta.get('cache', {}).get('root')}`); "
        f"reference **{comp.reference}**.",
    ], "header": ["Run", "variant", "checkpoint or scores", "epoch", "evaluate folder"], "rows": [
        [r.name, r.variant, f"`{r.source}`", str(r.metrics.get("checkpoint", {}).get("epoch", "")), f"`{r.folder}`"]
        for r in comp.runs]}
    sections = [intro, *comparison_sections(comp)]
    figures = {"AUC_differences": paths["figure"]}
    atomic_write_text(paths["report_md"], render_markdown(sections, figures))
    atomic_write_text(paths["report_html"], render_html(sections, figures, title="cxrloc compare"))
    return paths


def _sd_cell(s: dict[str, float | None], digits: int) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _cell(d: Difference) -> str:
    if not np.isfinite(d.value):
        return "n/a"
    if not np.isfinite(d.low):
        return f"{d.value:+.3f}"
    return f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] {d.verdict}"
