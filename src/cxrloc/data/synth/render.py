"""Render one phantom image with a given set of findings, and the true box of each finding.

``render(phantom, findings, size)`` is a pure function of its arguments: the same
phantom with and without a finding gives images that differ only inside that
finding's true box (noise is drawn from the phantom's own seed, exposure is set
by the acquisition, never from the pixels, and blur spreads a change by at most
:func:`blur_radius` pixels, which the boxes include).

Pipeline (all vectorised NumPy, float32): anatomy layers -> anatomy findings
(cardiomegaly, emphysema: changed anatomy) -> painted findings -> density ->
exposure (linear) -> signal-dependent noise -> separable binomial blur ->
8-bit with a gamma look-up table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxrloc.data.synth.anatomy import Phantom, render_anatomy
from cxrloc.data.synth.canvas import Canvas, PixelBox, dilate_box, support_box, union_box
from cxrloc.data.synth.findings import ANATOMY_FINDINGS, PAINTERS, Finding, modify_anatomy

#: A true box in the image's pixel coordinates: x, y (top-left), w, h.
Box = tuple[int, int, int, int]


@dataclass
class Rendered:
    """One rendered image.

    Attributes:
        image: (S, S) uint8, 8-bit grey.
        boxes: finding kind -> true box (x, y, w, h) in pixels; every planted finding
            has one (a finding pushed entirely out of the image gets none).
    """

    image: np.ndarray
    boxes: dict[str, Box]


def blur_passes(sigma_px: float) -> tuple[int, float]:
    """(number of passes, side weight) of the binomial blur with standard deviation ``sigma_px``.

    One pass of the kernel [w, 1 - 2w, w] adds variance 2w (w <= 0.25).
    """
    var = max(float(sigma_px), 0.0) ** 2
    if var < 1e-6:
        return 0, 0.0
    n = int(np.ceil(var / 0.5))
    return n, var / (2.0 * n)


def blur_radius(phantom: Phantom, size: int) -> int:
    """How many pixels the blur spreads a change (the true boxes are grown by this)."""
    return blur_passes(phantom.acquisition.blur_sigma * size / 256.0)[0]


def _blur(img: np.ndarray, passes: int, w: float) -> np.ndarray:
    """Separable blur, kernel [w, 1 - 2w, w] ``passes`` times along each axis, edges replicated."""
    w = np.float32(w)
    c = np.float32(1.0) - 2 * w
    for axis in (0, 1):
        for _ in range(passes):
            src = img if axis == 0 else img.T
            out = src * c
            out[1:] += src[:-1] * w
            out[:-1] += src[1:] * w
            out[0] += src[0] * w
            out[-1] += src[-1] * w
            img = out if axis == 0 else out.T
    return np.ascontiguousarray(img)


def _to_pixels(box: PixelBox) -> Box:
    return (box[0], box[1], box[2] - box[0] + 1, box[3] - box[1] + 1)


def render(phantom: Phantom, findings: Sequence[Finding], size: int) -> Rendered:
    """Render ``phantom`` with ``findings`` at ``size`` x ``size`` pixels.

    Args:
        phantom: anatomy + acquisition (pose, exposure, noise seed).
        findings: planted findings (at most one per kind is expected).
        size: side of the square image, pixels.

    Returns:
        :class:`Rendered` with the (S, S) uint8 image and the true box of each finding.
    """
    findings = list(findings)
    acq = phantom.acquisition
    canvas = Canvas(size, acq.pose)
    anatomy_findings = [f for f in findings if f.kind in ANATOMY_FINDINGS]
    anatomy = modify_anatomy(phantom.anatomy, anatomy_findings)
    layers, info = render_anatomy(canvas, anatomy, acq)
    raw: dict[str, PixelBox | None] = {}
    if anatomy_findings:
        density = layers.density()
        for f in anatomy_findings:
            others = [g for g in anatomy_findings if g is not f]
            base_layers, base_info = render_anatomy(canvas, modify_anatomy(phantom.anatomy, others), acq)
            changed = support_box(density != base_layers.density(), (slice(0, size), slice(0, size)))
            visible = info.heart_box if f.kind == "Cardiomegaly" else info.lungs_box
            raw[f.kind] = union_box(changed, visible)
    for f in findings:
        if f.kind not in ANATOMY_FINDINGS:
            raw[f.kind] = PAINTERS[f.kind](canvas, layers, anatomy, f)

    density = layers.density()
    intensity = density * np.float32(acq.high - acq.low)
    intensity += np.float32(acq.low)
    noise = np.random.default_rng(acq.noise_seed).random((size, size), dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(acq.noise * 3.4641016)  # uniform with std = acq.noise
    signal = np.clip(intensity, 0.0, 1.0)
    signal *= np.float32(0.8)
    signal += np.float32(0.6)
    noise *= signal
    intensity += noise
    passes, w = blur_passes(acq.blur_sigma * size / 256.0)
    if passes:
        intensity = _blur(intensity, passes, w)
    intensity *= np.float32(255.0)
    intensity += np.float32(0.5)
    np.maximum(intensity, 0.0, out=intensity)
    np.minimum(intensity, 255.0, out=intensity)
    lut = np.round(255.0 * (np.arange(256) / 255.0) ** acq.gamma).astype(np.uint8)
    image = lut[intensity.astype(np.uint8)]
    boxes = {k: _to_pixels(dilate_box(b, passes, size)) for k, b in raw.items() if b is not None}
    return Rendered(image=image, boxes=boxes)
