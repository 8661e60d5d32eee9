"""Run every benchmark script in benchmarks/ and collect their results in one JSON file and one Markdown table.

Each ``benchmarks/<name>.py`` (all but this file and names starting with ``_``) runs as its
own process with ``--out <temp JSON>``; with ``--quick`` it also gets ``--quick`` (scripts
that support it) or the smaller sizes of :data:`QUICK_ARGS` (only the flags its ``--help``
lists). A script that fails or times out is recorded with its exit status and the tail of its
output; the others still run.

Writes:
    benchmarks/results.json   machine, per script: command, seconds, exit status, its whole JSON
    benchmarks/RESULTS.md     one table: each figure as a ratio against the baseline it states,
                              measured in the same run, with both absolute numbers, and the
                              machine description (the README includes this file)

The figures of the table are picked per script by :data:`HEADLINES` (paths into its JSON);
a script without an entry, or whose JSON lacks the paths, contributes every number whose key
names a ratio (``ratio``, ``speedup``, ``_vs_``) instead.

Usage:
    .venv/bin/python benchmarks/run_all.py                 # full sizes (tens of minutes on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick         # small sizes, a sanity run
    .venv/bin/python benchmarks/run_all.py --only model train
    .venv/bin/python benchmarks/run_all.py --only model train --merge   # replace just those entries
    .venv/bin/python benchmarks/run_all.py --render        # RESULTS.md again from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

#: smaller sizes for scripts without --quick (applied only when their --help lists the flag)
QUICK_ARGS: dict[str, list[str]] = {
    "evaluate": ["--resamples", "200", "--predict-images", "16"],
    "mining": ["--images", "1024", "--anchors", "20000", "--repeats", "1"],
    "prepare": ["--items", "60", "--repeats", "1", "--batches", "10", "--png-batches", "2"],
    "synth": ["--images", "200", "--probe-images", "0"],
    "demo": ["--quick"],
}

#: per script: rows (figure, value path, unit, baseline label, baseline path, kind); a path is dot-separated
#: keys, ``[i]`` indexes a list, ``_const.X`` is the number X. ``kind`` says how the ratio reads:
#:   "time"    lower is better: baseline / value, "N.NNx faster" (or "slower")
#:   "rate"    higher is better: value / baseline, "N.NNx faster" (or "slower")
#:   "cost"    value / baseline, "N.NNx the baseline" (an overhead the method pays)
#:   "quality" value / baseline, "N.NNx the baseline" (higher is better)
HEADLINES: dict[str, list[tuple[str, str, str, str, str, str]]] = {
    "demo": [
        ("demo: DLRV mean test AUC (synthetic, seed 0)", "demo.mean_auc", "", "chance", "baselines.chance_auc",
         "quality"),
        ("demo: mean box accuracy at IoU > 0.3", "demo.box_accuracy_t0.3", "", "centred box (no model)",
         "baselines.centred_box_t0.3", "quality"),
        ("demo: wall time, all stages", "demo.seconds_total", "s", "budget", "baselines.budget_s", "time"),
    ],
    "evaluate": [
        ("evaluate: score a full test split from cached predictions", "scoring.evaluate_predictions_total_s", "s",
         "target", "targets.scoring_s_max", "time"),
        ("evaluate: CAM map -> boxes, per map", "scoring.per_map_ms.lattice", "ms", "threshold + scipy label",
         "scoring.per_map_ms.brute_force_label", "time"),
        ("predict: channels_last + 2 threads + bf16, DenseNet-121 224", "predict.rows[3].images_per_s", "img/s",
         "plain fp32", "predict.rows[0].images_per_s", "rate"),
        ("predict --onnx (onnxruntime) + 2 threads, DenseNet-121 224", "predict.rows[5].images_per_s", "img/s",
         "channels_last + 2 threads (PyTorch fp32)", "predict.rows[2].images_per_s", "rate"),
    ],
    "export": [
        ("export: onnxruntime on the exported graph, DenseNet-121 224, batch 16", "settings.onnxruntime.images_per_s",
         "img/s", "PyTorch fp32", "settings.torch_fp32.images_per_s", "rate"),
    ],
    "malloc": [
        ("CPU allocator tuning: DLRV training step, DenseNet-121 224, B = 16", "modes.tuned.median_s.dlrv", "s",
         "glibc defaults", "modes.system.median_s.dlrv", "time"),
        ("CPU allocator tuning: baseline training step, same run", "modes.tuned.median_s.baseline", "s",
         "glibc defaults", "modes.system.median_s.baseline", "time"),
    ],
    "mining": [
        ("pHash index (vectorised)", "phash.ours_images_per_s", "img/s", "imagehash.phash on the cache",
         "phash.imagehash_cache_images_per_s", "rate"),
        ("triplet mining, one epoch of 78,000 anchors (pHash, hard)", "mining.runs[2].epoch_s", "s",
         "random ordering", "mining.runs[3].epoch_s", "cost"),
    ],
    "model": [
        ("DLRV training step (3 images per anchor)", "training.median_s.dlrv", "s", "baseline step (BCE only)",
         "training.median_s.baseline", "cost"),
        ("inference, fastest setting with correct boxes", "inference.settings.fp32_channels_last_compiled.images_per_s",
         "img/s", "plain fp32", "inference.settings.fp32.images_per_s", "rate"),
    ],
    "prepare": [
        ("prepare: decode + resize 1024 PNG, 1 worker", "decode_resize.workers_1_images_per_s", "img/s",
         "target per core", "_const.75", "rate"),
        ("training batches from the cache (+ augmentation)", "batches.cache_batch_augment_images_per_s", "img/s",
         "decode PNG per sample", "batches.png_decode_per_sample_images_per_s", "rate"),
    ],
    "synth": [
        ("synth: generate at 256 px, 1 worker (wall)", "speed.generate_1_worker.images_per_s_wall", "img/s",
         "target", "_const.200", "rate"),
        ("synth: PNG encoding per image", "speed.png_encode.ours_ms_per_image_cpu", "ms", "Pillow",
         "speed.png_encode.pillow_ms_per_image_cpu", "time"),
    ],
    "train": [
        ("train: DLRV epoch (engine, same anchors)", "devices.cpu.engine_epoch.dlrv.train_call_s", "s",
         "baseline epoch", "devices.cpu.engine_epoch.baseline.train_call_s", "cost"),
        ("train: DLRV epoch estimate at ChestX-ray14 scale", "devices.cpu.epoch_estimate.dlrv.epoch_s", "s",
         "baseline", "devices.cpu.epoch_estimate.baseline.epoch_s", "cost"),
    ],
}

RATIO_KEY = re.compile(r"ratio|speedup|_vs_", re.IGNORECASE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (--quick or QUICK_ARGS) for a sanity run")
    ap.add_argument("--only", nargs="*", default=None, help="script names to run (default: all)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per script (default 3600)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--md", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: keep the other scripts' entries of an existing --out instead of dropping them")
    ap.add_argument("--render", action="store_true", help="only rewrite --md from an existing --out JSON")
    args = ap.parse_args()
    if args.render:
        from cxrloc.fileio import atomic_write_text

        atomic_write_text(args.md, markdown(json.loads(args.out.read_text())))
        print(f"wrote {args.md} from {args.out}")
        return 0
    scripts = discover(args.only)
    if not scripts:
        print("no benchmark scripts found", file=sys.stderr)
        return 1
    doc: dict[str, Any] = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
                           "machine": machine(), "benchmarks": {}}
    if args.merge and args.out.exists():  # each entry keeps its own command, time and machine description
        doc["benchmarks"] = json.loads(args.out.read_text())["benchmarks"]
    with tempfile.TemporaryDirectory(prefix="cxrloc-bench-") as tmp:
        for path in scripts:
            name = path.stem
            print(f"== {name}", flush=True)
            doc["benchmarks"][name] = run_script(path, Path(tmp) / f"{name}.json", args.quick, args.timeout)
            r = doc["benchmarks"][name]
            print(f"   exit {r['returncode']} in {r['seconds']:.0f} s", flush=True)
    doc["machine"]["load_average_end"] = _loadavg()
    from cxrloc.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(args.out, doc)
    md = markdown(doc)
    atomic_write_text(args.md, md)
    print(md)
    print(f"wrote {args.out} and {args.md}")
    return 0 if all(r["returncode"] == 0 for r in doc["benchmarks"].values()) else 1


def discover(only: list[str] | None) -> list[Path]:
    """benchmarks/*.py except this file and ``_private.py``, sorted; ``only`` filters by name."""
    found = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    if only:
        missing = set(only) - {p.stem for p in found}
        if missing:
            raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(missing))}; have {', '.join(p.stem for p in found)}")
        found = [p for p in found if p.stem in only]
    return found


def script_flags(path: Path) -> set[str]:
    """The long options a script's ``--help`` lists."""
    try:
        text = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120,
                              cwd=ROOT).stdout
    except subprocess.TimeoutExpired:
        return set()
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


def run_script(path: Path, out_json: Path, quick: bool, timeout: float) -> dict[str, Any]:
    """Run one benchmark script; its JSON (if written) and what happened."""
    flags = script_flags(path)
    cmd = [sys.executable, str(path)]
    if "--out" in flags:
        cmd += ["--out", str(out_json)]
    if quick:
        if "--quick" in flags:
            cmd.append("--quick")
        else:
            extra = QUICK_ARGS.get(path.stem, [])
            for i, item in enumerate(extra):
                if item.startswith("--") and item in flags:
                    cmd.append(item)
                    if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                        cmd.append(extra[i + 1])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc = 124
        tail = f"timed out after {timeout:.0f} s\n" + str((e.stdout or b"")[-2000:])
    result: Any = None
    if out_json.is_file():
        try:
            result = json.loads(out_json.read_text())
        except ValueError as e:
            tail += f"\n(unreadable JSON: {e})"
    return {"command": [Path(c).name if i < 2 else c for i, c in enumerate(cmd)], "returncode": rc,
            "seconds": time.perf_counter() - t0, "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "output_tail": tail if rc else tail[-500:], "result": result}


# --------------------------------------------------------------------------- the table


def lookup(doc: Any, path: str) -> Any:
    """Value at a dotted path (``a.b[2].c``; ``_const.75`` is the number 75); None when absent.

    A key may itself hold dots (``box_accuracy_t0.3``): at each level the longest key that
    the rest of the path starts with wins.
    """
    if path.startswith("_const."):
        return float(path.removeprefix("_const."))
    cur, rest = doc, path
    while rest:
        if rest.startswith("["):
            m = re.match(r"\[(\d+)\]\.?", rest)
            if m is None or not isinstance(cur, list) or int(m.group(1)) >= len(cur):
                return None
            cur, rest = cur[int(m.group(1))], rest[m.end():]
            continue
        if not isinstance(cur, dict):
            return None
        keys = [k for k in cur if isinstance(k, str) and rest.startswith(k)
                and (len(rest) == len(k) or rest[len(k)] in ".[")]
        if not keys:
            return None
        key = max(keys, key=len)
        cur, rest = cur[key], rest[len(key):].removeprefix(".")
    return cur


def headline_rows(name: str, result: Any) -> list[list[str]]:
    """Table rows of one script: its HEADLINES where present, else every ratio-named number."""
    rows = []
    for label, value_path, unit, base_label, base_path, kind in HEADLINES.get(name, []):
        value, base = lookup(result, value_path), lookup(result, base_path)
        if not _is_num(value) or not _is_num(base) or value == 0 or base == 0:
            continue
        rows.append([label, _num(value, unit), f"{base_label}: {_num(base, unit)}", ratio_text(value, base, kind)])
    if rows:
        return rows
    for key, value in _flatten(result):
        if RATIO_KEY.search(key) and _is_num(value):
            rows.append([f"{name}: {key}", "", "(see JSON)", f"{value:.2f}x"])
    return rows


def ratio_text(value: float, base: float, kind: str) -> str:
    """The ratio column: see :data:`HEADLINES` for the kinds."""
    if kind in ("time", "rate"):
        r = base / value if kind == "time" else value / base
        return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"
    return f"{value / base:.2f}x the baseline"


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def markdown(doc: dict[str, Any]) -> str:
    """RESULTS.md: machine, then one row per figure."""
    m = doc["machine"]
    lines = [
        "<!-- generated by benchmarks/run_all.py; do not edit by hand -->",
        f"Measured {doc['created']} on {m['cpu']} ({m.get('cpu_summary', 'capability not recorded')}; "
        f"{m['cores']} cores, {m.get('memory_gib', '?')} GiB), "
        f"{m.get('platform', '?')}, Python {m['python']}, torch {m['torch']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; 1-minute load average {m['load_average_start'][0]:.1f} at the start, "
        f"{m.get('load_average_end', [float('nan')])[0]:.1f} at the end"
        + (" (a loaded machine: wall-clock numbers are pessimistic)" if m["load_average_start"][0] > 0.5 * m["cores"] else "")
        + (". Quick sizes (a sanity run, not the reported numbers)." if doc.get("quick") else "."),
        "",
        "| Figure | Measured | Baseline (same run) | Ratio to the baseline |",
        "|---|---|---|---|",
    ]
    failed = []
    for name, r in doc["benchmarks"].items():
        if r["returncode"] != 0 or r["result"] is None:
            failed.append(f"`{name}` (exit {r['returncode']})")
            continue
        lines += ["| " + " | ".join(row) + " |" for row in headline_rows(name, r["result"])]
    if failed:
        lines += ["", f"Did not finish: {', '.join(failed)} (see benchmarks/results.json)."]
    kept = [name for name, r in doc["benchmarks"].items() if r.get("finished", "") < doc["created"]]
    if kept:
        lines += ["", f"From an earlier run (kept by `--merge`; its own machine and load are in results.json): "
                      f"{', '.join(f'`{k}`' for k in kept)}."]
    lines += ["", "Every number, per script: `benchmarks/results.json`; commands: "
              + ", ".join(f"`{' '.join(r['command'])}`" for r in doc["benchmarks"].values()) + "."]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    """The shared machine description (benchmarks/_machine.py: CPU capability, memory, GPU)."""
    from _machine import machine as shared_machine

    info = dict(shared_machine())
    info["load_average_start"] = _loadavg()
    return info


def _loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return [float("nan")] * 3


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() if k != "machine" for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, list):
        return [kv for i, v in enumerate(obj) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, obj)]


def _num(value: float, unit: str) -> str:
    text = f"{value:,.0f}" if abs(value) >= 100 else (f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}")
    return f"{text} {unit}".strip()


if __name__ == "__main__":
    sys.exit(main())
