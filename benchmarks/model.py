"""Benchmark the DLRV model: training-step cost per variant and inference throughput per setting.

Training: one step (forward + backward + Adam step) at the same anchor batch B for
    baseline   BCE only                      B images
    no_dl      BCE + RV                      B images
    no_rv      BCE + triplet                 3B images ([anchors; positives; negatives])
    dlrv       BCE + RV + triplet            3B images
repetitions interleaved (variant order shuffled each round), medians, ratios to baseline.

Inference (``DLRV.predict``, eq. 10-11, eval mode, inference_mode) for several settings
(fp32, channels_last, TorchScript-frozen, bf16 autocast, bf16 weights, and torch.compile with
inductor freezing unless ``--no-compile``), each with images/s, speed-up over plain fp32 and the max |probability|
difference to plain fp32. ``correct`` means max |dp| <= 0.02. Because eq. 10 thresholds each
class CAM at 0.8, a tiny change of g can move a class box by a grid row and jump that
class's region logit; ``boxes_changed`` reports the fraction of (image, class) boxes that
moved and ``max_dp_global`` the difference of sigmoid(global logits) alone.

The model is DenseNet-121 with random init (no ImageNet weights here); the training steps
run first so BatchNorm statistics and heads are no longer at their init values.

Usage:
    .venv/bin/python benchmarks/model.py            # DenseNet-121, 224, B=8 (minutes on 2 CPU cores)
    .venv/bin/python benchmarks/model.py --quick    # densenet-tiny at 64 px, a sanity run
Writes benchmarks/results/model.json (``--quick``: model_quick.json). Wall-clock medians are
the primary numbers; the process CPU-time medians are stored beside them because on a shared
machine other jobs inflate wall time.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402

from cxrloc.config import LossConfig, ModelConfig  # noqa: E402
from cxrloc.fileio import atomic_write_json  # noqa: E402
from cxrloc.malloc import tune_cpu_malloc  # noqa: E402
from cxrloc.model import DLRVLoss, build_model  # noqa: E402

VARIANTS = {  # name: (use_dl, use_rv)
    "baseline": (False, False),
    "no_dl": (False, True),
    "no_rv": (True, False),
    "dlrv": (True, True),
}
TOLERANCE = 0.02


def machine_info() -> dict:
    """The shared machine description plus what matters here: bf16 support and the GPU."""
    bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return machine(mkldnn_bf16=bf16, cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): CPU time is less hurt by other jobs on a shared machine."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def bench_training(model, device, batch: int, size: int, reps: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3 * batch, 3, size, size, generator=gen).to(device)
    labels = (torch.rand(3 * batch, 14, generator=gen) > 0.8).float().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step(name: str) -> None:
        use_dl, use_rv = VARIANTS[name]
        crit = DLRVLoss(LossConfig(use_dl=use_dl, use_rv=use_rv))
        rows = 3 * batch if use_dl else batch
        out = model(images[:rows], labels=crit.region_labels(labels[:rows], batch))
        loss = crit(out, labels[:rows], batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for name in VARIANTS:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS)
    rnd = random.Random(seed)
    for r in range(reps):
        rnd.shuffle(order)
        for name in order:
            wall, used = timed(lambda n=name: step(n), device)
            times[name].append(wall)
            cpu[name].append(used)
        print(f"  training round {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in VARIANTS),
              flush=True)
    medians = {n: statistics.median(t) for n, t in times.items()}
    cpu_medians = {n: statistics.median(t) for n, t in cpu.items()}
    return {
        "anchor_batch": batch,
        "image_size": size,
        "repetitions": reps,
        "images_per_step": {n: (3 * batch if VARIANTS[n][0] else batch) for n in VARIANTS},
        "median_s": medians,
        "all_s": times,
        "ratio_to_baseline": {n: medians[n] / medians["baseline"] for n in VARIANTS},
        "cpu_median_s": cpu_medians,
        "cpu_ratio_to_baseline": {n: cpu_medians[n] / cpu_medians["baseline"] for n in VARIANTS},
    }


def inference_settings(model, device, x, compile_too: bool) -> dict[str, Callable[[], dict]]:
    """name -> zero-argument callable returning predict()'s dict for the fixed batch x."""
    fp32 = model.eval()
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16
    settings: dict[str, Callable[[], dict]] = {
        "fp32": lambda: fp32.predict(x),
        "fp32_channels_last": lambda: cl_model.predict(x_cl),
    }
    if device.type == "cpu":
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated but still the fastest here
            scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(cl_model.backbone.eval(), x_cl)))

        def jit_predict() -> dict:
            with torch.inference_mode():
                return cl_model.predict_from_features(scripted(x_cl))

        settings["fp32_channels_last_jit_frozen"] = jit_predict

    def autocast(fn: Callable[[], dict], dtype: torch.dtype) -> Callable[[], dict]:
        def run() -> dict:
            with torch.autocast(device.type, dtype=dtype):
                return fn()

        return run

    settings["bf16_autocast"] = autocast(lambda: fp32.predict(x), amp_dtype)
    settings["bf16_autocast_channels_last"] = autocast(lambda: cl_model.predict(x_cl), amp_dtype)
    bf16_model = copy.deepcopy(cl_model).to(torch.bfloat16)
    x_bf16 = x_cl.to(torch.bfloat16)
    settings["bf16_weights_channels_last"] = lambda: bf16_model.predict(x_bf16)
    if device.type == "cuda":
        settings["fp16_autocast_channels_last"] = autocast(lambda: cl_model.predict(x_cl), torch.float16)
    if compile_too:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights are constants: fold and prepack them (inference only)
        compiled = torch.compile(cl_model.backbone)

        def compiled_predict() -> dict:
            with torch.inference_mode():
                return cl_model.predict_from_features(compiled(x_cl))

        settings["fp32_channels_last_compiled"] = compiled_predict
        settings["bf16_autocast_channels_last_compiled"] = autocast(compiled_predict, amp_dtype)
    return settings


def bench_inference(model, device, batch: int, size: int, reps: int, seed: int, compile_too: bool) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    model.eval()
    settings = inference_settings(model, device, x, compile_too)
    reference = settings["fp32"]()
    quality = {}
    for name, fn in settings.items():
        fn()  # warm-up (and compilation)
        out = fn()
        dp = (out["probs"].float() - reference["probs"]).abs()
        dp_global = (torch.sigmoid(out["logits"].float()) - torch.sigmoid(reference["logits"])).abs()
        moved = (out["region_masks"] != reference["region_masks"]).flatten(2).any(-1)
        quality[name] = {
            "max_dp": float(dp.max()),
            "mean_dp": float(dp.mean()),
            "max_dp_global": float(dp_global.max()),
            "max_dcam": float((out["cam_grid"].float() - reference["cam_grid"]).abs().max()),
            "boxes_changed": float(moved.float().mean()),
        }
    times: dict[str, list[float]] = {name: [] for name in settings}
    cpu: dict[str, list[float]] = {name: [] for name in settings}
    order = list(settings)
    rnd = random.Random(seed)
    for r in range(reps):
        rnd.shuffle(order)
        for name in order:
            wall, used = timed(settings[name], device)
            times[name].append(wall)
            cpu[name].append(used)
        print(f"  inference round {r + 1}/{reps}", flush=True)
    medians = {n: statistics.median(t) for n, t in times.items()}
    cpu_medians = {n: statistics.median(t) for n, t in cpu.items()}
    results = {
        n: {
            "images_per_s": batch / medians[n],
            "median_s": medians[n],
            "speedup_vs_fp32": medians["fp32"] / medians[n],
            "cpu_median_s": cpu_medians[n],
            "cpu_speedup_vs_fp32": cpu_medians["fp32"] / cpu_medians[n],
            **quality[n],
            "correct": quality[n]["max_dp"] <= TOLERANCE,
        }
        for n in settings
    }
    correct = [n for n in settings if results[n]["correct"]]
    fastest_correct = max(correct, key=lambda n: results[n]["images_per_s"])
    fastest = max(settings, key=lambda n: results[n]["images_per_s"])
    return {"batch": batch, "image_size": size, "repetitions": reps, "tolerance": TOLERANCE,
            "settings": results, "fastest_correct": fastest_correct, "fastest_any": fastest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="densenet-tiny at 64 px, 2 rounds: a sanity run")
    parser.add_argument("--batch", type=int, default=8, help="anchor batch B (training)")
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile (it takes minutes to compile DenseNet-121 on 2 CPU cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tune_cpu_malloc()  # as the cxrloc command line does (cxrloc/malloc.py)
    backbone = "densenet-tiny" if args.quick else "densenet121"
    size = 64 if args.quick else args.image_size
    reps = 2 if args.quick else args.reps
    out_path = args.out or Path(__file__).parent / "results" / ("model_quick.json" if args.quick else "model.json")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, pretrained=False)).to(device)
    info = machine_info()
    print(f"{backbone} at {size}px on {device} ({info['cpu']}, {info['torch_threads']} threads)", flush=True)
    training = bench_training(model, device, args.batch, size, reps, seed=0)
    inference = bench_inference(model, device, args.infer_batch, size, reps, seed=0,
                                compile_too=not (args.quick or args.no_compile))
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = list(os.getloadavg())
    targets = {
        "dlrv_step_le_3.15x_baseline": training["ratio_to_baseline"]["dlrv"] <= 3.15,
        "no_dl_step_le_1.05x_baseline": training["ratio_to_baseline"]["no_dl"] <= 1.05,
        "fastest_correct_inference_ge_2.5x_fp32":
            inference["settings"][inference["fastest_correct"]]["speedup_vs_fp32"] >= 2.5,
    }
    loads = [info["load_average_at_start"][0], info.get("load_average_end", [0])[0]]
    if device.type == "cpu" and max(loads) > (os.cpu_count() or 1):
        info["warning"] = f"shared machine: load average {max(loads):.1f} > {os.cpu_count()} cores; timings are noisy"
        print(f"WARNING: {info['warning']}")
    result = {"backbone": backbone, "device": str(device), "machine": info, "training": training,
              "inference": inference, "targets_met": targets}
    atomic_write_json(out_path, result)

    print(f"\nTraining step, anchor batch {args.batch}, {size}px (median of {reps})")
    print(f"{'variant':<10} {'images':>6} {'seconds':>9} {'x baseline':>10} {'cpu x base':>10}")
    for n in VARIANTS:
        print(f"{n:<10} {training['images_per_step'][n]:>6} {training['median_s'][n]:>9.3f} "
              f"{training['ratio_to_baseline'][n]:>10.2f} {training['cpu_ratio_to_baseline'][n]:>10.2f}")
    print(f"\nInference, batch {args.infer_batch}, {size}px (median of {reps})")
    print(f"{'setting':<38} {'img/s':>8} {'speedup':>8} {'cpu-sp':>7} {'max|dp|':>8} {'global':>8} {'boxes':>6} ok")
    for n, r in inference["settings"].items():
        print(f"{n:<38} {r['images_per_s']:>8.1f} {r['speedup_vs_fp32']:>8.2f} {r['cpu_speedup_vs_fp32']:>7.2f} "
              f"{r['max_dp']:>8.4f} "
              f"{r['max_dp_global']:>8.4f} {r['boxes_changed']:>6.3f} {'yes' if r['correct'] else 'NO'}")
    print(f"fastest correct: {inference['fastest_correct']}; fastest overall: {inference['fastest_any']}")
    print(f"targets: {targets}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
