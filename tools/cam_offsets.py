"""Where the class maps point: the analysis behind docs/demo_tuning.md (not part of the package).

For an evaluated run (``cxrloc evaluate`` output folder with ``predictions.npz``) and its cache,
per finding with boxes:

* ``pointing``: the fraction of ground-truth boxes holding the maximum of their eq. 11 map
  (upsampled to the image, as scoring does);
* ``dx_out`` / ``dy_down``: median signed distance, in original pixels, from the box centre to
  that maximum (``dx_out`` > 0: towards the nearer image side; ``dy_down`` > 0: below);
* ``acc@T`` at the single CAM threshold best for the mean over findings, and at each finding's
  own best threshold (which the paper's protocol does not allow; an upper bound).

Usage:
    .venv/bin/python tools/cam_offsets.py DEMO/evaluate/dlrv DEMO/cache [--iou 0.3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cxrloc.data.cache import Cache  # noqa: E402
from cxrloc.evaluate.boxes import upsample_map  # noqa: E402
from cxrloc.evaluate.localization import score_boxes  # noqa: E402
from cxrloc.evaluate.runner import PREDICTIONS_FILE, Predictions  # noqa: E402

THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def cam_offsets(eval_dir: Path, cache_dir: Path, iou_threshold: float = 0.3) -> dict[str, dict[str, float]]:
    """Per finding: pointing, median dx_out / dy_down, accuracy at the best common and own threshold."""
    preds = Predictions.load(Path(eval_dir) / PREDICTIONS_FILE)
    boxes = Cache(cache_dir).boxes
    scores = score_boxes(boxes, preds.grid_map, preds.size_of, THRESHOLDS, progress=False)
    correct = scores.iou > iou_threshold  # (n boxes, T)
    findings = sorted(set(scores.findings))
    acc = np.array([correct[scores.findings == f].mean(axis=0) for f in findings])  # (F, T)
    common = int(np.argmax(acc.mean(axis=0)))
    out: dict[str, dict[str, float]] = {}
    for k, f in enumerate(findings):
        rows = np.flatnonzero(scores.findings == f)
        hits, dx, dy = [], [], []
        for i in rows:
            w, h = preds.size_of(scores.image_ids[i])
            up = upsample_map(preds.grid_map(scores.image_ids[i], f), (w, h))
            py, px = np.unravel_index(int(np.argmax(up)), up.shape)
            x, y, bw, bh = scores.gt_boxes[i]
            hits.append(x <= px < x + bw and y <= py < y + bh)
            cx, cy = x + bw / 2, y + bh / 2
            dx.append((px + 0.5 - cx) * np.sign(cx - w / 2))
            dy.append(py + 0.5 - cy)
        out[f] = {"boxes": len(rows), "pointing": float(np.mean(hits)), "dx_out": float(np.median(dx)),
                  "dy_down": float(np.median(dy)), "box_w": float(scores.gt_boxes[rows, 2].mean()),
                  "box_h": float(scores.gt_boxes[rows, 3].mean()), "acc_common": float(acc[k, common]),
                  "acc_own": float(acc[k].max()), "own_threshold": float(THRESHOLDS[int(np.argmax(acc[k]))])}
    out["Mean"] = {"common_threshold": float(THRESHOLDS[common]), "acc_common": float(acc[:, common].mean()),
                   "acc_own": float(acc.max(axis=1).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--iou", type=float, default=0.3)
    args = ap.parse_args()
    res = cam_offsets(args.eval_dir, args.cache_dir, args.iou)
    mean = res.pop("Mean")
    print(f"| finding (boxes) | pointing | dx outward (median px) | dy down (median px) | true box | "
          f"acc@{args.iou} common | own threshold: acc |")
    print("|---|---|---|---|---|---|---|")
    for f, r in res.items():
        print(f"| {f} ({r['boxes']}) | {r['pointing']:.2f} | {r['dx_out']:+.1f} | {r['dy_down']:+.1f} | "
              f"{r['box_w']:.0f} x {r['box_h']:.0f} | {r['acc_common']:.2f} | {r['own_threshold']:.2f}: {r['acc_own']:.2f} |")
    print(f"| **Mean** | | | | | {mean['acc_common']:.2f} (threshold {mean['common_threshold']:.2f}) | "
          f"{mean['acc_own']:.2f} |")


if __name__ == "__main__":
    main()
