"""The 14 findings: where each may appear (sampling) and what it looks like (painting).

Each finding is a :class:`Finding` (kind, side, canonical centre and half-extents,
strength, texture seed). Sampling places it at an anatomically sensible spot of
the given :class:`~.anatomy.Anatomy`; painting draws it into the
:class:`~.anatomy.Layers` of one image and returns the pixel box of every pixel
whose density it changed (its support), which the renderer turns into the true box.

Appearance and place (medium difficulty; sizes as fractions of the image width W):

==================  ==================================================================
Atelectasis         lower zone: a dense plate-like band (0.14-0.24 W long) or a
                    sharp-edged wedge pointing to the hilum
Cardiomegaly        the heart silhouette widened by 26-40 % (cardiothoracic ratio > 0.55)
Effusion            basal homogeneous opacity with a meniscus rising to the lateral
                    wall; blunts the costophrenic angle, hides the dome
Infiltration        3-6 faint mottled patches in a 0.22-0.34 W region
Mass                lobulated dense opacity, 0.10-0.17 W across (plus lobes)
Nodule              small round dense opacity, 0.06-0.085 W across
Pneumonia           one ill-defined fluffy cloud (0.18-0.28 W) in the middle/lower
                    zone with dark air bronchograms
Pneumothorax        apical/lateral rim of air without lung markings behind a thin
                    bright pleural line
Consolidation       dense homogeneous lobar opacity with one straight sharp border
                    (a fissure)
Edema               bilateral perihilar "bat-wing" haze plus short horizontal
                    septal lines at the lateral bases
Emphysema           hyperinflation: darker lungs with sparse markings, low flat domes
Fibrosis            reticular net of fine lines in the lower, outer lung(s)
Pleural_Thickening  dense rim along the lateral chest wall or an apical cap
Hernia              round soft-tissue bubble behind the heart above the left dome,
                    with a gas cap and a straight air-fluid level
==================  ==================================================================

Difficulty (:data:`DIFFICULTIES`) scales strength ("contrast"), size and image noise;
the wide findings (:data:`WIDE_FINDINGS`) scale with contrast ** 1.5.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cxrloc.data.synth.anatomy import Anatomy, Layers, dome_y, heart_geometry, lung_geometry
from cxrloc.data.synth.canvas import (
    Canvas,
    PixelBox,
    bump,
    clip01,
    ellipse_r2,
    periodic_distance,
    ramp,
    soft_ellipse,
    support_box,
    union_box,
)
from cxrloc.labels import FINDINGS

#: Findings drawn by changing the anatomy itself (their box is where the image changed).
ANATOMY_FINDINGS = ("Cardiomegaly", "Emphysema")
#: Findings spread over a large area: a linear probe integrates them easily, so their strength
#: follows contrast ** WIDE_CONTRAST_POWER (same at medium, weaker at hard, stronger at easy).
WIDE_FINDINGS = ("Cardiomegaly", "Edema", "Emphysema")
WIDE_CONTRAST_POWER = 1.5


@dataclass(frozen=True)
class Difficulty:
    """How conspicuous findings are.

    Attributes:
        contrast: multiplies each finding's strength (density, fill, heart excess).
        size: multiplies each finding's extent.
        noise: multiplies the image noise.
    """

    name: str
    contrast: float
    size: float
    noise: float


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty("easy", contrast=1.35, size=1.15, noise=0.7),
    "medium": Difficulty("medium", contrast=1.0, size=1.0, noise=1.0),
    "hard": Difficulty("hard", contrast=0.35, size=0.7, noise=2.0),
}


@dataclass(frozen=True)
class Finding:
    """One planted finding, in canonical coordinates (see :mod:`.canvas`).

    Attributes:
        kind: one of :data:`cxrloc.labels.FINDINGS`.
        side: -1 image-left lung, +1 image-right lung, 0 both / central.
        cx, cy: centre; rx, ry: half-extents; angle: degrees.
        strength: finding-specific intensity (fill fraction, density or enlargement).
        seed: texture seed (patches, lines).
        variant: finding-specific shape variant (e.g. "plate" / "wedge").
    """

    kind: str
    side: int = 0
    cx: float = 0.0
    cy: float = 0.0
    rx: float = 0.1
    ry: float = 0.1
    angle: float = 0.0
    strength: float = 1.0
    seed: int = 0
    variant: str = ""


# ----------------------------------------------------------------------- sampling
def _lung_point(rng: np.random.Generator, a: Anatomy, side: int, t_range: tuple[float, float],
                v_range: tuple[float, float], margin: float) -> tuple[float, float]:
    """A point inside the lung on ``side``: lung-relative lateral t and vertical v, clear of heart/edges.

    ``t`` runs from -1 (medial) to +1 (lateral), ``v`` from -1 (apex) to +1 (base).
    ``margin`` (canonical) keeps the point that far inside the lung, above the
    dome and outside the heart and mediastinum.
    """
    cx, cy, ax, ay = lung_geometry(a, side)
    hcx, hcy, hax, hay = heart_geometry(a)
    for _ in range(40):
        t, v = rng.uniform(*t_range), rng.uniform(*v_range)
        x, y = cx + side * t * ax, cy + v * ay
        inside = ((x - cx) / max(ax - margin, 0.05)) ** 2 + ((y - cy) / max(ay - margin, 0.05)) ** 2 < 1.0
        above = y < float(dome_y(x, a)) - margin
        off_heart = ((x - hcx) / (hax + margin)) ** 2 + ((y - hcy) / (hay + margin)) ** 2 > 1.0
        off_med = abs(x) > a.mediastinum_half_width + 0.03 + margin
        if inside and above and off_heart and off_med:
            return x, y
    return cx + side * 0.25 * ax, cy - 0.2 * ay  # safe mid-lateral upper point


def sample_finding(kind: str, a: Anatomy, rng: np.random.Generator, difficulty: Difficulty) -> Finding:
    """Place one finding of ``kind`` on anatomy ``a`` (see the module table)."""
    if kind not in FINDINGS:
        raise ValueError(f"unknown finding {kind!r}")
    u = rng.uniform
    k, c = difficulty.size, difficulty.contrast
    if kind in WIDE_FINDINGS:
        c = c**WIDE_CONTRAST_POWER
    side = -1 if rng.random() < 0.5 else 1
    seed = int(rng.integers(0, 2**31 - 1))
    base = dict(kind=kind, side=side, seed=seed)
    if kind == "Atelectasis":
        if rng.random() < 0.4:
            rx, ry = u(0.14, 0.24) * k, u(0.03, 0.045) * k
            x, y = _lung_point(rng, a, side, (-0.3, 0.6), (0.25, 0.6), ry + 0.04)
            return Finding(**base, cx=x, cy=y, rx=rx, ry=ry, angle=side * u(-25, 5), strength=min(u(0.75, 0.95) * c, 1.0), variant="plate")
        # wedge: centroid in the lower zone, apex towards the hilum, opening down and out
        length, angle = u(0.26, 0.38) * k, u(50, 75)
        x, y = _lung_point(rng, a, side, (-0.5, 0.4), (0.05, 0.45), 0.05)
        t = math.radians(angle)
        apex_x, apex_y = x - side * math.cos(t) * 0.55 * length, y - math.sin(t) * 0.55 * length
        return Finding(**base, cx=apex_x, cy=apex_y, rx=length, ry=math.tan(math.radians(u(16, 24))),
                       angle=angle, strength=min(u(0.65, 0.85) * c, 1.0), variant="wedge")
    if kind == "Cardiomegaly":
        return Finding(**{**base, 'side': 0}, strength=u(0.26, 0.40) * c)
    if kind == "Effusion":
        return Finding(**base, ry=u(0.32, 0.48) * k, rx=u(0.06, 0.12) * k, strength=min(u(0.8, 0.95) * c, 1.0))
    if kind == "Infiltration":
        r = u(0.22, 0.34) * k
        x, y = _lung_point(rng, a, side, (-0.4, 0.6), (-0.55, 0.35), 0.4 * r)
        return Finding(**base, cx=x, cy=y, rx=r, ry=r * u(0.8, 1.25), strength=u(0.5, 0.65) * c)
    if kind == "Mass":
        r = u(0.10, 0.17) * k
        x, y = _lung_point(rng, a, side, (-0.5, 0.55), (-0.55, 0.3), 0.6 * r)
        return Finding(**base, cx=x, cy=y, rx=r, ry=r * u(0.85, 1.15), angle=u(0, 180), strength=min(u(0.85, 1.0) * c, 1.0))
    if kind == "Nodule":
        r = u(0.06, 0.085) * k
        x, y = _lung_point(rng, a, side, (-0.6, 0.7), (-0.6, 0.45), r + 0.03)
        return Finding(**base, cx=x, cy=y, rx=r, ry=r, strength=min(u(0.85, 1.0) * c, 1.0))
    if kind == "Pneumonia":
        r = u(0.18, 0.28) * k
        x, y = _lung_point(rng, a, side, (-0.45, 0.55), (-0.1, 0.45), 0.5 * r)
        return Finding(**base, cx=x, cy=y, rx=r, ry=r * u(0.95, 1.35), angle=u(0, 180), strength=min(u(0.62, 0.8) * c, 1.0))
    if kind == "Pneumothorax":
        cx, cy, ax, ay = lung_geometry(a, side)
        return Finding(**base, cx=cx, cy=cy + u(-0.55, 0.05) * ay, rx=u(0.09, 0.15) * k, strength=u(0.14, 0.2) * c)
    if kind == "Consolidation":
        upper = rng.random() < 0.5
        r = u(0.2, 0.3) * k
        if upper:
            x, y = _lung_point(rng, a, side, (-0.2, 0.5), (-0.5, -0.15), 0.3 * r)
        else:
            x, y = _lung_point(rng, a, side, (-0.2, 0.5), (0.05, 0.4), 0.3 * r)
        return Finding(**base, cx=x, cy=y, rx=r, ry=r * u(0.75, 1.0), angle=u(-12, 12), strength=min(u(0.85, 1.0) * c, 1.0),
                       variant="upper" if upper else "lower")
    if kind == "Edema":
        return Finding(**{**base, 'side': 0}, rx=u(0.2, 0.26) * k, ry=u(0.28, 0.36) * k, strength=u(0.45, 0.6) * c)
    if kind == "Emphysema":
        return Finding(**{**base, 'side': 0}, strength=min(u(0.75, 1.0) * c, 1.0))
    if kind == "Fibrosis":
        bilateral = rng.random() < 0.6
        return Finding(**{**base, 'side': 0 if bilateral else side}, rx=u(0.5, 0.65) * k, ry=u(0.4, 0.5) * k,
                       angle=u(0, 90), strength=u(0.55, 0.7) * c)
    if kind == "Pleural_Thickening":
        apical = rng.random() < 0.3
        cx, cy, ax, ay = lung_geometry(a, side)
        y0 = cy - ay + u(0.14, 0.22) if apical else cy + u(-0.35, 0.15) * ay
        return Finding(**base, cy=y0, rx=u(0.06, 0.09) * k, ry=u(0.15, 0.27) * k, strength=min(u(0.85, 1.0) * c, 1.0),
                       variant="apical" if apical else "lateral")
    # Hernia: behind the heart, just above the image-right (patient's left) dome
    r = u(0.12, 0.17) * k
    x = u(0.03, 0.13)
    return Finding(**{**base, 'side': 0}, cx=x, cy=float(dome_y(x, a)) - r * u(0.7, 1.0), rx=r, ry=r * u(0.8, 1.0),
                   strength=u(0.8, 1.0) * c)


def modify_anatomy(a: Anatomy, findings: list[Finding]) -> Anatomy:
    """Apply the anatomy-level findings (cardiomegaly, emphysema) to ``a``."""
    for f in findings:
        if f.kind == "Cardiomegaly":
            a = dataclasses.replace(a, heart_scale=a.heart_scale + f.strength)
        elif f.kind == "Emphysema":
            a = dataclasses.replace(a, hyperinflation=max(a.hyperinflation, f.strength))
    return a


# ----------------------------------------------------------------------- painting
Painter = Callable[[Canvas, Layers, Anatomy, Finding], PixelBox | None]


def _fill(canvas: Canvas, layers: Layers, win: tuple[slice, slice], amount: np.ndarray) -> PixelBox | None:
    """Add ``amount`` to the fill of a window; box = where it meets air (where the image changes)."""
    layers.fill[win] += amount
    return support_box((amount > 0) & (layers.air[win] > 0), win)


def _texture(X: np.ndarray, Y: np.ndarray, seed: int, period: float) -> np.ndarray:
    """Mottled texture in [0, 1] (product of two random-phase cosines), period in canonical units."""
    r = np.random.default_rng(seed)
    ph = r.uniform(0, 2 * math.pi, 4)
    f = np.float32(2 * math.pi / period)
    t = np.cos(X * f + np.float32(ph[0]) + np.float32(0.8) * np.sin(Y * f * np.float32(0.7) + np.float32(ph[1])))
    t *= np.cos(Y * f + np.float32(ph[2]) + np.float32(0.8) * np.sin(X * f * np.float32(0.6) + np.float32(ph[3])))
    t += np.float32(1.0)
    t *= np.float32(0.5)
    return t


def _bronchograms(X: np.ndarray, Y: np.ndarray, seed: int, cx: float, cy: float, pixel: float) -> np.ndarray:
    """Dark branching air bronchograms: thin lines radiating from a point, in [0, 1]."""
    r = np.random.default_rng(seed + 1)
    theta = np.arctan2(Y - np.float32(cy), X - np.float32(cx))
    v = np.cos(theta * np.float32(5.0) + np.float32(r.uniform(0, 6.3)))
    v -= np.float32(0.9)
    v *= np.float32(10.0)
    return clip01(v)


def paint_atelectasis(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    edge = 1.5 * canvas.pixel
    if f.variant == "plate":
        ext = f.rx + 0.02
        win = canvas.window(f.cx - ext, f.cy - ext, f.cx + ext, f.cy + ext)
        if win is None:
            return None
        X, Y = canvas.grids(win)
        plate = soft_ellipse(X, Y, f.cx, f.cy, f.rx, f.ry, edge, f.angle)
        return _fill(canvas, layers, win, plate * np.float32(f.strength))
    # wedge: apex (cx, cy) near the hilum, opening towards the base at `angle` below horizontal
    t = math.radians(f.angle)
    dx, dy = f.side * math.cos(t), math.sin(t)
    L, half = f.rx, f.ry
    x_end, y_end = f.cx + dx * L, f.cy + dy * L
    spread = L * half * 1.05
    win = canvas.window(min(f.cx, x_end) - spread, min(f.cy, y_end) - spread, max(f.cx, x_end) + spread, max(f.cy, y_end) + spread)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    px, py = X - np.float32(f.cx), Y - np.float32(f.cy)
    along = px * np.float32(dx) + py * np.float32(dy)
    across = np.abs(py * np.float32(dx) - px * np.float32(dy))
    wedge = ramp(along * np.float32(half) - across, edge) * ramp(along, edge) * ramp(np.float32(L) - along, 4 * edge)
    return _fill(canvas, layers, win, wedge * np.float32(f.strength))


def paint_effusion(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    cx, cy, ax, ay = lung_geometry(a, f.side)
    win = canvas.window(cx - ax, cy - ay, cx + ax, cy + ay + 0.1)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    dome = dome_y(X, a)
    lateral = (X - np.float32(cx)) * np.float32(f.side / ax)  # -1 medial .. +1 lateral
    y_lateral = float(dome_y(cx + f.side * 0.95 * ax, a))
    level = np.float32(y_lateral - f.ry)
    drop = np.float32(1.0) - lateral
    drop *= drop
    drop *= np.float32(0.25)
    meniscus = level + np.float32(f.rx) * drop  # highest at the lateral wall
    fluid = ramp(Y - meniscus, 3 * canvas.pixel) * ramp(dome + np.float32(0.02) - Y, 2 * canvas.pixel)
    fluid *= ramp(lateral + np.float32(1.1), 0.1)
    return _fill(canvas, layers, win, fluid * np.float32(f.strength))


def paint_infiltration(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    r = np.random.default_rng(f.seed)
    win = canvas.window(f.cx - f.rx, f.cy - f.ry, f.cx + f.rx, f.cy + f.ry)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    patches = np.zeros_like(X)
    for _ in range(int(r.integers(3, 7))):
        ang, rad = r.uniform(0, 2 * math.pi), math.sqrt(r.uniform(0, 1))
        pr = r.uniform(0.35, 0.55)
        px = f.cx + math.cos(ang) * rad * (1 - pr) * f.rx
        py = f.cy + math.sin(ang) * rad * (1 - pr) * f.ry
        np.maximum(patches, bump(X, Y, px, py, pr * f.rx, pr * f.ry * r.uniform(0.8, 1.2)), out=patches)
    patches *= np.float32(0.45) + np.float32(0.55) * _texture(X, Y, f.seed, 0.07)
    return _fill(canvas, layers, win, patches * np.float32(f.strength * 1.3))


def _lesion(canvas: Canvas, layers: Layers, f: Finding, lobes: int, density: float) -> PixelBox | None:
    """Solid round/lobulated lesion: fills the air and adds density, sharp edge."""
    r = np.random.default_rng(f.seed)
    ext = max(f.rx, f.ry) * 1.5
    win = canvas.window(f.cx - ext, f.cy - ext, f.cx + ext, f.cy + ext)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    edge = 1.5 * canvas.pixel
    shape = soft_ellipse(X, Y, f.cx, f.cy, f.rx, f.ry, edge, f.angle)
    for _ in range(lobes):
        ang = r.uniform(0, 2 * math.pi)
        off = 0.45 * f.rx
        np.maximum(shape, soft_ellipse(X, Y, f.cx + off * math.cos(ang), f.cy + off * math.sin(ang),
                                       0.6 * f.rx, 0.6 * f.ry, edge), out=shape)
    layers.solid[win] += shape * np.float32(density)
    box = _fill(canvas, layers, win, shape * np.float32(f.strength))
    return union_box(box, support_box(shape > 0, win))


def paint_mass(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    return _lesion(canvas, layers, f, lobes=2, density=0.06 * f.strength)


def paint_nodule(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    return _lesion(canvas, layers, f, lobes=0, density=0.10 * f.strength)


def paint_pneumonia(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    win = canvas.window(f.cx - f.rx * 1.2, f.cy - f.ry * 1.2, f.cx + f.rx * 1.2, f.cy + f.ry * 1.2)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    cloud = bump(X, Y, f.cx, f.cy, f.rx, f.ry, f.angle)
    np.sqrt(cloud, out=cloud)
    cloud *= np.float32(1.5)
    clip01(cloud)
    cloud *= np.float32(0.78) + np.float32(0.22) * _texture(X, Y, f.seed, 0.05)
    cloud *= np.float32(1.0) - np.float32(0.45) * _bronchograms(X, Y, f.seed, f.cx - f.side * f.rx, f.cy - 0.3 * f.ry, canvas.pixel)
    return _fill(canvas, layers, win, cloud * np.float32(f.strength))


def paint_pneumothorax(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    cx, cy, ax, ay = lung_geometry(a, f.side)
    d = f.rx
    win = canvas.window(cx - ax, cy - ay, cx + ax, f.cy + 0.05)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    icx, icy, iax, iay = cx - f.side * 0.5 * d, cy + 0.6 * d, ax - d, ay - d
    r_in = np.sqrt(ellipse_r2(X, Y, icx, icy, iax, iay))
    lateral = (X - np.float32(cx)) * np.float32(f.side / ax)
    sector = ramp(np.float32(f.cy) - Y, 0.04) * ramp(lateral + np.float32(0.05), 0.2)
    air = layers.air[win]
    lungish = clip01(air * np.float32(10.0))
    region = ramp((r_in - np.float32(1.0)) * np.float32(min(iax, iay)), 1.5 * canvas.pixel) * sector * lungish
    line = ramp(np.float32(1.2 * canvas.pixel) - np.abs(r_in - np.float32(1.0)) * np.float32(min(iax, iay)), canvas.pixel)
    line *= sector * lungish
    layers.vessel[win] *= np.float32(1.0) - region
    air += region * np.float32(f.strength)
    layers.solid[win] += line * np.float32(0.5 * f.strength)
    return union_box(support_box(region > 0, win), support_box(line > 0, win))


def paint_consolidation(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    win = canvas.window(f.cx - f.rx, f.cy - f.ry, f.cx + f.rx, f.cy + f.ry)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    env = bump(X, Y, f.cx, f.cy, f.rx, f.ry)
    np.sqrt(env, out=env)
    env *= np.float32(2.5)
    clip01(env)
    t = math.radians(f.angle)
    # fissure: a straight sharp border through the centre (upper lobe: opacity above it)
    sign = np.float32(1.0 if f.variant == "upper" else -1.0)
    dist = ((Y - np.float32(f.cy + (0.25 if f.variant == "upper" else -0.25) * f.ry)) * np.float32(math.cos(t))
            - (X - np.float32(f.cx)) * np.float32(math.sin(t))) * (-sign)
    fissure = ramp(dist, 1.2 * canvas.pixel)
    lobe = env * fissure
    lobe *= np.float32(1.0) - np.float32(0.3) * _bronchograms(X, Y, f.seed, f.cx, f.cy, canvas.pixel)
    return _fill(canvas, layers, win, lobe * np.float32(f.strength))


def paint_edema(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    boxes = []
    for side in (-1, 1):
        cx, cy, ax, ay = lung_geometry(a, side)
        hx = side * (a.mediastinum_half_width + 0.5 * f.rx)
        win = canvas.window(min(hx - f.rx, cx - ax), cy - ay, max(hx + f.rx, cx + ax), cy + ay)
        if win is None:
            continue
        X, Y = canvas.grids(win)
        haze = bump(X, Y, hx, cy + 0.05, f.rx * 1.6, f.ry)
        np.sqrt(haze, out=haze)
        haze *= np.float32(f.strength)
        # Kerley B lines: short horizontal lines at the lateral base
        yb = cy + 0.45 * ay
        lines = ramp(np.float32(0.5 * 0.03) - periodic_distance(Y - np.float32(yb), 0.055), canvas.pixel)
        lateral = (X - np.float32(cx)) * np.float32(side / ax)
        lines *= ramp(lateral - np.float32(0.55), 0.05) * ramp(np.float32(0.12) - np.abs(Y - np.float32(yb)), 0.04)
        haze += lines * np.float32(1.2 * f.strength)
        boxes.append(_fill(canvas, layers, win, haze))
    return union_box(*boxes)


def paint_fibrosis(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    boxes = []
    for side in ((-1, 1) if f.side == 0 else (f.side,)):
        cx, cy, ax, ay = lung_geometry(a, side)
        ex, ey = cx + side * 0.35 * ax, cy + 0.35 * ay
        rx, ry = f.rx * ax, f.ry * ay
        win = canvas.window(ex - rx, ey - ry, ex + rx, ey + ry)
        if win is None:
            continue
        X, Y = canvas.grids(win)
        env = bump(X, Y, ex, ey, rx, ry)
        np.sqrt(env, out=env)
        t = math.radians(f.angle)
        c, s = np.float32(math.cos(t)), np.float32(math.sin(t))
        u = X * c + Y * s
        v = Y * c - X * s
        wig = np.float32(0.025) * np.sin(v * np.float32(41.0) + np.float32(f.seed % 7)) + np.float32(0.015) * np.sin(u * np.float32(29.0))
        period, half = 0.065, np.float32(0.009)
        net = np.maximum(ramp(half - periodic_distance(u + wig, period), canvas.pixel),
                         ramp(half - periodic_distance(v - wig, period), canvas.pixel))
        net *= env
        boxes.append(_fill(canvas, layers, win, net * np.float32(f.strength * 1.3)))
    return union_box(*boxes)


def paint_pleural_thickening(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    cx, cy, ax, ay = lung_geometry(a, f.side)
    if f.variant == "apical":
        win = canvas.window(cx - ax, cy - ay, cx + ax, f.cy)
    else:
        win = canvas.window(cx - ax, f.cy - f.ry, cx + ax, f.cy + f.ry)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    inside = (np.float32(1.0) - np.sqrt(ellipse_r2(X, Y, cx, cy, ax, ay))) * np.float32(min(ax, ay))
    thick = np.float32(f.rx) * (np.float32(1.0) + np.float32(0.3) * np.sin(Y * np.float32(23.0) + np.float32(f.seed % 11)))
    rim = ramp(thick - inside, 1.5 * canvas.pixel)
    if f.variant == "apical":
        rim *= ramp(np.float32(f.cy) - Y, 0.05)
    else:
        lateral = (X - np.float32(cx)) * np.float32(f.side / ax)
        rim *= ramp(lateral, 0.1) * ramp(np.float32(f.ry) - np.abs(Y - np.float32(f.cy)), 0.08)
    layers.solid[win] += rim * (layers.air[win] > 0) * np.float32(0.10 * f.strength)
    return _fill(canvas, layers, win, rim * np.float32(f.strength))


def paint_hernia(canvas: Canvas, layers: Layers, a: Anatomy, f: Finding) -> PixelBox | None:
    win = canvas.window(f.cx - f.rx, f.cy - f.ry, f.cx + f.rx, f.cy + f.ry)
    if win is None:
        return None
    X, Y = canvas.grids(win)
    edge = 1.5 * canvas.pixel
    sac = soft_ellipse(X, Y, f.cx, f.cy, f.rx, f.ry, edge)
    level = np.float32(f.cy - 0.15 * f.ry)
    gas = sac * ramp(level - Y, canvas.pixel)
    layers.solid[win] += sac * np.float32(0.14 * f.strength)
    layers.air[win] += gas * np.float32(0.35 * f.strength)
    return support_box(sac > 0, win)


PAINTERS: dict[str, Painter] = {
    "Atelectasis": paint_atelectasis,
    "Effusion": paint_effusion,
    "Infiltration": paint_infiltration,
    "Mass": paint_mass,
    "Nodule": paint_nodule,
    "Pneumonia": paint_pneumonia,
    "Pneumothorax": paint_pneumothorax,
    "Consolidation": paint_consolidation,
    "Edema": paint_edema,
    "Fibrosis": paint_fibrosis,
    "Pleural_Thickening": paint_pleural_thickening,
    "Hernia": paint_hernia,
}
assert set(PAINTERS) | set(ANATOMY_FINDINGS) == set(FINDINGS)
