"""Benchmark `cxrloc export`: export time, and onnxruntime vs PyTorch throughput of the exported graph on the CPU.

DenseNet-121 (random init) at 224 px, checkpoint written like ``cxrloc train`` writes one;
``export_onnx`` exports it (input: 256 x 256 grayscale pixels; the graph resizes, normalises
and runs eq. 10-11). Then, on the same batch of ``--batch`` smooth random images, interleaved
repetitions, medians:

    torch_fp32        InferenceGraph in PyTorch eager (what the graph computes), inference_mode
    torch_fp32_cl     the same with channels_last weights and input (what ``cxrloc predict`` uses)
    onnxruntime       the exported model.onnx, CPUExecutionProvider, all graph optimisations

with images/s, the speed-up over torch_fp32 and max |probability difference| to torch_fp32.

Usage:
    .venv/bin/python benchmarks/export.py            # DenseNet-121, batch 16 (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/export.py --quick    # densenet-tiny at 96 px, a sanity run
Writes benchmarks/results/export.json (``--quick``: export_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from _machine import machine  # noqa: E402

from cxrloc.config import load_config  # noqa: E402
from cxrloc.export import InferenceGraph, export_onnx, verification_images  # noqa: E402
from cxrloc.fileio import atomic_write_json  # noqa: E402
from cxrloc.malloc import tune_cpu_malloc  # noqa: E402
from cxrloc.model import build_model, load_model, save_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="densenet-tiny at 96 px, 2 repetitions")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per setting (default 5; --quick 2)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    tune_cpu_malloc()  # as the cxrloc command line does (cxrloc/malloc.py)
    import onnxruntime as ort

    backbone, size = ("densenet-tiny", 96) if args.quick else ("densenet121", 224)
    reps = args.reps or (2 if args.quick else 5)
    out_path = args.out or HERE / "results" / ("export_quick.json" if args.quick else "export.json")
    info = machine(onnxruntime=ort.__version__)
    torch.manual_seed(0)
    cfg = load_config("dlrv", [f"model.backbone={backbone}", "model.pretrained=false", f"data.image_size={size}"])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        save_checkpoint(ckpt, build_model(cfg.model, use_region=cfg.loss.use_rv), cfg, epoch=0, metric=None)
        t0 = time.perf_counter()
        meta = export_onnx(ckpt, Path(tmp) / "export")
        export_s = time.perf_counter() - t0
        print(f"export of {backbone} at {size} px: {export_s:.1f} s (with verification)", flush=True)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(Path(tmp) / "export" / "model.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
        model, cfg, _ = load_model(ckpt)
    graph = InferenceGraph(model, cfg).eval()
    graph_cl = InferenceGraph(copy.deepcopy(model), cfg).eval().to(memory_format=torch.channels_last)
    pixels = verification_images(args.batch, 256, seed=1)
    x = torch.from_numpy(pixels)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def run_torch(g: InferenceGraph, inp: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return g(inp)[0].numpy()

    settings = {
        "torch_fp32": lambda: run_torch(graph, x),
        "torch_fp32_cl": lambda: run_torch(graph_cl, x_cl),
        "onnxruntime": lambda: session.run(["probs"], {"image": pixels})[0],
    }
    reference = settings["torch_fp32"]()
    dp = {}
    for name, fn in settings.items():
        fn()  # warm-up
        dp[name] = float(np.abs(fn() - reference).max())
    times: dict[str, list[float]] = {n: [] for n in settings}
    for r in range(reps):
        for name in (list(settings) if r % 2 == 0 else list(reversed(settings))):
            t0 = time.perf_counter()
            settings[name]()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    rows = {n: {"median_s": med[n], "images_per_s": args.batch / med[n], "speedup_vs_torch_fp32": med["torch_fp32"] / med[n],
                "max_dp": dp[n], "all_s": times[n]} for n in settings}
    info["load_average_end"] = list(os.getloadavg())
    result = {"machine": info, "backbone": backbone, "image_size": size, "input_size": 256, "batch": args.batch,
              "repetitions": reps, "export_s": export_s, "verification": meta["verification"], "settings": rows}
    atomic_write_json(out_path, result)
    print(f"\n{'setting':16} {'img/s':>8} {'speed-up':>9} {'max|dp|':>9}")
    for n, r in rows.items():
        print(f"{n:16} {r['images_per_s']:8.1f} {r['speedup_vs_torch_fp32']:9.2f} {r['max_dp']:9.1e}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
