"""Benchmark the training engine: baseline vs DLRV step throughput, epoch overheads, epoch-time ratio.

Measured in one run, on the CPU and (when one is visible) on a CUDA GPU:

1. Training steps through the engine's own code path (``DLRVModule.train_inputs`` on the
   device: resize + rotation/flip + normalisation, ``DLRV.forward``, ``DLRVLoss``, backward,
   Adam step) with the paper's batch of 16: baseline = 16 images per step, DLRV = 48 images
   ([anchors; positives; negatives], all three losses). Repetitions interleaved, medians.
   images/s = images through the backbone per second. GPU: bf16 autocast + channels_last.
2. Per-epoch overhead at ChestX-ray14 scale (77,821 train anchors, batch 16):
   mining = ``TripletMiner.epoch_triplets`` for one epoch over synthetic labels with
   realistic frequencies and random 64-bit hashes (the miner is built once, like a run);
   loading = gathering one batch of uint8 rows from a memory-mapped cache (hot page cache)
   times the number of batches. Reported relative to the epoch's compute (steps x median
   step time), i.e. the worst case where loading is not overlapped with compute
   (``data.num_workers: 0``); with workers loading runs beside the compute.
3. DLRV / baseline time per epoch = (batches x step + mining + loading) for each, at the
   same number of anchors per epoch (both see every train image once as anchor).
4. A real ``cxrloc.train.train`` epoch of each variant on a small synthetic cache (training
   batches and validation timed by a callback), to check the engine adds no hidden cost; with
   ``--compile-mode`` also DLRV with ``train.compile`` in that mode (images/s inside Lightning).

Usage:
    .venv/bin/python benchmarks/train.py            # DenseNet-121 at 224 (several minutes on 2 cores)
    .venv/bin/python benchmarks/train.py --quick    # densenet-tiny at 64 px: a sanity run of the script
    .venv/bin/python benchmarks/train.py --devices cuda --out benchmarks/results/train_gpu.json  # GPU only
    .venv/bin/python benchmarks/train.py --devices cuda --compile-mode reduce-overhead --no-engine \
        --out benchmarks/results/train_gpu_compile.json   # + DLRV steps with CUDA graphs (train.compile_mode)
    .venv/bin/python benchmarks/train.py --devices cuda --compile-mode reduce-overhead --engine-anchors 1024
        # + a 1,024-anchor Lightning epoch with CUDA graphs (tools/gpu_checks.sh runs this)
Writes benchmarks/results/train.json (``--quick``: train_quick.json).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402

from cxrloc.config import Config, load_config  # noqa: E402
from cxrloc.data.cache import Cache, write_cache  # noqa: E402
from cxrloc.fileio import atomic_write_json  # noqa: E402
from cxrloc.labels import FINDINGS  # noqa: E402
from cxrloc.malloc import tune_cpu_malloc  # noqa: E402
from cxrloc.mining import TripletMiner  # noqa: E402
from cxrloc.train import read_summary, train  # noqa: E402
from cxrloc.train.datamodule import CacheBatchDataset  # noqa: E402
from cxrloc.train.module import DLRVModule  # noqa: E402

NIH_TRAIN = 77_821  # paper's training split
BATCH = 16  # triplets (DLRV) or anchors (baseline) per step
TARGET_RATIO = 3.2
TARGET_GPU_IMAGES_PER_S = 1500
#: approximate ChestX-ray14 label frequencies (fraction of images), FINDINGS order
NIH_FREQ = (0.103, 0.025, 0.119, 0.177, 0.052, 0.056, 0.013, 0.047, 0.042, 0.021, 0.022, 0.015, 0.030, 0.002)


def variant_config(variant: str, backbone: str, size: int, device: str, compile_mode: str | None = None) -> Config:
    """baseline / dlrv; ``dlrv_compiled``: DLRV with ``train.compile`` in ``compile_mode``."""
    name = "baseline" if variant == "baseline" else "dlrv"
    sets = [f"model.backbone={backbone}", "model.pretrained=false", f"data.image_size={size}",
            f"train.batch_size={BATCH}"]
    if device == "cuda":
        sets += ["train.channels_last=true", "train.precision=bf16-mixed"]
    if variant == "dlrv_compiled":
        sets += ["train.compile=true", f"train.compile_mode={compile_mode}"]
    return load_config(name, sets)


# --------------------------------------------------------------------------- 1. steps


def step_times(
    backbone: str, size: int, device: str, repeats: int, warmup: int, compile_mode: str | None = None
) -> dict[str, dict]:
    """Median seconds per training step for baseline and DLRV (interleaved repetitions).

    With ``compile_mode`` also ``dlrv_compiled`` (the backbone under torch.compile in that mode,
    e.g. "reduce-overhead" = CUDA graphs); its first steps (compilation, graph capture) are warm-up.
    """
    setups = {}
    for variant in ("baseline", "dlrv") + (("dlrv_compiled",) if compile_mode else ()):
        cfg = variant_config(variant, backbone, size, device, compile_mode)
        module = DLRVModule(cfg).to(device)
        module.train()
        module._augment_generator = torch.Generator().manual_seed(0)
        rows = BATCH * (3 if cfg.loss.use_dl else 1)
        gen = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (rows, size, size), dtype=torch.uint8, generator=gen).to(device)
        labels = (torch.rand(rows, len(FINDINGS), generator=gen) < 0.15).float().to(device)
        optimizer = torch.optim.Adam([p for p in module.model.parameters() if p.requires_grad], lr=1e-3)
        setups[variant] = (cfg, module, images, labels, optimizer, rows)

    def one_step(variant: str) -> float:
        cfg, module, images, labels, optimizer, rows = setups[variant]
        n = BATCH
        _sync(device)
        t0 = time.perf_counter()
        if module._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            x = module.train_inputs(images)
            out = module.model(x, labels=module.criterion.region_labels(labels, n))
            terms = module.criterion(out, labels, n)
        terms["loss"].backward()
        optimizer.step()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(warmup + (2 if compile_mode else 0)):  # compilation + CUDA graph recording
        for variant in setups:
            one_step(variant)
    times: dict[str, list[float]] = {v: [] for v in setups}
    for r in range(repeats):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        for variant in order:
            times[variant].append(one_step(variant))
    out = {}
    for variant, ts in times.items():
        rows = setups[variant][5]
        med = statistics.median(ts)
        out[variant] = {"images_per_step": rows, "step_s": med, "images_per_s": rows / med, "all_s": ts}
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- 2. overheads


def mining_time(n_train: int, quick: bool) -> dict:
    """Seconds to build the miner once and to produce one epoch's triplets, at ChestX-ray14 scale."""
    rng = np.random.default_rng(0)
    labels = (rng.random((n_train, len(FINDINGS))) < np.asarray(NIH_FREQ)).astype(np.uint8)
    hashes = rng.integers(0, np.iinfo(np.int64).max, size=n_train, dtype=np.int64).astype(np.uint64)
    cfg = load_config("dlrv").mining
    t0 = time.perf_counter()
    miner = TripletMiner(labels, hashes, np.arange(n_train), cfg, seed=0)
    build = time.perf_counter() - t0
    epochs = [0] if quick else [0, 12]  # curriculum (easy end) and hard phase
    per_epoch = []
    for e in epochs:
        t0 = time.perf_counter()
        miner.epoch_triplets(e, 0, 1)
        per_epoch.append(time.perf_counter() - t0)
    return {"anchors": n_train, "build_s": build, "epoch_s": statistics.mean(per_epoch), "epochs_timed": epochs}


def loading_time(size: int, repeats: int) -> dict:
    """Seconds to gather one batch of uint8 rows (48 and 16) from a memory-mapped cache."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _write_cache(Path(tmp) / "cache", n=512, size=size, seed=2)
        ds_t, ds_b = CacheBatchDataset(Cache(root), triplets=True), CacheBatchDataset(Cache(root), triplets=False)
        rng = np.random.default_rng(0)
        ds_t[np.arange(512)]  # page cache warm
        res = {}
        for name, ds, rows in (("dlrv", ds_t, 3 * BATCH), ("baseline", ds_b, BATCH)):
            ts = []
            for _ in range(repeats):
                idx = rng.choice(512, rows, replace=False)
                t0 = time.perf_counter()
                ds[idx]
                ts.append(time.perf_counter() - t0)
            res[name] = {"rows": rows, "batch_s": statistics.median(ts)}
        return res


# --------------------------------------------------------------------------- 4. engine epochs


def engine_epochs(backbone: str, size: int, n_train: int, n_val: int, device: str,
                  compile_mode: str | None = None) -> dict[str, dict]:
    """One real ``train()`` epoch per variant (with ``compile_mode`` also ``dlrv_compiled``); batch and validation
    wall time. The steady batch time is the median after the first batch (allocator warm-up), or after the first
    three with ``compile_mode`` (compilation, then CUDA-graph warm-up and recording)."""
    import lightning as L

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()
            self.batches: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.tb = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches.append(time.perf_counter() - self.tb)

        def on_validation_start(self, trainer, pl_module):
            self.t1 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.t2 = time.perf_counter()

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = _write_cache(Path(tmp) / "cache", n=n_train + n_val, size=size, seed=3, n_train=n_train)
        for variant in ("baseline", "dlrv") + (("dlrv_compiled",) if compile_mode else ()):
            cfg = variant_config(variant, backbone, size, device, compile_mode)
            cfg.train.max_epochs = 1
            cfg.train.accelerator = "gpu" if device == "cuda" else "cpu"
            cfg.train.devices = "1"
            cfg.data.num_workers = 0
            cfg.mining.num_positive_candidates, cfg.mining.num_negative_candidates = 50, 100
            timer = EpochTimer()
            t0 = time.perf_counter()
            result = train(cfg, cache, Path(tmp) / variant, progress="none", callbacks=[timer])
            total = time.perf_counter() - t0
            hist = read_summary(result.run_dir)["history"][0]
            rows = BATCH * (3 if cfg.loss.use_dl else 1)
            epoch_s = timer.t1 - timer.t0
            skip = 3 if variant == "dlrv_compiled" else 1
            steady = statistics.median(timer.batches[skip:] or timer.batches)
            out[variant] = {
                "anchors": n_train,
                "steps": len(timer.batches),
                "train_batches_s": epoch_s,
                "batch_s_median_after_first": steady,
                "first_batches_s": timer.batches[:skip],
                "outside_batches_s": epoch_s - sum(timer.batches),  # data loading, mining, Lightning between steps
                "validation_s": timer.t2 - timer.t1,
                "train_call_s": total,
                "images_per_s": rows / steady,
                "train_loss": hist["train_loss"],
            }
    return out


def _write_cache(root: Path, n: int, size: int, seed: int, n_train: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labels = (rng.random((n, len(FINDINGS))) < 0.2).astype(np.uint8)
    n_train = n if n_train is None else n_train
    index = pd.DataFrame({"image_id": [f"{i:08d}_000.png" for i in range(n)], "patient_id": np.arange(n),
                          "split": ["train"] * n_train + ["val"] * (n - n_train),
                          "orig_width": 1024, "orig_height": 1024})
    for j, name in enumerate(FINDINGS):
        index[name] = labels[:, j]
    write_cache(root, images, index)
    return root


# --------------------------------------------------------------------------- report


def epoch_estimate(steps: dict, mining: dict, loading: dict, n_train: int) -> dict:
    batches = math.ceil(n_train / BATCH)
    est = {}
    for variant in [v for v in ("baseline", "dlrv", "dlrv_compiled") if v in steps]:
        compute = batches * steps[variant]["step_s"]
        load = batches * loading["baseline" if variant == "baseline" else "dlrv"]["batch_s"]
        mine = mining["epoch_s"] if variant != "baseline" else 0.0
        est[variant] = {"batches": batches, "compute_s": compute, "loading_s": load, "mining_s": mine,
                        "epoch_s": compute + load + mine, "overhead_fraction": (load + mine) / compute}
    est["ratio_dlrv_over_baseline"] = est["dlrv"]["epoch_s"] / est["baseline"]["epoch_s"]
    est["step_ratio"] = steps["dlrv"]["step_s"] / steps["baseline"]["step_s"]
    return est


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="sanity run: densenet-tiny at 64 px (unless --backbone/--size), fewer repetitions")
    p.add_argument("--backbone", default=None, choices=["densenet121", "densenet-tiny"],
                   help="default densenet121 (--quick: densenet-tiny)")
    p.add_argument("--size", type=int, default=None, help="input side (default 224; --quick: 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 3; --quick: 2)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train[_quick].json)")
    p.add_argument("--devices", default=None,
                   help="comma-separated subset of cpu,cuda (default: cpu, and cuda when one is visible)")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="also time DLRV steps with train.compile in this mode (GPU: reduce-overhead = CUDA graphs)")
    p.add_argument("--no-engine", action="store_true", help="skip the real train() epochs (part 4)")
    p.add_argument("--engine-anchors", type=int, default=None,
                   help="train anchors of the part-4 epochs (default: CPU 64, --quick 48; GPU 256)")
    args = p.parse_args()
    tune_cpu_malloc()  # as the cxrloc command line does (cxrloc/malloc.py)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    args.backbone = args.backbone or ("densenet-tiny" if args.quick else "densenet121")
    args.size = args.size or (64 if args.quick else 224)
    repeats, warmup = args.repeats or (2 if args.quick else 3), 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.devices:
        devices = [d for d in args.devices.split(",") if d in devices]
        if not devices:
            p.error(f"--devices {args.devices!r}: none of them is available here")
    results: dict = {"machine": machine(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None),
                     "backbone": args.backbone, "image_size": args.size, "batch": BATCH,
                     "quick": args.quick, "compile_mode": args.compile_mode, "devices": {}}
    mining = mining_time(NIH_TRAIN, args.quick)
    loading = loading_time(args.size, repeats=20)
    results["mining"], results["loading"] = mining, loading
    for device in devices:
        reps = repeats if device == "cpu" else max(repeats, 20)  # GPU steps are short: more of them
        steps = step_times(args.backbone, args.size, device, reps, warmup, args.compile_mode)
        est = epoch_estimate(steps, mining, loading, NIH_TRAIN)
        results["devices"][device] = {"steps": steps, "epoch_estimate": est}
        if args.no_engine:
            continue
        n_train = args.engine_anchors or ((3 * BATCH if args.quick else 4 * BATCH) if device == "cpu" else 16 * BATCH)
        engine = engine_epochs(args.backbone, args.size, n_train, BATCH, device, args.compile_mode)
        engine["ratio_dlrv_over_baseline"] = engine["dlrv"]["train_batches_s"] / engine["baseline"]["train_batches_s"]
        engine["ratio_steady_batches"] = (engine["dlrv"]["batch_s_median_after_first"]
                                          / engine["baseline"]["batch_s_median_after_first"])
        if "dlrv_compiled" in engine:
            engine["speedup_compiled_over_eager_steady"] = (engine["dlrv"]["batch_s_median_after_first"]
                                                            / engine["dlrv_compiled"]["batch_s_median_after_first"])
        results["devices"][device]["engine_epoch"] = engine
    results["targets"] = {"ratio_max": TARGET_RATIO, "gpu_images_per_s_min": TARGET_GPU_IMAGES_PER_S}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"train{'_quick' if args.quick else ''}.json"
    atomic_write_json(out, results)
    _print(results)
    print(f"\nwrote {out}")


def _print(r: dict) -> None:
    m = r["machine"]
    print(f"machine: {m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}, "
          f"load {m['load_average_at_start']})" + (f", GPU {m['gpu']}" if m["gpu"] else ""))
    print(f"backbone {r['backbone']} at {r['image_size']} px, batch {r['batch']} (DLRV: 3 x {r['batch']} images)\n")
    print(f"{'device':6} {'variant':13} {'img/step':>8} {'s/step':>8} {'img/s':>8} | {'engine img/s':>12}")
    for dev, d in r["devices"].items():
        for v, s in d["steps"].items():
            e = d.get("engine_epoch", {}).get(v)
            print(f"{dev:6} {v:13} {s['images_per_step']:8d} {s['step_s']:8.3f} {s['images_per_s']:8.1f} | "
                  + (f"{e['images_per_s']:12.1f}" if e else f"{'-':>12}"))
    mn, ld = r["mining"], r["loading"]
    print(f"\nmining at {mn['anchors']:,} anchors: build {mn['build_s']:.2f} s once, {mn['epoch_s']:.2f} s per epoch")
    print(f"loading one batch from the memmap: DLRV {ld['dlrv']['batch_s'] * 1e3:.2f} ms, "
          f"baseline {ld['baseline']['batch_s'] * 1e3:.2f} ms")
    print(f"\nper epoch at {NIH_TRAIN:,} anchors ({math.ceil(NIH_TRAIN / BATCH):,} batches):")
    print(f"{'device':6} {'variant':13} {'compute s':>10} {'load s':>8} {'mine s':>8} {'overhead':>9} {'epoch s':>9}")
    for dev, d in r["devices"].items():
        est = d["epoch_estimate"]
        for v in [v for v in ("baseline", "dlrv", "dlrv_compiled") if v in est]:
            e = est[v]
            print(f"{dev:6} {v:13} {e['compute_s']:10.1f} {e['loading_s']:8.1f} {e['mining_s']:8.2f} "
                  f"{100 * e['overhead_fraction']:8.2f}% {e['epoch_s']:9.1f}")
        print(f"{dev:6} DLRV / baseline per epoch: {est['ratio_dlrv_over_baseline']:.2f}x (step ratio "
              f"{est['step_ratio']:.2f}x); target <= {TARGET_RATIO}x")
        eng = d.get("engine_epoch")
        if eng:
            print(f"{dev:6} engine epoch of {eng['dlrv']['anchors']} anchors: DLRV/baseline {eng['ratio_dlrv_over_baseline']:.2f}x "
                  f"(steady batches {eng['ratio_steady_batches']:.2f}x); time outside the batches: baseline "
                  f"{eng['baseline']['outside_batches_s']:.2f} s, DLRV {eng['dlrv']['outside_batches_s']:.2f} s")
        if dev == "cuda":
            for v in [v for v in ("dlrv", "dlrv_compiled") if v in d["steps"]]:
                print(f"cuda   {v} images/s {d['steps'][v]['images_per_s']:.0f} (target >= {TARGET_GPU_IMAGES_PER_S}); "
                      f"30 epochs of DLRV: {30 * est[v]['epoch_s'] / 3600:.2f} h")


if __name__ == "__main__":
    main()
