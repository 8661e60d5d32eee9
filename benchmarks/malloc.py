"""Benchmark the CPU allocator tuning (cxrloc/malloc.py): DLRV training steps with glibc's defaults vs tuned.

Each mode runs in its own process (mallopt settings are process-wide): ``system`` with
``CXRLOC_MALLOC_TUNING=0``, ``tuned`` after :func:`cxrloc.malloc.tune_cpu_malloc`, which
the ``cxrloc`` command line calls at start. In each, DenseNet-121 at 224 px does full training
steps (forward, loss, backward, Adam) of the baseline (B images) and of DLRV (3B images:
anchors, positives, negatives, with RV), interleaved, after one warm-up step each; medians of
``--reps``. Reported per mode: seconds per step, minor page faults per step, peak resident
memory; across modes: the speed-up of each variant and the DLRV / baseline step ratio.

Usage:
    .venv/bin/python benchmarks/malloc.py            # B = 16 (the paper's batch), 3 steps each (~3 min on 2 cores)
    .venv/bin/python benchmarks/malloc.py --quick    # B = 4, 1 step each, a sanity run
Writes benchmarks/results/malloc.json (``--quick``: malloc_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

MODES = ("system", "tuned")


def child(batch: int, size: int, reps: int, out: Path) -> None:
    """One mode's measurements (this process's allocator is already set by the parent's environment)."""
    from cxrloc.malloc import malloc_state, tune_cpu_malloc

    tune_cpu_malloc()  # a no-op under CXRLOC_MALLOC_TUNING=0
    import torch

    from cxrloc.config import LossConfig, ModelConfig
    from cxrloc.model import DLRVLoss, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="densenet121", pretrained=False)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3 * batch, 3, size, size, generator=gen)
    labels = (torch.rand(3 * batch, 14, generator=gen) > 0.8).float()
    variants = {"baseline": LossConfig(use_dl=False, use_rv=False), "dlrv": LossConfig(use_dl=True, use_rv=True)}

    def step(name: str) -> tuple[float, int]:
        crit = DLRVLoss(variants[name])
        rows = 3 * batch if variants[name].use_dl else batch
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        out = model(images[:rows], labels=crit.region_labels(labels[:rows], batch))
        loss = crit(out, labels[:rows], batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for name in variants:
        step(name)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in variants}
    faults: dict[str, list[int]] = {n: [] for n in variants}
    for r in range(reps):
        for name in (variants if r % 2 == 0 else reversed(list(variants))):
            s, f = step(name)
            times[name].append(s)
            faults[name].append(f)
    result = {
        "malloc": malloc_state(),
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "all_s": times,
        "minor_faults_per_step": {n: statistics.median(f) for n, f in faults.items()},
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    result["dlrv_over_baseline"] = result["median_s"]["dlrv"] / result["median_s"]["baseline"]
    out.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="anchor batch 4, 1 step each: a sanity run")
    p.add_argument("--batch", type=int, default=None, help="anchor batch B (default 16; --quick: 4)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 3; --quick: 1)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batch = args.batch or (4 if args.quick else 16)
    reps = args.reps or (1 if args.quick else 3)
    if args.child is not None:
        child(batch, args.image_size, reps, args.child)
        return 0

    from _machine import machine

    from cxrloc.fileio import atomic_write_json

    out_path = args.out or HERE / "results" / ("malloc_quick.json" if args.quick else "malloc.json")
    info = machine()
    modes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
            env["CXRLOC_MALLOC_TUNING"] = "1" if mode == "tuned" else "0"
            dst = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--child", str(dst), "--batch", str(batch),
                   "--image-size", str(args.image_size), "--reps", str(reps)]
            print(f"{mode}: DenseNet-121 {args.image_size}px, anchor batch {batch}, {reps} steps each", flush=True)
            subprocess.run(cmd, env=env, check=True)
            modes[mode] = json.loads(dst.read_text())
    info["load_average_end"] = list(os.getloadavg())
    sys_, tuned = modes["system"], modes["tuned"]
    result = {
        "machine": info,
        "backbone": "densenet121",
        "image_size": args.image_size,
        "anchor_batch": batch,
        "images_per_step": {"baseline": batch, "dlrv": 3 * batch},
        "repetitions": reps,
        "modes": modes,
        "speedup_tuned_vs_system": {n: sys_["median_s"][n] / tuned["median_s"][n] for n in sys_["median_s"]},
        "dlrv_over_baseline": {m: modes[m]["dlrv_over_baseline"] for m in MODES},
        "peak_rss_ratio_tuned_vs_system": tuned["peak_rss_gib"] / sys_["peak_rss_gib"],
    }
    atomic_write_json(out_path, result)
    print(f"\n{'mode':<8} {'baseline s':>10} {'dlrv s':>8} {'dlrv/base':>9} {'faults/step (dlrv)':>18} {'peak RSS':>9}")
    for m in MODES:
        r = modes[m]
        print(f"{m:<8} {r['median_s']['baseline']:>10.2f} {r['median_s']['dlrv']:>8.2f} {r['dlrv_over_baseline']:>9.2f} "
              f"{r['minor_faults_per_step']['dlrv']:>18,.0f} {r['peak_rss_gib']:>8.2f}G")
    print("speed-up tuned vs system: " + ", ".join(f"{n} {v:.2f}x" for n, v in result["speedup_tuned_vs_system"].items()))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
