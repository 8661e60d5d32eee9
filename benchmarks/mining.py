"""Benchmark hard-example mining: pHash index build speed and one epoch of triplet mining at ChestX-ray14 scale.

Measures, in one run on this machine:

1. ``phash_index`` over a prepared cache (``write_cache`` of N synthetic 256x256 images)
   for each resize engine (``int8``, the default, and ``float64``; both exact), in
   images per wall-clock second and per process CPU second (the machine is shared:
   the load average before and after is recorded), with the ratio between them
   measured in the same run; against ``imagehash.phash`` on the same cached images
   and on decoded original PNGs (the real sample, 1024x1024); plus the agreement
   with imagehash on 1,000 benchmark images and on the real sample (originals and
   resized to the cache size as ``cxrloc prepare`` does).
2. ``TripletMiner``: construction and one epoch of mining for 78,000 anchors whose
   label sets are drawn from the real ``Data_Entry_2017_v2020.csv.gz`` (random hashes),
   for the curriculum's first epoch, a middle one, a hard one, the ``random``
   ordering and the ``exact`` positive mode.

Targets (issue 5): pHash index >= 20,000 images/s; one epoch <= 10 s on 2 cores.

Usage:
    .venv/bin/python benchmarks/mining.py [--images 4096] [--anchors 78000] [--out benchmarks/results/mining.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from _machine import machine
from PIL import Image

from cxrloc.config import MiningConfig
from cxrloc.data.cache import write_cache
from cxrloc.data.io import resize_gray
from cxrloc.fileio import atomic_write_json
from cxrloc.labels import encode
from cxrloc.mining import TripletMiner, hamming, phash_batch, phash_index
from cxrloc.mining import phash as ph

DEFAULT_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14"


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, size, size) uint8 natural-looking images: random low-frequency cosine mixtures plus noise."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, np.pi, size)
    k = 6
    freqs_y = rng.uniform(0, 4, (n, k, 1))
    freqs_x = rng.uniform(0, 4, (n, k, 1))
    rows = np.cos(freqs_y * t + rng.uniform(0, np.pi, (n, k, 1)))  # (n, k, size)
    cols = np.cos(freqs_x * t + rng.uniform(0, np.pi, (n, k, 1)))
    amps = rng.normal(size=(n, k, 1))
    img = np.matmul((rows * amps).transpose(0, 2, 1), cols)  # (n, size, size)
    img += rng.normal(0, 0.05, img.shape)
    lo, hi = img.min(axis=(1, 2), keepdims=True), img.max(axis=(1, 2), keepdims=True)
    return ((img - lo) / (hi - lo + 1e-9) * 255).astype(np.uint8)


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    dist = hamming(ours, ref).astype(int)
    return {"images": len(dist), "equal_fraction": float(np.mean(dist == 0)),
            "mean_bits": float(dist.mean()), "max_bits": int(dist.max())}


def _reference(images) -> np.ndarray:
    return np.array([int(str(imagehash.phash(Image.fromarray(x))), 16) for x in images], dtype=np.uint64)


def bench_phash(n_images: int, size: int, sample_dir: Path, repeats: int) -> dict:
    """Index build per engine (wall and process CPU time, engines interleaved so both see the same load)."""
    images = smooth_images(n_images, size)
    index = pd.DataFrame({
        "image_id": [f"{i:08d}_000.png" for i in range(n_images)], "patient_id": np.arange(n_images),
        "split": "train", "orig_width": 1024, "orig_height": 1024, "labels": "No Finding",
    })
    default = ph._engine("auto")
    engines = [default] + [e for e in ("int8", "float64") if e != default and (e != "int8" or ph._int8_works())]
    res: dict = {"images": n_images, "size": size, "default_engine": default,
                 "load_average_before": os.getloadavg()}
    runs: dict = {e: {"wall_s": [], "cpu_s": []} for e in engines}
    hashes: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(Path(tmp) / "cache", images, index)
        for e in engines:
            phash_batch(images[:64], e)  # warm-up (torch/oneDNN initialisation)
        for _ in range(repeats):
            for e in engines:
                for name in (ph.INDEX_FILE, ph.INDEX_META):
                    (cache.root / name).unlink(missing_ok=True)
                t0, c0 = time.perf_counter(), time.process_time()
                hashes[e] = phash_index(cache, progress=False, engine=e)
                runs[e]["wall_s"].append(time.perf_counter() - t0)
                runs[e]["cpu_s"].append(time.process_time() - c0)
        t0 = time.perf_counter()
        phash_index(cache, progress=False)
        res["index_reuse_s"] = time.perf_counter() - t0
        # the alternative: one batch at a time on torch's intra-op threads
        torch_times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for start in range(0, n_images, 64):
                phash_batch(cache.images[start : start + 64])
            torch_times.append(time.perf_counter() - t0)
    res["load_average_after"] = os.getloadavg()
    res["engines"] = {}
    for e, r in runs.items():
        wall, cpu = statistics.median(r["wall_s"]), statistics.median(r["cpu_s"])
        res["engines"][e] = {"images_per_s": _rate(n_images, wall), "images_per_cpu_s": _rate(n_images, cpu),
                             "cpu_utilisation": cpu / wall, "wall_s_all": r["wall_s"], "cpu_s_all": r["cpu_s"]}
    d = res["engines"][default]
    res["intra_op_threads_images_per_s"] = _rate(n_images, statistics.median(torch_times))
    res["index_build_s"] = statistics.median(runs[default]["wall_s"])
    res["index_build_s_all"] = runs[default]["wall_s"]
    res["ours_images_per_s"] = d["images_per_s"]
    res["ours_images_per_cpu_s"] = d["images_per_cpu_s"]
    if "float64" in res["engines"] and default != "float64":
        f = res["engines"]["float64"]
        res["default_over_float64"] = {"wall": d["images_per_s"] / f["images_per_s"],
                                       "cpu": d["images_per_cpu_s"] / f["images_per_cpu_s"]}

    n_ref = min(n_images, 1000)
    t0 = time.perf_counter()
    ref = _reference(images[:n_ref])
    res["imagehash_cache_images_per_s"] = _rate(n_ref, time.perf_counter() - t0)
    res["agreement"] = _agreement(hashes[default][:n_ref], ref)  # synthetic, default engine
    res["agreement_by_engine"] = {"synthetic_256": {e: _agreement(h[:n_ref], ref) for e, h in hashes.items()}}

    pngs = sorted((sample_dir / "images").glob("*.png"))
    if pngs:
        t0 = time.perf_counter()
        originals = []
        for p in pngs:
            with Image.open(p) as im:
                gray = im.convert("L")
                imagehash.phash(gray)
                originals.append(np.asarray(gray))
        res["imagehash_png_images_per_s"] = _rate(len(pngs), time.perf_counter() - t0)
        res["png_images"] = len(pngs)
        originals = np.stack(originals)
        cached = np.stack([resize_gray(x, size) for x in originals])  # as `cxrloc prepare` stores them
        for name, arr in ((f"real_original_{originals.shape[1]}", originals), (f"real_cached_{size}", cached)):
            ref = _reference(arr)
            res["agreement_by_engine"][name] = {e: _agreement(phash_batch(arr, e), ref) for e in engines}
    res["speedup_vs_imagehash_cache"] = res["ours_images_per_s"] / res["imagehash_cache_images_per_s"]
    if "imagehash_png_images_per_s" in res:
        res["speedup_vs_imagehash_png"] = res["ours_images_per_s"] / res["imagehash_png_images_per_s"]
    return res


def bench_mining(n_anchors: int, sample_dir: Path, seed: int = 0) -> dict:
    entry = sample_dir / "Data_Entry_2017_v2020.csv.gz"
    if not entry.exists():
        raise SystemExit(f"{entry}: missing (needed for the real label statistics; pass --sample-dir)")
    findings = pd.read_csv(entry, usecols=["Finding Labels"])["Finding Labels"].to_numpy()
    rng = np.random.default_rng(seed)
    drawn = findings[rng.choice(len(findings), n_anchors, replace=n_anchors > len(findings))]
    uniq, inverse = np.unique(drawn, return_inverse=True)
    labels = np.stack([encode(s) for s in uniq])[inverse]
    hashes = rng.integers(0, 2**64 - 1, n_anchors, dtype=np.uint64, endpoint=True)
    train = np.arange(n_anchors)
    res: dict = {"anchors": n_anchors, "label_source": entry.name}
    runs = [
        ("phash, partial, epoch 0", MiningConfig(), 0),
        ("phash, partial, epoch 5", MiningConfig(), 5),
        ("phash, partial, epoch 12", MiningConfig(), 12),
        ("random, partial, epoch 12", MiningConfig(ordering="random"), 12),
        ("phash, exact, epoch 12", MiningConfig(positive_mode="exact"), 12),
    ]
    res["runs"] = []
    for name, cfg, epoch in runs:
        t0 = time.perf_counter()
        miner = TripletMiner(labels, hashes, train, cfg, seed=seed)
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        triplets = miner.epoch_triplets(epoch)
        t_epoch = time.perf_counter() - t0
        assert triplets.shape == (n_anchors, 3)
        res["runs"].append({"name": name, "init_s": t_init, "epoch_s": t_epoch,
                            "pos_distance_mean": float(hamming(hashes[triplets[:, 0]], hashes[triplets[:, 1]]).mean()),
                            "neg_distance_mean": float(hamming(hashes[triplets[:, 0]], hashes[triplets[:, 2]]).mean())})
        if name.startswith("phash, partial, epoch 0"):
            res["report"] = {k: v for k, v in miner.report.to_dict().items() if not k.startswith("fallback")}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096, help="images in the benchmark cache")
    ap.add_argument("--size", type=int, default=256, help="side of the cached images")
    ap.add_argument("--repeats", type=int, default=3, help="index builds (median reported)")
    ap.add_argument("--anchors", type=int, default=78000, help="training anchors to mine")
    ap.add_argument("--sample-dir", type=Path, default=Path(os.environ.get("CXRLOC_SAMPLE_DIR", DEFAULT_SAMPLE)))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mining.json")
    args = ap.parse_args()

    result = {"machine": machine(note="shared machine: other jobs may have been running")}
    result["phash"] = p = bench_phash(args.images, args.size, args.sample_dir, args.repeats)
    result["mining"] = m = bench_mining(args.anchors, args.sample_dir)
    result["targets"] = {
        "phash_images_per_s": 20000, "phash_met": p["ours_images_per_s"] >= 20000,
        "epoch_s": 10.0, "epoch_met": max(r["epoch_s"] + r["init_s"] for r in m["runs"]) <= 10.0,
    }

    print(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"torch threads {result['machine']['torch_threads']}, load {result['machine']['load_average_at_start']}")
    print(f"\npHash ({p['images']} cached {p['size']}x{p['size']} images; load average "
          f"{p['load_average_before'][0]:.2f} before, {p['load_average_after'][0]:.2f} after)")
    print(f"  {'method':<42}{'images/s':>12}{'per CPU s':>11}{'ratio':>9}")
    base = p["ours_images_per_s"]
    for e, r in p["engines"].items():
        label = f"phash_index, {e} engine" + (" (default)" if e == p["default_engine"] else "") + ", exact"
        print(f"  {label:<42}{r['images_per_s']:>12,.0f}{r['images_per_cpu_s']:>11,.0f}{r['images_per_s'] / base:>9.2f}")
    print(f"  {'  (batches on torch intra-op threads)':<42}{p['intra_op_threads_images_per_s']:>12,.0f}{'':>11}"
          f"{p['intra_op_threads_images_per_s'] / base:>9.2f}")
    print(f"  {'imagehash.phash (same cached images)':<42}{p['imagehash_cache_images_per_s']:>12,.0f}{'':>11}"
          f"{p['imagehash_cache_images_per_s'] / base:>9.4f}")
    if "imagehash_png_images_per_s" in p:
        print(f"  {'imagehash.phash (decode 1024 PNG)':<42}{p['imagehash_png_images_per_s']:>12,.1f}{'':>11}"
              f"{p['imagehash_png_images_per_s'] / base:>9.5f}")
    if "default_over_float64" in p:
        q = p["default_over_float64"]
        print(f"  default / float64 engine: {q['wall']:.2f}x wall, {q['cpu']:.2f}x CPU time (same run)")
    for name, by_engine in p["agreement_by_engine"].items():
        for e, a in by_engine.items():
            print(f"  agreement with imagehash, {name}, {e}: {a['images']} images, {a['equal_fraction']:.1%} equal, "
                  f"mean {a['mean_bits']:.3f} bits, max {a['max_bits']}")
    print(f"  stored index reload {p['index_reuse_s'] * 1000:.1f} ms")
    r = m["report"]
    print(f"\nTriplet mining ({m['anchors']:,} anchors, {r['num_label_sets']} label sets from {m['label_source']}; "
          f"{r['mean_positive_candidates']:.0f} pos / {r['mean_negative_candidates']:.0f} neg candidates per anchor)")
    print(f"  {'run':<30}{'init s':>9}{'epoch s':>9}{'d(a,p)':>9}{'d(a,n)':>9}")
    for run in m["runs"]:
        print(f"  {run['name']:<30}{run['init_s']:>9.2f}{run['epoch_s']:>9.2f}"
              f"{run['pos_distance_mean']:>9.1f}{run['neg_distance_mean']:>9.1f}")
    t = result["targets"]
    print(f"\ntargets: pHash >= 20,000 images/s: {'met' if t['phash_met'] else 'NOT met'}; "
          f"epoch <= 10 s: {'met' if t['epoch_met'] else 'NOT met'}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
