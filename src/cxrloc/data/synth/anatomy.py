"""The phantom body: patient anatomy, image acquisition, and the layer fields they render to.

A phantom image is the sum of *layers* on the canvas (all (S, S) float32, in
"density" units where soft tissue is about 0.8 and the lungs' air about 0.45):

    D = soft + bone + solid - (air - vessel) * (1 - clip(fill, 0, 1))

``soft`` is soft tissue (body, mediastinum, heart, abdomen, breasts), ``bone``
clavicles, ribs and spine, ``air`` the air thickness in the lungs (plus
trachea and gastric bubble), ``vessel`` the lung markings (tissue inside
aerated lung), ``fill`` the fraction of air replaced by fluid or tissue
(airspace findings add to it), ``solid`` extra density of solid lesions.
Anatomy is drawn in canonical coordinates (see :mod:`.canvas`): x from the
patient's right (-1, image left) to left (+1), y from top (-1) to bottom (+1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cxrloc.data.synth.canvas import (
    Canvas,
    PixelBox,
    Pose,
    clip01,
    ellipse_r2,
    ramp,
    soft_ellipse,
    support_box,
    union_box,
)

SIDES = (-1, 1)  # -1: image left (patient's right lung), +1: image right (patient's left lung)


@dataclass(frozen=True)
class Anatomy:
    """Patient-level body shape (canonical units; fixed across a patient's follow-ups).

    Lungs are ellipses cut by the diaphragm domes and by the heart and mediastinum;
    ``side`` -1 is the image-left lung. Emphysema and cardiomegaly are drawn by
    changing these numbers (see :mod:`.findings`).
    """

    sex: str = "M"
    body_half_width: float = 0.92
    soft_density: float = 0.62  # soft tissue at the body's edge
    soft_central: float = 0.2  # extra thickness at the midline
    lung_cx: float = 0.40  # |x| of the lung centres
    lung_cy: float = 0.0
    lung_ax: float = 0.33  # lung half-width
    lung_ay: float = 0.74  # lung half-height
    right_lung_scale: float = 1.03  # image-left (patient's right) lung a little wider
    dome_y: tuple[float, float] = (0.60, 0.65)  # dome base line per side (image left, image right)
    dome_height: float = 0.16  # height of the dome above its base line
    dome_half_width: float = 0.42
    heart_cx: float = 0.09
    heart_cy: float = 0.33
    heart_ax: float = 0.33
    heart_ay: float = 0.24
    heart_angle: float = -15.0  # degrees; apex to the image right and down
    heart_scale: float = 1.0  # cardiomegaly multiplies this
    heart_density: float = 0.10
    mediastinum_half_width: float = 0.11
    air_density: float = 0.48
    vessel_strength: float = 0.22  # markings as a fraction of air
    vessel_phase: tuple[float, float, float, float] = (0.0, 1.0, 2.0, 3.0)
    rib_spacing: float = 0.135
    rib_phase: float = 0.0
    rib_density: float = 0.06
    clavicle_y: float = -0.66
    clavicle_slope: float = -0.16
    bone_density: float = 0.12
    gastric_bubble: float = 0.25  # air of the gastric bubble (0: none)
    breast: float = 0.0  # soft-tissue density of breast shadows (0: none)
    hyperinflation: float = 0.0  # emphysema: 0 normal, 1 strongly hyperinflated


@dataclass(frozen=True)
class Acquisition:
    """Image-level acquisition: pose on the detector, exposure, noise and blur.

    ``blur_sigma`` and the noise level are in pixels / grey fractions at 256 px;
    the renderer scales blur with the image size.
    """

    pose: Pose = field(default_factory=Pose)
    inspiration: float = 0.0  # canonical shift of the domes (+ = deeper breath, lower domes)
    low: float = 0.04  # intensity at density 0
    high: float = 1.0  # intensity at density 1
    gamma: float = 1.0
    noise: float = 0.02  # std of the quantum noise (fraction of full scale, before blur)
    blur_sigma: float = 0.7
    noise_seed: int = 0
    view: str = "PA"


@dataclass(frozen=True)
class Phantom:
    """One image of one patient, without findings: ``render(phantom, findings)`` adds them."""

    anatomy: Anatomy = field(default_factory=Anatomy)
    acquisition: Acquisition = field(default_factory=Acquisition)


class Layers:
    """The density layers of one image (see the module docstring), each (S, S) float32."""

    NAMES = ("soft", "bone", "air", "vessel", "fill", "solid")

    def __init__(self, size: int):
        for name in self.NAMES:
            setattr(self, name, np.zeros((size, size), dtype=np.float32))

    def density(self) -> np.ndarray:
        """D = soft + bone + solid - (air - vessel) * (1 - clip(fill, 0, 1)), (S, S) float32."""
        keep = np.clip(self.fill, 0.0, 1.0)
        np.subtract(1.0, keep, out=keep)
        aer = self.air - self.vessel
        aer *= keep
        d = self.soft + self.bone
        d += self.solid
        d -= aer
        return d


@dataclass
class AnatomyInfo:
    """Where things ended up in this image (pixel boxes) and per-lung geometry for findings."""

    heart_box: PixelBox | None = None
    lungs_box: PixelBox | None = None


# ---------------------------------------------------------------- geometry helpers
def lung_geometry(a: Anatomy, side: int) -> tuple[float, float, float, float]:
    """(cx, cy, ax, ay) of the lung ellipse on ``side`` (-1 image left, +1 image right)."""
    scale = a.right_lung_scale if side < 0 else 1.0
    infl = 1.0 + 0.10 * a.hyperinflation
    ax = a.lung_ax * scale * (1.0 + 0.04 * a.hyperinflation)
    ay = a.lung_ay * infl
    cy = a.lung_cy + (ay - a.lung_ay) * 0.5
    return side * (a.lung_cx + (ax - a.lung_ax) * 0.5), cy, ax, ay


def dome_params(a: Anatomy, acq: Acquisition | None = None) -> tuple[float, float, float]:
    """(base y image-left, base y image-right, dome height) after inspiration and hyperinflation."""
    shift = (acq.inspiration if acq is not None else 0.0) + 0.12 * a.hyperinflation
    height = a.dome_height * (1.0 - 0.75 * a.hyperinflation)
    return a.dome_y[0] + shift, a.dome_y[1] + shift, height


def dome_y(X: np.ndarray | float, a: Anatomy, acq: Acquisition | None = None) -> np.ndarray:
    """Height of the diaphragm at x (canonical y; larger = lower). Continuous across the midline."""
    yl, yr, h = dome_params(a, acq)
    X = np.asarray(X, dtype=np.float32)
    base = np.float32(0.5 * (yl + yr)) + np.float32(0.5 * (yr - yl)) * np.clip(X * np.float32(5.0), -1.0, 1.0)
    u = (np.abs(X) - np.float32(0.38)) * np.float32(1.0 / a.dome_half_width)
    u *= u
    return base - np.float32(h) * (1.0 - u)


def heart_geometry(a: Anatomy) -> tuple[float, float, float, float]:
    """(cx, cy, ax, ay) of the heart ellipse, grown about a point near its right border."""
    s = a.heart_scale
    ax, ay = a.heart_ax * s, a.heart_ay * (1.0 + 0.6 * (s - 1.0))
    # enlarge mostly towards the apex (image right) and down, as a dilated heart does
    cx = a.heart_cx + (ax - a.heart_ax) * 0.55
    cy = a.heart_cy + (ay - a.heart_ay) * 0.4
    return cx, cy, ax, ay


# ---------------------------------------------------------------- rendering
def render_anatomy(canvas: Canvas, a: Anatomy, acq: Acquisition) -> tuple[Layers, AnatomyInfo]:
    """Draw the normal (finding-free) body into fresh layers.

    Returns:
        layers: :class:`Layers` with soft, bone, air, vessel filled (fill, solid zero).
        info: pixel boxes of the visible heart silhouette and of both lungs.
    """
    layers = Layers(canvas.size)
    X, Y = canvas.X, canvas.Y
    px = canvas.pixel
    edge = 2.0 * px
    info = AnatomyInfo()

    # body (superellipse) with a thicker midline
    bw = a.body_half_width
    u = X * np.float32(1.0 / bw)
    u *= u
    v = (Y - np.float32(0.18)) * np.float32(1.0 / 1.18)
    v *= v
    body = u * np.sqrt(u)
    body += v * np.sqrt(v)
    body = ramp(np.float32(1.0) - body, 0.06)
    soft = layers.soft
    np.multiply(np.float32(1.0) - u, np.float32(a.soft_central), out=soft)
    soft += np.float32(a.soft_density)
    soft *= body

    # abdomen below the domes is denser; `above` = 1 in the chest
    above = np.ones_like(soft)
    below = np.zeros_like(soft)
    yl, yr, h = dome_params(a, acq)
    low = canvas.window(-1.3, min(yl, yr) - h - 0.05, 1.3, 1.6)
    if low is not None:
        Xw, Yw = canvas.grids(low)
        b = ramp(Yw - dome_y(Xw, a, acq), edge)
        below[low] = b
        above[low] -= b
        soft[low] += np.float32(0.10) * b * body[low]

    # central column: spine (faint), mediastinum, aortic knob, trachea
    med = np.zeros_like(soft)
    col = canvas.window(-0.19, -1.3, 0.21, 1.3)
    if col is not None:
        Xw, Yw = canvas.grids(col)
        bw_, ab_, be_ = body[col], above[col], below[col]
        spine = ramp(np.float32(0.075) - np.abs(Xw), edge)
        vert = (Yw + np.float32(1.0)) * np.float32(1.0 / 0.11)
        vert -= np.floor(vert)
        vert = np.abs(vert - np.float32(0.5))
        soft[col] += spine * (np.float32(0.04) + np.float32(0.04) * vert * ab_ - np.float32(0.01) * be_) * bw_
        med_w = np.float32(a.mediastinum_half_width) + np.float32(0.02) * ramp(Yw + np.float32(0.35), 0.3)
        med[col] = ramp(med_w - np.abs(Xw - np.float32(0.01)), edge)
    kx = a.mediastinum_half_width + 0.02
    kw = canvas.window(kx - 0.075, -0.36, kx + 0.075, -0.24)
    if kw is not None:
        Xw, Yw = canvas.grids(kw)
        np.maximum(med[kw], soft_ellipse(Xw, Yw, kx, -0.30, 0.075, 0.06, edge), out=med[kw])
    if col is not None:
        soft[col] += np.float32(0.06) * med[col] * above[col]
    tw = canvas.window(-0.03, -1.3, 0.05, -0.2)
    if tw is not None:
        Xw, Yw = canvas.grids(tw)
        trachea = ramp(np.float32(0.028) - np.abs(Xw - np.float32(0.01)), edge) * ramp(np.float32(-0.28) - Yw, 0.08)
        layers.air[tw] += np.float32(0.22) * trachea

    # heart: visible above the domes only
    heart = np.zeros_like(soft)
    hcx, hcy, hax, hay = heart_geometry(a)
    ext = max(hax, hay)
    hw = canvas.window(hcx - ext, hcy - ext, hcx + ext, hcy + ext)
    if hw is not None:
        Xw, Yw = canvas.grids(hw)
        hm = soft_ellipse(Xw, Yw, hcx, hcy, hax, hay, edge, a.heart_angle)
        hm *= above[hw]
        heart[hw] = hm
        soft[hw] += np.float32(a.heart_density) * hm
        info.heart_box = support_box(hm > 0, hw)

    if a.breast > 0:
        for s in SIDES:
            bw2 = canvas.window(s * 0.5 - 0.36, 0.36, s * 0.5 + 0.36, 0.88)
            if bw2 is not None:
                Xw, Yw = canvas.grids(bw2)
                soft[bw2] += np.float32(a.breast) * soft_ellipse(Xw, Yw, s * 0.50, 0.62, 0.36, 0.26, 0.25) * body[bw2]

    if a.gastric_bubble > 0:
        gw = canvas.window(0.26, yr + 0.015, 0.46, yr + 0.125)
        if gw is not None:
            Xw, Yw = canvas.grids(gw)
            layers.air[gw] += np.float32(a.gastric_bubble) * soft_ellipse(Xw, Yw, 0.36, yr + 0.07, 0.10, 0.055, edge)

    # lungs: ellipses cut by the domes and the mediastinum/heart; air deeper in the middle.
    # Posterior ribs (curved periodic bands) are drawn on the same windows, a little wider.
    lung_boxes = []
    air_scale = np.float32(a.air_density * (1.0 + 0.35 * a.hyperinflation))
    for side in SIDES:
        cx, cy, ax, ay = lung_geometry(a, side)
        win = canvas.window(cx - 1.1 * ax, cy - 1.05 * ay, cx + 1.1 * ax, min(cy + ay, max(yl, yr) + 0.04))
        if win is None:
            continue
        Xw, Yw = canvas.grids(win)
        r2 = ellipse_r2(Xw, Yw, cx, cy, ax, ay)
        r = np.sqrt(r2)
        # wall: 1 inside, linear edge `edge` wide ending on the ellipse (signed distance ~ (1 - r) ax)
        lung = r * np.float32(-ax / edge)
        lung += np.float32(ax / edge)
        clip01(lung)
        lung *= above[win]
        lung *= np.float32(1.0) - np.maximum(med[win], heart[win])
        air = np.float32(1.0) - np.float32(0.45) * r2
        air *= lung
        air *= air_scale
        layers.air[win] += air
        layers.vessel[win] += air * _vessels(Xw, Yw, a, side)
        lung_boxes.append(support_box(lung > 0, win))
        cage = r * np.float32(-1.0 / 0.08)
        cage += np.float32(1.08 / 0.08 + 0.5)
        clip01(cage)
        cage *= lung * np.float32(0.7) + np.float32(0.3)
        q = (Yw + np.float32(0.08) * np.abs(Xw) - np.float32(0.65) * Xw * Xw) * np.float32(1.0 / a.rib_spacing)
        q += np.float32(a.rib_phase)
        q -= np.floor(q)
        q -= np.float32(0.5)
        np.abs(q, out=q)
        rib = ramp((q - np.float32(0.33)) * np.float32(a.rib_spacing), edge)
        rib *= cage
        rib *= body[win]
        layers.bone[win] += np.float32(a.rib_density) * rib
    info.lungs_box = union_box(*lung_boxes)

    # clavicles: slightly curved bars from the sternal notch outwards and upwards
    win = canvas.window(-0.78, -0.95, 0.78, -0.52)
    if win is not None:
        Xw, Yw = canvas.grids(win)
        t = np.abs(Xw) - np.float32(0.08)
        yc = np.float32(a.clavicle_y) + np.float32(a.clavicle_slope) * t + np.float32(0.22) * t * t * (t - np.float32(0.6))
        clav = ramp(np.float32(0.032) - np.abs(Yw - yc), edge)
        clav *= ramp(t, 0.04) * ramp(np.float32(0.66) - t, 0.06)
        clav *= body[win]
        layers.bone[win] += np.float32(a.bone_density) * clav
    return layers, info


def _vessels(X: np.ndarray, Y: np.ndarray, a: Anatomy, side: int) -> np.ndarray:
    """Lung markings: broken lines radiating from the hilum, fading to the periphery.

    Returns (h, w) float32: the fraction of the air that vessels replace (at most
    ``vessel_strength`` in the markings, 0.35 at the hilum).
    """
    hx, hy = side * (a.mediastinum_half_width + 0.06), -0.04
    dx = (X - np.float32(hx)) * np.float32(side)
    dy = Y - np.float32(hy)
    rho = dx * dx
    rho += dy * dy
    np.sqrt(rho, out=rho)
    # tan(theta / 2) = dy / (rho + dx): constant along rays from the hilum (no arctan2 needed)
    half_tan = rho + dx
    half_tan += np.float32(1e-3)
    np.divide(dy, half_tan, out=half_tan)
    p = a.vessel_phase
    wig = np.sin(rho * np.float32(9.0) + np.float32(p[0]))
    wig *= np.float32(1.3)
    wig += half_tan * np.float32(26.0)
    wig += np.float32(p[1])
    v = np.cos(wig)
    fade = np.float32(1.0) - rho * np.float32(1.0 / 0.75)
    clip01(fade)
    v -= np.float32(0.93)
    v += np.float32(0.1) * fade
    v *= np.float32(12.0)
    clip01(v)
    v *= fade
    v *= np.float32(a.vessel_strength * (1.0 - 0.7 * a.hyperinflation))
    hilum = np.float32(1.0) - rho * np.float32(1.0 / 0.16)
    clip01(hilum)
    hilum *= np.float32(0.35)
    v += hilum
    return v


# ---------------------------------------------------------------- sampling
def sample_anatomy(rng: np.random.Generator, sex: str) -> Anatomy:
    """A random normal patient (no findings): proportions vary by a few percent."""
    male = sex == "M"
    u = rng.uniform
    return Anatomy(
        sex=sex,
        body_half_width=u(0.86, 0.97) * (1.0 if male else 0.97),
        soft_density=u(0.46, 0.56),
        soft_central=u(0.14, 0.24),
        lung_cx=u(0.38, 0.42),
        lung_cy=u(-0.03, 0.03),
        lung_ax=u(0.30, 0.35),
        lung_ay=u(0.70, 0.78),
        right_lung_scale=u(1.0, 1.06),
        dome_y=(u(0.56, 0.64), u(0.61, 0.69)),
        dome_height=u(0.12, 0.19),
        dome_half_width=u(0.38, 0.46),
        heart_cx=u(0.06, 0.12),
        heart_cy=u(0.30, 0.36),
        heart_ax=u(0.33, 0.38),
        heart_ay=u(0.21, 0.26),
        heart_angle=u(-22.0, -8.0),
        heart_scale=u(0.93, 1.04),
        heart_density=u(0.03, 0.07),
        mediastinum_half_width=u(0.095, 0.125),
        air_density=u(0.42, 0.54),
        vessel_strength=u(0.14, 0.22),
        vessel_phase=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 4)),
        rib_spacing=u(0.125, 0.145),
        rib_phase=u(0.0, 1.0),
        rib_density=u(0.05, 0.09),
        clavicle_y=u(-0.70, -0.62),
        clavicle_slope=u(-0.22, -0.10),
        bone_density=u(0.08, 0.13),
        gastric_bubble=u(0.12, 0.32) if rng.random() < 0.6 else 0.0,
        breast=u(0.04, 0.09) if (not male and rng.random() < 0.8) else 0.0,
    )


def sample_acquisition(rng: np.random.Generator, noise_scale: float = 1.0) -> Acquisition:
    """Random pose, exposure and noise of one image; ``noise_scale`` comes from the difficulty."""
    u = rng.uniform
    return Acquisition(
        pose=Pose(shift_x=u(-0.035, 0.035), shift_y=u(-0.03, 0.04), rotation_deg=u(-4.0, 4.0), zoom=u(0.90, 1.04)),
        inspiration=u(-0.04, 0.04),
        low=u(-0.02, 0.10),
        high=u(0.95, 1.12),
        gamma=u(0.8, 1.25),
        noise=u(0.012, 0.03) * noise_scale,
        blur_sigma=u(0.45, 1.0),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        view="PA" if rng.random() < 0.6 else "AP",
    )
