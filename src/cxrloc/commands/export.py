"""Export a checkpoint to ONNX (pixels in, eq. 10 probabilities and eq. 11 maps out), verified against PyTorch.

Writes OUT/model.onnx and OUT/model.json (schema in cxrloc.export); needs the onnx extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file (e.g. RUN_DIR/checkpoints/best.pt)")
    p.add_argument("--out", type=Path, default=Path("export"), help="output folder (default ./export)")
    p.add_argument("--input-size", type=int, default=256,
                   help="side of the graph's grayscale input images (default 256, as `cxrloc predict` decodes)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--hflip-tta", action=argparse.BooleanOptionalAction, default=None,
                   help="bake the mirror-image averaging into the graph (default: the checkpoint's eval.hflip_tta)")


def run(args: argparse.Namespace) -> int:
    from cxrloc.export import DEFAULT_OPSET, JSON_NAME, ONNX_NAME, export_onnx

    meta = export_onnx(args.checkpoint, args.out, input_size=args.input_size, opset=args.opset or DEFAULT_OPSET,
                       hflip_tta=args.hflip_tta)
    diff = meta["verification"]["max_abs_diff"]
    print(f"exported {args.checkpoint} ({meta['model']['config']}, epoch {meta['model']['epoch']}) to ONNX opset "
          f"{meta['opset']}: input image {meta['input']['shape']}, outputs {', '.join(meta['outputs'])}"
          + (", mirror-image TTA in the graph" if meta["hflip_tta"] else ""))
    print("onnxruntime vs PyTorch, max |diff| over batches of 2 and 3: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    print(f"wrote {args.out / ONNX_NAME} and {args.out / JSON_NAME}")
    return 0
