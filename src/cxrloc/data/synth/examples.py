"""The example grid in docs/: one phantom per finding (plus No Finding) with its true box.

Regenerate with ``cxrloc synth --examples docs/synth_examples.png`` (seed 0, medium).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cxrloc.data.synth.anatomy import Phantom, sample_acquisition, sample_anatomy
from cxrloc.data.synth.findings import sample_finding
from cxrloc.data.synth.generator import get_difficulty
from cxrloc.data.synth.render import render
from cxrloc.fileio import atomic_write_bytes
from cxrloc.labels import FINDINGS, NO_FINDING

KEY_EXAMPLES = 31
BOX_COLOUR = (255, 60, 60)
TEXT_COLOUR = (255, 230, 0)


def example_tiles(seed: int = 0, difficulty: str = "medium", size: int = 160) -> list[tuple[str, np.ndarray, dict]]:
    """(title, (S, S) uint8 image, boxes) for No Finding and each finding alone, on different patients.

    Exposure is fixed at mid values so the picture shows each finding plainly; pose,
    noise and anatomy vary as in the dataset.
    """
    diff = get_difficulty(difficulty)
    tiles = []
    for i, kind in enumerate((None, *FINDINGS)):
        rng = np.random.default_rng([seed, KEY_EXAMPLES, i])
        anatomy = sample_anatomy(rng, "M" if i % 2 else "F")
        # mid exposure for the picture (the dataset varies it per image)
        acquisition = dataclasses.replace(sample_acquisition(rng, diff.noise), low=0.04, high=1.0, gamma=1.0)
        phantom = Phantom(anatomy, acquisition)
        findings = [sample_finding(kind, anatomy, rng, diff)] if kind else []
        out = render(phantom, findings, size)
        tiles.append((kind or NO_FINDING, out.image, out.boxes))
    return tiles


def example_grid(seed: int = 0, difficulty: str = "medium", size: int = 160, columns: int = 5) -> Image.Image:
    """A labelled RGB grid of :func:`example_tiles` (true boxes in red)."""
    tiles = example_tiles(seed, difficulty, size)
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * size, rows * size))
    for i, (title, image, boxes) in enumerate(tiles):
        tile = Image.fromarray(image).convert("RGB")
        draw = ImageDraw.Draw(tile)
        for x, y, w, h in boxes.values():
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=BOX_COLOUR)
        draw.rectangle([0, 0, 7 * len(title) + 4, 12], fill=(0, 0, 0))
        draw.text((2, 0), title.replace("_", " "), fill=TEXT_COLOUR)
        grid.paste(tile, ((i % columns) * size, (i // columns) * size))
    return grid


def write_example_grid(path: str | Path, seed: int = 0, difficulty: str = "medium", size: int = 160) -> Path:
    """Write :func:`example_grid` as a palette PNG (small enough for the repository)."""
    grid = example_grid(seed, difficulty, size).quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
