"""Benchmark the data layer: cache building (decode + resize of real 1024 PNGs) and training-batch reading.

Measures, in one run on this machine:

1. Decode + resize of the real ChestX-ray14 originals (the 10 sample PNGs,
   1024x1024, repeated to ``--items``) into a partial cache, as ``prepare``'s
   workers do it (``process_chunk``): 1 worker in-process, and 2 workers in a
   warmed-up process pool. Images/s, images/s per worker, and the 2-worker speed-up.
   Also the end-to-end ``prepare_cache`` wall time (CSV reading, validation,
   pool start-up, finalisation and checksums included) with 1 and 2 workers.
2. Training batches (batch 32, 224x224, random +-5 degree rotation and flip),
   all in one process with one torch thread:
   a) cache rows gathered per batch (``load_batch``) + ``batch_transform`` on the
      batch tensor on the CPU (the training engine runs it on the GPU; the CPU-side
      cost there is the read alone, reported as well),
   b) cache rows via DataLoader + per-sample ``train_transform``,
   c) decoding the original PNG per sample + the same per-sample transform.
   Ratios a/c and b/c.

Targets (issue 2): >= 75 images/s per core; >= 1.8x with 2 workers; cache batches
>= 20x faster than decoding PNGs per sample.

Usage:
    .venv/bin/python benchmarks/prepare.py [--items 200] [--out benchmarks/results/prepare.json]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _machine import machine
from torch.utils.data import DataLoader, Dataset

from cxrloc.config import DataConfig
from cxrloc.data.cache import Cache
from cxrloc.data.dataset import CacheDataset, load_batch
from cxrloc.data.io import read_image
from cxrloc.data.prepare import prepare_cache
from cxrloc.data.prepare_worker import close_partial, process_chunk, worker_init
from cxrloc.data.transforms import batch_transform, train_transform
from cxrloc.fileio import atomic_write_json

DEFAULT_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14"
CHUNK = 20


def _chunks(paths: list[str], partial: str, size: int) -> list[tuple]:
    return [(partial, k, s, paths[s : s + CHUNK], size) for k, s in enumerate(range(0, len(paths), CHUNK))]


def _new_partial(path: Path, n: int, size: int) -> str:
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size))
    del arr
    return str(path)


def bench_decode(paths: list[str], tmp: Path, size: int, repeats: int) -> dict:
    """Images/s of decode + resize + write into the memmap (the prepare workers' loop)."""
    n = len(paths)
    partial = _new_partial(tmp / "one.npy", n, size)
    process_chunk(*_chunks(paths[:CHUNK], partial, size)[0])  # warm the page cache and imports
    best1, cpu1 = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for task in _chunks(paths, partial, size):
            process_chunk(*task)
        best1, cpu1 = min(best1, time.perf_counter() - t0), min(cpu1, time.process_time() - c0)
    close_partial(partial)
    partial2 = _new_partial(tmp / "two.npy", n, size)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=worker_init, initargs=(os.getpid(),)) as pool:
        list(pool.map(process_chunk, *zip(*_chunks(paths[: 2 * CHUNK], partial2, size), strict=True)))  # start + warm
        best2 = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(process_chunk, *zip(*_chunks(paths, partial2, size), strict=True)))
            best2 = min(best2, time.perf_counter() - t0)
    one, two = np.load(tmp / "one.npy", mmap_mode="r"), np.load(tmp / "two.npy", mmap_mode="r")
    assert np.array_equal(one, two), "1 and 2 workers wrote different rows"
    return {
        "items": n,
        "size": size,
        "workers_1_images_per_s": n / best1,
        "workers_1_images_per_cpu_s": n / cpu1,
        "workers_2_images_per_s": n / best2,
        "workers_2_images_per_s_per_worker": n / best2 / 2,
        "speedup_2_workers": best1 / best2,
    }


def make_folder(sample: Path, root: Path, items: int) -> Path:
    """A ChestX-ray14-layout folder of ``items`` symlinks to the real originals (for end-to-end timing)."""
    originals = sorted((sample / "images").glob("*.png"))
    (root / "images").mkdir(parents=True)
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    names = []
    for i in range(items):
        name = f"{i:08d}_000.png"
        os.symlink(originals[i % len(originals)], root / "images" / name)
        lines.append(f"{name},No Finding,0,{i}")
        names.append(name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(names[: items * 3 // 4]))
    (root / "test_list.txt").write_text("\n".join(names[items * 3 // 4 :]))
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    return root


def bench_prepare(folder: Path, tmp: Path, size: int) -> dict:
    out = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        result = prepare_cache(folder, tmp / f"cache{workers}", size=size, workers=workers, progress=False)
        out[f"prepare_end_to_end_workers_{workers}_s"] = time.perf_counter() - t0
        out[f"prepare_end_to_end_workers_{workers}_images_per_s"] = len(result.cache) / out[f"prepare_end_to_end_workers_{workers}_s"]
    t0 = time.perf_counter()
    assert prepare_cache(folder, tmp / "cache2", size=size, workers=2, progress=False).up_to_date
    out["prepare_noop_rerun_s"] = time.perf_counter() - t0
    return out


class PngDataset(Dataset):
    """Decode the original PNG for every sample (the baseline the cache replaces)."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.transform(read_image(self.paths[i])), "index": i}


def _rate(loader: DataLoader, batches: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process); no loader workers."""
    it = iter(loader)
    next(it)  # warm-up (page cache, first allocation)
    seen, t0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - t0), seen / (time.process_time() - c0)


def _timed(fn, batches: int, batch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process)."""
    fn()  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        fn()
    return batches * batch / (time.perf_counter() - t0), batches * batch / (time.process_time() - c0)


def bench_batches(cache_root: Path, paths: list[str], batch: int, batches: int, png_batches: int) -> dict:
    cfg = DataConfig()
    cache = Cache(cache_root)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)

    def rows() -> np.ndarray:
        return rng.choice(len(cache), batch, replace=False)

    loader_only, loader_only_cpu = _timed(lambda: load_batch(cache, rows()), batches, batch)
    batched, batched_cpu = _timed(lambda: batch_transform(load_batch(cache, rows())["image"], cfg, train=True, generator=gen), batches, batch)
    per_sample = DataLoader(CacheDataset(cache, transform=train_transform(cfg)), batch_size=batch, shuffle=True, drop_last=True)
    b, b_cpu = _rate(per_sample, batches)
    png = DataLoader(PngDataset(paths, train_transform(cfg)), batch_size=batch, shuffle=True, drop_last=True)
    c, c_cpu = _rate(png, png_batches)
    return {
        "batch_size": batch,
        "image_size": cfg.image_size,
        "cache_read_only_images_per_s": loader_only,
        "cache_batch_augment_images_per_s": batched,
        "cache_per_sample_transform_images_per_s": b,
        "png_decode_per_sample_images_per_s": c,
        "ratio_cache_batch_vs_png": batched / c,
        "ratio_cache_per_sample_vs_png": b / c,
        "ratio_cache_read_only_vs_png": loader_only / c,
        "cpu_time_based": {  # images per CPU second: less sensitive to other jobs sharing the cores
            "cache_read_only_images_per_cpu_s": loader_only_cpu,
            "cache_batch_augment_images_per_cpu_s": batched_cpu,
            "cache_per_sample_transform_images_per_cpu_s": b_cpu,
            "png_decode_per_sample_images_per_cpu_s": c_cpu,
            "ratio_cache_batch_vs_png": batched_cpu / c_cpu,
            "ratio_cache_per_sample_vs_png": b_cpu / c_cpu,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=Path(os.environ.get("CXRLOC_SAMPLE_DIR", DEFAULT_SAMPLE)))
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--png-batches", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prepare.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core numbers; the real engine runs batch_transform on the GPU
    originals = sorted(str(p) for p in (args.sample / "images").glob("*.png"))
    if not originals:
        print(f"no PNGs under {args.sample / 'images'} (set --sample or CXRLOC_SAMPLE_DIR)", file=sys.stderr)
        return 2
    paths = [originals[i % len(originals)] for i in range(args.items)]
    info = machine()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        decode = bench_decode(paths, tmp, args.size, args.repeats)
        folder = make_folder(args.sample, tmp / "dataset", args.items)
        end_to_end = bench_prepare(folder, tmp, args.size)
        batches = bench_batches(tmp / "cache1", paths, 32, args.batches, args.png_batches)
    targets = {
        "per_core_images_per_s>=75": decode["workers_1_images_per_s"] >= 75,
        "speedup_2_workers>=1.8": decode["speedup_2_workers"] >= 1.8,
        "cache_batches_vs_png>=20x": batches["ratio_cache_batch_vs_png"] >= 20,
    }
    result = {"machine": info, "decode_resize": decode, "prepare": end_to_end, "batches": batches, "targets_met": targets}
    rows = [
        (f"decode+resize 1024->{args.size}, 1 worker", f"{decode['workers_1_images_per_s']:.1f} img/s"),
        ("  same, per CPU second", f"{decode['workers_1_images_per_cpu_s']:.1f} img/s"),
        ("decode+resize, 2 workers", f"{decode['workers_2_images_per_s']:.1f} img/s ({decode['speedup_2_workers']:.2f}x)"),
        ("prepare end-to-end, 1 worker", f"{end_to_end['prepare_end_to_end_workers_1_images_per_s']:.1f} img/s ({end_to_end['prepare_end_to_end_workers_1_s']:.2f} s)"),
        ("prepare end-to-end, 2 workers", f"{end_to_end['prepare_end_to_end_workers_2_images_per_s']:.1f} img/s ({end_to_end['prepare_end_to_end_workers_2_s']:.2f} s)"),
        ("prepare no-op rerun", f"{end_to_end['prepare_noop_rerun_s']:.2f} s"),
        ("batches: cache read only (augment on GPU)", f"{batches['cache_read_only_images_per_s']:.0f} img/s ({batches['ratio_cache_read_only_vs_png']:.0f}x PNG)"),
        ("batches: cache + batch augment (CPU)", f"{batches['cache_batch_augment_images_per_s']:.0f} img/s ({batches['ratio_cache_batch_vs_png']:.1f}x PNG)"),
        ("batches: cache + per-sample transform", f"{batches['cache_per_sample_transform_images_per_s']:.0f} img/s ({batches['ratio_cache_per_sample_vs_png']:.1f}x PNG)"),
        ("batches: PNG decode per sample", f"{batches['png_decode_per_sample_images_per_s']:.1f} img/s"),
        ("  per CPU second: cache + batch augment / PNG", f"{batches['cpu_time_based']['cache_batch_augment_images_per_cpu_s']:.0f} / {batches['cpu_time_based']['png_decode_per_sample_images_per_cpu_s']:.1f} img/s ({batches['cpu_time_based']['ratio_cache_batch_vs_png']:.1f}x)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_average_at_start'][0]:.2f}, torch threads 1")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
