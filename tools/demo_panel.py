"""The README's top picture: the first example of each finding from a demo's ``examples.png``, 2 rows x 4.

``cxrloc evaluate`` draws ``examples.png`` with one row per box finding (8 rows) and two
examples per row (image + heatmap each). This keeps the first pair of every row, scales it
by 0.75 and lays the eight pairs out in two rows of four.

Usage:
    .venv/bin/python tools/demo_panel.py DEMO/evaluate/dlrv/examples.png docs/demo_panel.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROWS, PER_ROW, SCALE = 8, 4, 0.75


def demo_panel(examples: Image.Image) -> Image.Image:
    """(W, H) examples grid of 8 rows -> panel of the left half of each row, 2 x 4, scaled."""
    src = examples.convert("RGB")
    row_h, half_w = src.height // ROWS, src.width // 2
    tw, th = round(half_w * SCALE), round(row_h * SCALE)
    out = Image.new("RGB", (PER_ROW * tw, (ROWS // PER_ROW) * th), "white")
    for k in range(ROWS):
        tile = src.crop((0, k * row_h, half_w, (k + 1) * row_h)).resize((tw, th), Image.LANCZOS)
        out.paste(tile, ((k % PER_ROW) * tw, (k // PER_ROW) * th))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    with Image.open(argv[0]) as im:
        demo_panel(im).save(Path(argv[1]), optimize=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
