"""Benchmark evaluation and prediction.

Measures, in one run on this machine:

1. Scoring a full official test split from cached predictions (random numbers of the right
   shapes): 25,596 images x 14 findings with 1,000 patient-level bootstrap resamples
   (2,797 patients), and 984 ground-truth boxes on 880 images (7 x 7 eq. 11 maps upsampled
   to 1024 x 1024) at the 20 CAM thresholds with the 10-fold threshold search; the whole of
   ``evaluate_predictions``; and the box extraction against a brute-force reference
   (threshold the full upsampled map, ``scipy.ndimage.label``) on a subset, as a ratio; and
   ``cxrloc compare`` of two such runs (``compare_runs``: both scored again, paired bootstrap).
2. ``predict`` end to end (decode, network, maps, boxes, JSON) with DenseNet-121 at 224
   (random weights) on 1024 x 1024 PNGs (copies of the real sample's originals): images/s
   for a plain setting (NCHW float32, inline decoding) and faster ones (channels_last,
   decoding in a thread pool one batch ahead, bf16 autocast), and with overlays.

Targets (issue 7): scoring <= 30 s on 2 cores including 1,000 resamples; predict >= 15 images/s.

Usage:
    .venv/bin/python benchmarks/evaluate.py [--predict-images 64] [--out benchmarks/results/evaluate.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _machine import machine
from scipy import ndimage

from cxrloc.config import Config, EvalConfig, load_config
from cxrloc.evaluate.auc import bootstrap_auc
from cxrloc.evaluate.boxes import boxes_from_map, upsample_map
from cxrloc.evaluate.compare import EvaluatedRun, compare_runs
from cxrloc.evaluate.localization import cross_validate_threshold, score_boxes
from cxrloc.evaluate.runner import Predictions
from cxrloc.evaluate.scoring import evaluate_predictions
from cxrloc.export import export_onnx
from cxrloc.fileio import atomic_write_json
from cxrloc.labels import BOX_FINDINGS
from cxrloc.malloc import tune_cpu_malloc
from cxrloc.model import build_model, save_checkpoint
from cxrloc.predict import Predictor, load_onnx_predictor, predict_files

DEFAULT_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14"
#: approximate prevalence per finding on the official test split (paper order)
PREVALENCE = np.array([0.12, 0.04, 0.18, 0.24, 0.07, 0.06, 0.02, 0.11, 0.07, 0.04, 0.04, 0.02, 0.04, 0.003])


def smooth_maps(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 14, 7, 7) CAM-like maps: smoothed noise, min-max normalised per map."""
    x = torch.from_numpy(rng.random((n * 14, 1, 7, 7))).float()
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False) ** 2
    x = x.view(n, 14, 49)
    x = (x - x.min(-1, keepdim=True).values) / (x.max(-1, keepdim=True).values - x.min(-1, keepdim=True).values)
    return x.view(n, 14, 7, 7).numpy()


def synthetic_test_split(rng: np.random.Generator, n: int = 25_596, patients: int = 2_797,
                         box_images: int = 880, boxes: int = 984) -> tuple[Predictions, pd.DataFrame]:
    ids = np.array([f"{i:08d}_000.png" for i in range(n)])
    labels = (rng.random((n, 14)) < PREVALENCE).astype(np.uint8)
    probs = (1 / (1 + np.exp(-(rng.normal(size=(n, 14)) + 1.2 * labels - 1.5)))).astype(np.float32)
    box_img = np.sort(rng.choice(n, box_images, replace=False))
    extra = rng.choice(box_images, boxes - box_images, replace=False)
    owners = np.r_[np.arange(box_images), extra]
    gt = pd.DataFrame({
        "image_id": ids[box_img[owners]],
        "finding": [BOX_FINDINGS[k] for k in rng.integers(0, 8, boxes)],
        "x": rng.uniform(0, 700, boxes), "y": rng.uniform(0, 700, boxes),
        "w": rng.uniform(30, 320, boxes), "h": rng.uniform(30, 320, boxes),
    })
    preds = Predictions(
        image_ids=ids, patient_ids=np.sort(rng.integers(0, patients, n)), rows=np.arange(n), labels=labels,
        probs=probs, logits=probs, orig_sizes=np.full((n, 2), 1024), map_index=box_img,
        maps=smooth_maps(rng, box_images), meta={"split": "test"},
    )
    return preds, gt


def brute_force_max_component(grid: np.ndarray, size: tuple[int, int], ts: np.ndarray) -> list[np.ndarray]:
    """The slow reference: upsample to full size, threshold, label pixels, box of the max's component."""
    U = upsample_map(grid, size)
    r, c = np.unravel_index(np.argmax(U), U.shape)
    out = []
    for t in ts:
        lab, _ = ndimage.label(U > t)
        comp = lab == lab[r, c]
        rows, cols = np.flatnonzero(comp.any(1)), np.flatnonzero(comp.any(0))
        out.append(np.array([[cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]]) if len(rows) else None)
    return out


def bench_scoring(rng: np.random.Generator, resamples: int) -> dict:
    preds, gt = synthetic_test_split(rng)
    cfg = EvalConfig(bootstrap=resamples)
    res: dict = {"images": len(preds), "findings": 14, "patients": int(len(np.unique(preds.patient_ids))),
                 "boxes": len(gt), "box_images": len(preds.map_index), "bootstrap_resamples": resamples,
                 "cam_thresholds": len(np.unique(np.r_[cfg.threshold_grid, cfg.map_threshold]))}
    t = time.perf_counter()
    bootstrap_auc(preds.labels, preds.probs, preds.patient_ids, n_resamples=resamples, seed=0)
    res["auc_bootstrap_s"] = time.perf_counter() - t
    ts = np.unique(np.r_[cfg.threshold_grid, cfg.map_threshold])
    t = time.perf_counter()
    scores = score_boxes(gt, preds.grid_map, preds.size_of, ts, "max_component", progress=False)
    res["boxes_all_thresholds_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cross_validate_threshold(scores, 10, 0)
    res["cv_threshold_search_s"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_predictions(preds, gt, cfg, progress=False)
    res["evaluate_predictions_total_s"] = time.perf_counter() - t
    # `cxrloc compare` of two runs on this split (the second: other scores and maps), paired bootstrap
    other = replace(preds, probs=np.clip(preds.probs + rng.normal(0, 0.05, preds.probs.shape), 0, 1).astype(np.float32),
                    maps=smooth_maps(rng, len(preds.map_index)), _pos=None, _map_pos=None)
    eval_dict = Config(eval=cfg).to_dict()["eval"]
    runs = [EvaluatedRun(name, Path(name), {"variant": name, "config": {"eval": eval_dict}}, p)
            for name, p in (("dlrv", preds), ("other", other))]
    t = time.perf_counter()
    compare_runs(runs, gt, resamples=resamples)
    res["compare_two_runs_s"] = time.perf_counter() - t
    for mode in ("all", "components"):
        t = time.perf_counter()
        score_boxes(gt, preds.grid_map, preds.size_of, ts, mode, progress=False)
        res[f"boxes_{mode}_s"] = time.perf_counter() - t
    # exactness and speed against the brute-force reference on a subset of maps
    subset = [preds.grid_map(r.image_id, r.finding) for r in gt.iloc[:20].itertuples()]
    t = time.perf_counter()
    ref = [brute_force_max_component(g, (1024, 1024), ts) for g in subset]
    brute = (time.perf_counter() - t) / len(subset)
    t = time.perf_counter()
    ours = [boxes_from_map(g, (1024, 1024), ts) for g in subset]
    fast = (time.perf_counter() - t) / len(subset)
    same = sum(int(np.array_equal(a, b)) for o, r in zip(ours, ref, strict=True) for a, b in zip(o, r, strict=True))
    res["per_map_ms"] = {"lattice": fast * 1e3, "brute_force_label": brute * 1e3, "speedup": brute / fast,
                         "identical_boxes": f"{same}/{len(subset) * len(ts)}"}
    return res


def bench_predict(sample_dir: Path, n_images: int, batch_size: int) -> dict:
    originals = sorted((sample_dir / "images").glob("*.png"))
    tmp = Path(tempfile.mkdtemp(prefix="cxrloc-bench-predict-"))
    try:
        src = tmp / "in"
        src.mkdir()
        for i in range(n_images):
            shutil.copy(originals[i % len(originals)], src / f"{i:05d}.png")
        files = sorted(src.glob("*.png"))
        cfg = load_config("dlrv", ["model.pretrained=false"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        info = {"checkpoint": "random weights", "config": "dlrv"}
        settings = [
            ("plain: NCHW fp32, inline decode", {"channels_last": False, "bf16": False}, 0, False),
            ("channels_last, inline decode", {"channels_last": True, "bf16": False}, 0, False),
            ("channels_last + 2 decode threads", {"channels_last": True, "bf16": False}, 2, False),
            ("channels_last + 2 threads + bf16", {"channels_last": True, "bf16": True}, 2, False),
            ("channels_last + 2 threads, with overlays", {"channels_last": True, "bf16": False}, 2, True),
        ]
        def timed_row(name: str, predictor: Predictor, workers: int, overlays: bool) -> dict:
            predict_files(predictor, files[:batch_size], tmp / "warm", info, batch_size=batch_size, workers=workers,
                          overlays=False, progress=False)  # warm-up (oneDNN kernels, page cache)
            t, cpu = time.perf_counter(), time.process_time()
            predict_files(predictor, files, tmp / "out", info, batch_size=batch_size, workers=workers,
                          overlays=overlays, progress=False)
            dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
            return {"setting": name, "images": len(files), "seconds": dt, "images_per_s": len(files) / dt,
                    "cpu_ms_per_image": dcpu / len(files) * 1e3}

        rows = []
        for name, kw, workers, overlays in settings:
            rows.append(timed_row(name, Predictor(model, cfg, **kw), workers, overlays))
            model.to(memory_format=torch.contiguous_format)
        # the same network exported by `cxrloc export` and run by onnxruntime (`cxrloc predict --onnx`)
        save_checkpoint(tmp / "model.pt", model, cfg, epoch=0, metric=None)
        export_onnx(tmp / "model.pt", tmp / "export")
        rows.append(timed_row("onnxruntime (cxrloc export) + 2 decode threads", load_onnx_predictor(tmp / "export")[0],
                              2, False))
        # the pieces of the fastest setting, per batch of images
        predictor = Predictor(model, cfg, channels_last=True)
        from cxrloc.predict import _decode

        t = time.perf_counter()
        decoded = [_decode(f, 256) for f in files[:batch_size]]
        decode_s = (time.perf_counter() - t) / batch_size
        batch = np.stack([d[0] for d in decoded])
        predictor.run_batch(batch)
        t = time.perf_counter()
        probs, maps = predictor.run_batch(batch)
        net_s = (time.perf_counter() - t) / batch_size
        bf16 = Predictor(model, cfg, channels_last=True, bf16=True)
        bf16.run_batch(batch)
        t = time.perf_counter()
        probs_bf16, _ = bf16.run_batch(batch)
        net_bf16_s = (time.perf_counter() - t) / batch_size
        t = time.perf_counter()
        for p, m, d in zip(probs, maps, decoded, strict=True):
            predictor.detections(np.ones_like(p), m, d[1])  # 14 boxes per image (worst case)
        box_s = (time.perf_counter() - t) / batch_size
        model.to(memory_format=torch.contiguous_format)
        return {"model": "DenseNet-121, 224 x 224, random weights", "batch_size": batch_size, "rows": rows,
                "per_image_ms": {"decode_1024_png_to_256": decode_s * 1e3, "network_fp32_channels_last": net_s * 1e3,
                                 "network_bf16_channels_last": net_bf16_s * 1e3, "boxes_14_findings": box_s * 1e3},
                "bf16_max_abs_probability_difference": float(np.abs(probs_bf16 - probs).max())}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--predict-images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sample-dir", type=Path, default=Path(os.environ.get("CXRLOC_SAMPLE_DIR", DEFAULT_SAMPLE)))
    ap.add_argument("--skip-predict", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "evaluate.json")
    args = ap.parse_args()
    tune_cpu_malloc()  # as the cxrloc command line does (cxrloc/malloc.py)
    result: dict = {"machine": machine(), "targets": {"scoring_s_max": 30, "predict_images_per_s_min": 15}}
    rng = np.random.default_rng(0)
    result["scoring"] = s = bench_scoring(rng, args.resamples)
    print(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"load {result['machine']['load_average_at_start'][0]:.1f}")
    print(f"\nScoring a test split from cached predictions ({s['images']} images x 14, {s['patients']} patients, "
          f"{s['boxes']} boxes on {s['box_images']} images, {s['cam_thresholds']} CAM thresholds)")
    print(f"{'step':58s} {'seconds':>8s}")
    for key, label in (("auc_bootstrap_s", f"AUC + {s['bootstrap_resamples']} patient bootstrap resamples"),
                       ("boxes_all_thresholds_s", "boxes (max_component) + IoU/IoBB, all CAM thresholds"),
                       ("cv_threshold_search_s", "10-fold CAM threshold search"),
                       ("evaluate_predictions_total_s", "evaluate_predictions (all of the above + tables)  [target <= 30]"),
                       ("compare_two_runs_s", "`cxrloc compare` of two runs (paired bootstrap, both scored)"),
                       ("boxes_all_s", "boxes, mode 'all'"), ("boxes_components_s", "boxes, mode 'components'")):
        print(f"{label:58s} {s[key]:8.2f}")
    pm = s["per_map_ms"]
    print(f"per map, 20 thresholds at 1024x1024: lattice {pm['lattice']:.1f} ms vs brute-force label "
          f"{pm['brute_force_label']:.1f} ms ({pm['speedup']:.0f}x), identical boxes {pm['identical_boxes']}")
    if not args.skip_predict:
        if not (args.sample_dir / "images").is_dir():
            print(f"sample folder {args.sample_dir} missing: predict benchmark skipped")
        else:
            result["predict"] = p = bench_predict(args.sample_dir, args.predict_images, args.batch_size)
            base = p["rows"][0]["images_per_s"]
            print(f"\npredict end to end, {p['model']}, 1024x1024 PNGs, batch {p['batch_size']}  [target >= 15 images/s]")
            print("(CPU ms/image = process CPU time of all threads; on a busy machine it is the steadier number)")
            print(f"{'setting':45s} {'images/s':>9s} {'x plain':>8s} {'CPU ms/img':>11s}")
            for row in p["rows"]:
                row["speedup_vs_plain"] = row["images_per_s"] / base
                print(f"{row['setting']:45s} {row['images_per_s']:9.1f} {row['speedup_vs_plain']:8.2f} "
                      f"{row['cpu_ms_per_image']:11.0f}")
            print("per image (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in p["per_image_ms"].items()))
            print(f"bf16 vs fp32, max |probability difference| (random weights): {p['bf16_max_abs_probability_difference']:.3f}")
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
