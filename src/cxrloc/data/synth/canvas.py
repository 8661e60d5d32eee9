"""The drawing surface of the phantom renderer: canonical body coordinates, windows, soft shapes.

Every anatomical structure and finding is described in *canonical coordinates*
``(x, y)``: ``x`` runs from -1 (image left = the patient's right, as on a PA
film) to +1, ``y`` from -1 (top) to +1 (bottom), for a body at zoom 1 centred in
the image. A per-image similarity transform (shift, rotation, zoom; the
patient's position on the detector) maps pixel centres to canonical points;
shapes are then evaluated directly on the transformed coordinate grids, so the
true boxes of findings come out in exact pixel coordinates with no resampling.

All shapes have *compact support*: soft edges are linear ramps a few pixels
wide, never Gaussians, so "where did this finding change the image" has an exact
answer (the support) that the true boxes are built from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: A pixel box (x0, y0, x1, y1), inclusive pixel indices.
PixelBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class Pose:
    """Where the body lies on the detector (per image).

    Attributes:
        shift_x, shift_y: offset of the body centre from the image centre, as a
            fraction of the image side.
        rotation_deg: in-plane rotation, degrees (positive = clockwise on screen).
        zoom: body size relative to the nominal (1 = canonical [-1, 1] spans the image).
    """

    shift_x: float = 0.0
    shift_y: float = 0.0
    rotation_deg: float = 0.0
    zoom: float = 1.0


class Canvas:
    """Canonical coordinate grids of one image and helpers to draw on sub-windows.

    Args:
        size: image side S in pixels (square images).
        pose: the body's position on the detector.

    Attributes:
        X, Y: (S, S) float32 canonical coordinates of every pixel centre.
        pixel: length of one pixel in canonical units (2 / (zoom * S)).
    """

    def __init__(self, size: int, pose: Pose):
        self.size = int(size)
        self.pose = pose
        s = self.size
        theta = math.radians(pose.rotation_deg)
        self._cos, self._sin = math.cos(theta), math.sin(theta)
        self._half = 0.5 * s * pose.zoom  # pixels per canonical unit
        self._cx = 0.5 * s + pose.shift_x * s
        self._cy = 0.5 * s + pose.shift_y * s
        self.pixel = 1.0 / self._half
        px = (np.arange(s, dtype=np.float32) + np.float32(0.5) - np.float32(self._cx))[None, :]
        py = (np.arange(s, dtype=np.float32) + np.float32(0.5) - np.float32(self._cy))[:, None]
        inv = np.float32(1.0 / self._half)
        c, sn = np.float32(self._cos * inv), np.float32(self._sin * inv)
        # inverse rotation: canonical = R(-theta) (pixel - centre) / half
        self.X = px * c + py * sn  # float32 (S, S)
        self.Y = py * c - px * sn

    # ------------------------------------------------------------------ mapping
    def to_pixel(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Canonical points -> pixel coordinates (continuous; pixel i spans [i, i + 1))."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        px = self._cx + self._half * (self._cos * x - self._sin * y)
        py = self._cy + self._half * (self._sin * x + self._cos * y)
        return px, py

    def window(self, x0: float, y0: float, x1: float, y1: float, margin_px: int = 2) -> tuple[slice, slice] | None:
        """Pixel slices (rows, cols) covering the canonical rectangle [x0, x1] x [y0, y1].

        Returns None when the rectangle falls outside the image.
        """
        h, c, s = self._half, self._cos, self._sin
        pxs = [self._cx + h * (c * x - s * y) for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
        pys = [self._cy + h * (s * x + c * y) for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
        c0 = max(math.floor(min(pxs)) - margin_px, 0)
        c1 = min(math.ceil(max(pxs)) + margin_px, self.size)
        r0 = max(math.floor(min(pys)) - margin_px, 0)
        r1 = min(math.ceil(max(pys)) + margin_px, self.size)
        if c1 <= c0 or r1 <= r0:
            return None
        return slice(r0, r1), slice(c0, c1)

    def grids(self, win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Canonical coordinates (X, Y) of a window (views, do not modify)."""
        return self.X[win], self.Y[win]


# ---------------------------------------------------------------------- shapes
def clip01(values: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place and return ``values``."""
    return np.clip(values, 0.0, 1.0, out=values)


def ramp(signed: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for ``signed <= -width/2``, 1 for ``signed >= width/2``, linear between.

    ``signed`` is a signed distance-like value (positive inside), ``width`` the
    edge width in the same units. Compact: exactly 0 outside the ramp.
    """
    out = signed * np.float32(1.0 / max(width, 1e-6))
    out += np.float32(0.5)
    return clip01(out)


def periodic_distance(values: np.ndarray, period: float) -> np.ndarray:
    """Distance of ``values`` to the nearest multiple of ``period`` plus period/2, in [0, period/2].

    Equivalent to ``abs(values % period - period / 2)`` (float ``%`` is slow in NumPy).
    """
    q = values * np.float32(1.0 / period)
    q -= np.floor(q)
    q -= np.float32(0.5)
    np.abs(q, out=q)
    q *= np.float32(period)
    return q


def ellipse_r2(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle_deg: float = 0.0) -> np.ndarray:
    """Squared normalised radius of an (optionally rotated) ellipse: 1 on its border."""
    dx = X - np.float32(cx)
    dy = Y - np.float32(cy)
    if angle_deg:
        t = math.radians(angle_deg)
        c, s = np.float32(math.cos(t)), np.float32(math.sin(t))
        dx, dy = dx * c + dy * s, dy * c - dx * s
    dx *= np.float32(1.0 / ax)
    dy *= np.float32(1.0 / ay)
    dx *= dx
    dy *= dy
    dx += dy
    return dx


def soft_ellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
                 edge: float, angle_deg: float = 0.0) -> np.ndarray:
    """Filled ellipse with a linear edge ``edge`` canonical units wide (outer edge at the border)."""
    r2 = ellipse_r2(X, Y, cx, cy, ax, ay, angle_deg)
    r = np.sqrt(r2, out=r2)
    scale = min(ax, ay)
    # signed distance ~ (1 - r) * scale; shift so the ramp ends exactly on the border
    return ramp((1.0 - r) * np.float32(scale) - np.float32(edge / 2), edge)


def bump(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle_deg: float = 0.0) -> np.ndarray:
    """Smooth compact bump (1 - r^2)^2 inside the ellipse, 0 outside: an ill-defined opacity."""
    r2 = ellipse_r2(X, Y, cx, cy, ax, ay, angle_deg)
    np.subtract(1.0, r2, out=r2)
    np.maximum(r2, 0.0, out=r2)
    r2 *= r2
    return r2


def support_box(mask: np.ndarray, win: tuple[slice, slice]) -> PixelBox | None:
    """Inclusive pixel box of the non-zero entries of ``mask`` (a window of the image)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    r0, c0 = win[0].start or 0, win[1].start or 0
    return (c0 + int(cols[0]), r0 + int(rows[0]), c0 + int(cols[-1]), r0 + int(rows[-1]))


def union_box(*boxes: PixelBox | None) -> PixelBox | None:
    """Smallest box holding all given boxes (None entries ignored)."""
    real = [b for b in boxes if b is not None]
    if not real:
        return None
    return (min(b[0] for b in real), min(b[1] for b in real), max(b[2] for b in real), max(b[3] for b in real))


def dilate_box(box: PixelBox, radius: int, size: int) -> PixelBox:
    """Grow a box by ``radius`` pixels on every side, clipped to the image."""
    return (max(box[0] - radius, 0), max(box[1] - radius, 0), min(box[2] + radius, size - 1), min(box[3] + radius, size - 1))
