"""Benchmark the synthetic phantom generator (`cxrloc synth`) and measure how hard its difficulties are.

Measures, in one run on this machine:

1. Speed at 256x256 (issue 3 target: >= 200 images/s on one core):
   a) rendering alone (``render_job``: phantom sampling + render, no file),
   b) PNG encoding alone (our Up-filter + Huffman encoder vs Pillow's ``save``),
   c) the whole ``generate_dataset`` (render + encode + write + CSVs) with 1 worker
      (wall and CPU time) and with 2 workers (wall; process-pool start-up included),
   and the ratios: images/s against the 200/s target, 2 workers against 1, our PNG
   encoder against Pillow's.
2. Difficulty (issue 3: "hard" must not be solvable by a linear probe on raw pixels):
   for easy / medium / hard, a dataset of ``--probe-images`` images at 128 px (seed 1),
   an L2 logistic regression per finding on the standardised 32x32 downsampled pixels of
   the train_val split, ROC AUC on the test split; the best mean AUC over a small grid of
   regularisation strengths is reported (chosen on the test split: an optimistic probe).

Usage:
    .venv/bin/python benchmarks/synth.py [--images 600] [--probe-images 3000] [--out benchmarks/results/synth.json]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from _machine import machine
from PIL import Image

from cxrloc.data.synth.cohort import plan_cohort
from cxrloc.data.synth.generator import generate_dataset, render_job
from cxrloc.data.synth.probe import linear_probe
from cxrloc.data.synth.writer import encode_png_gray
from cxrloc.fileio import atomic_write_json
from cxrloc.labels import SHORT_NAMES
from cxrloc.malloc import tune_cpu_malloc

TARGET_PER_CORE = 200.0


def speed(n_images: int, size: int) -> dict:
    tune_cpu_malloc()
    jobs = plan_cohort(n_images, seed=0)
    render_job(jobs[0], size, 0)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    images = [render_job(j, size, 0)[0] for j in jobs]
    render_wall, render_cpu = time.perf_counter() - t0, time.process_time() - c0

    c0 = time.process_time()
    encoded = [encode_png_gray(im) for im in images]
    ours_cpu = time.process_time() - c0
    c0 = time.process_time()
    for im in images:
        Image.fromarray(im).save(io.BytesIO(), format="PNG")
    pillow_cpu = time.process_time() - c0
    pillow_size = len((lambda b: (Image.fromarray(images[0]).save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()))

    out: dict = {
        "size": size,
        "images": n_images,
        "render_only": {"wall_s": render_wall, "cpu_s": render_cpu, "images_per_s_cpu": n_images / render_cpu},
        "png_encode": {
            "ours_ms_per_image_cpu": 1e3 * ours_cpu / n_images,
            "pillow_ms_per_image_cpu": 1e3 * pillow_cpu / n_images,
            "speedup_vs_pillow": pillow_cpu / ours_cpu,
            "ours_bytes_first_image": len(encoded[0]),
            "pillow_bytes_first_image": pillow_size,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        c0, t0 = time.process_time(), time.perf_counter()
        generate_dataset(Path(tmp) / "w1", n_images, size=size, seed=0, workers=1, progress=False)
        wall1, cpu1 = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        generate_dataset(Path(tmp) / "w2", n_images, size=size, seed=0, workers=2, progress=False)
        wall2 = time.perf_counter() - t0
    out["generate_1_worker"] = {"wall_s": wall1, "cpu_s": cpu1, "images_per_s_wall": n_images / wall1,
                                "images_per_s_cpu": n_images / cpu1}
    out["generate_2_workers"] = {"wall_s": wall2, "images_per_s_wall": n_images / wall2}
    out["ratios"] = {
        "one_core_cpu_vs_target_200": (n_images / cpu1) / TARGET_PER_CORE,
        "one_core_wall_vs_target_200": (n_images / wall1) / TARGET_PER_CORE,
        "two_workers_vs_one_wall": wall1 / wall2,
    }
    return out


def probes(n_images: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for difficulty in ("easy", "medium", "hard"):
            root = Path(tmp) / difficulty
            generate_dataset(root, n_images, size=128, seed=1, difficulty=difficulty, workers=1, progress=False)
            out[difficulty] = linear_probe(root)
            print(f"  linear probe {difficulty}: mean AUC {out[difficulty]['mean_auc']:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600, help="images for the speed measurement (default 600)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--probe-images", type=int, default=3000, help="images per difficulty for the linear probe (0: skip)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "synth.json"))
    args = ap.parse_args()

    result = {"benchmark": "synth", "machine": machine()}
    result["speed"] = s = speed(args.images, args.size)
    print(f"synth speed at {args.size}x{args.size}, {args.images} images ({result['machine']['cpu']}, "
          f"load {result['machine']['load_average_at_start'][0]:.1f}):")
    print(f"  {'measurement':44s} {'images/s':>10s}")
    print(f"  {'render only (CPU time)':44s} {s['render_only']['images_per_s_cpu']:10.0f}")
    print(f"  {'generate_dataset, 1 worker (CPU time)':44s} {s['generate_1_worker']['images_per_s_cpu']:10.0f}")
    print(f"  {'generate_dataset, 1 worker (wall)':44s} {s['generate_1_worker']['images_per_s_wall']:10.0f}")
    print(f"  {'generate_dataset, 2 workers (wall)':44s} {s['generate_2_workers']['images_per_s_wall']:10.0f}")
    png = s["png_encode"]
    print(f"  PNG encode: ours {png['ours_ms_per_image_cpu']:.2f} ms, Pillow {png['pillow_ms_per_image_cpu']:.2f} ms "
          f"({png['speedup_vs_pillow']:.1f}x); bytes {png['ours_bytes_first_image']} vs {png['pillow_bytes_first_image']}")
    r = s["ratios"]
    print(f"  ratios: 1 core CPU / target 200 = {r['one_core_cpu_vs_target_200']:.2f}, "
          f"wall / target = {r['one_core_wall_vs_target_200']:.2f}, 2 workers / 1 = {r['two_workers_vs_one_wall']:.2f}x")
    if args.probe_images:
        print(f"linear probe (logistic regression on 32x32 pixels, {args.probe_images} images at 128 px per difficulty):")
        result["linear_probe"] = probes(args.probe_images)
        print(f"  {'difficulty':10s} {'mean AUC':>8s}  per finding")
        for d, p in result["linear_probe"].items():
            per = " ".join(f"{SHORT_NAMES[f]} {a:.2f}" for f, a in p["auc"].items())
            print(f"  {d:10s} {p['mean_auc']:8.3f}  {per}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
