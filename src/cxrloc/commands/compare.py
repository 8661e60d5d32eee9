"""Compare evaluated runs side by side (Table 1 and Table 3 layouts) with paired bootstrap differences.

Reads the folders `cxrloc evaluate --out` wrote (metrics.json, predictions.npz); writes
OUT/compare.md, compare.html, compare.json and differences.png (see cxrloc.evaluate.compare).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", type=Path, metavar="EVAL_DIR",
                   help="two or more `cxrloc evaluate --out` folders, scored on the same cache split")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--data", type=Path, default=None,
                   help="the cache they were scored on, for its boxes (default: the cache path the first run recorded)")
    p.add_argument("--reference", default=None,
                   help="run (name or folder) the differences are taken from (default: the full DLRV run, else the first)")
    p.add_argument("--names", default=None, metavar="A,B,...",
                   help="comma-separated display names, one per folder (default: each checkpoint's config name)")
    p.add_argument("--resamples", type=int, default=None, help="paired bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap (default 0)")


def run(args: argparse.Namespace) -> int:
    from cxrloc.data.cache import Cache
    from cxrloc.evaluate.compare import DEFAULT_RESAMPLES, compare_runs, load_runs
    from cxrloc.evaluate.compare_report import write_comparison
    from cxrloc.evaluate.runner import cache_identity

    runs = load_runs(args.folders, args.names.split(",") if args.names else None)
    recorded = runs[0].predictions.meta.get("cache", {})
    data = args.data or (Path(recorded["root"]) if recorded.get("root") else None)
    if data is None or not data.is_dir():
        raise ValueError(f"the cache the runs were scored on ({data}) is not a folder here; pass --data CACHE")
    cache = Cache(data)
    scored_on = [r.predictions.meta.get("cache", {}).get("sha256") for r in runs]
    if cache_identity(cache)["sha256"] not in scored_on:
        raise ValueError(f"{data}: not a cache the runs were scored on (its checksums differ from theirs)")
    comp = compare_runs(runs, cache.boxes, reference=args.reference,
                        resamples=DEFAULT_RESAMPLES if args.resamples is None else args.resamples, seed=args.seed)
    paths = write_comparison(comp, args.out)
    ref = comp.run(comp.reference)
    print(f"{len(runs)} runs on {len(ref.predictions)} images, {comp.num_boxes} boxes; reference {comp.reference} "
          f"(mean AUC {ref.metrics['classification']['mean_auc']:.3f})")
    for name, d in comp.differences.items():
        a = d["auc"]
        loc = d["loc@0.3"]
        print(f"  {name}: mean AUC {a.value:+.3f} [{a.low:+.3f}, {a.high:+.3f}] {a.verdict}"
              + (f"; box accuracy T=0.3 {loc.value:+.3f} [{loc.low:+.3f}, {loc.high:+.3f}] {loc.verdict}"
                 if loc.verdict != "n/a" else ""))
    print(f"report: {paths['report_md']}")
    return 0
