"""Boxes: from a localization map to boxes, IoU / IoBB, and coordinate scaling.

Conventions (all boxes):
    * format ``(x, y, w, h)`` as in ``BBox_List_2017.csv``, float, in *continuous* pixel
      coordinates: pixel column ``j`` covers ``[j, j + 1)``, so a box holding pixel
      columns ``j0..j1`` is ``x = j0, w = j1 - j0 + 1``.
    * a "size" is ``(width, height)`` as in the cache index (``orig_width, orig_height``).
    * arrays of boxes have shape ``(..., 4)``; functions broadcast over the leading dims.

From map to box (METHOD.md, inference; Wang et al. 2017):
    the eq. 11 map on the model's grid ``(h, w)`` (e.g. 7 x 7, normalised to [0, 1]) is
    upsampled bilinearly to the original image size ``(H, W)`` (PyTorch's
    ``interpolate(mode="bilinear", align_corners=False)`` convention) and thresholded
    (``value > threshold``). Box modes:

    * ``"max_component"`` (default, ours): the bounding box of the connected component of
      the thresholded map that holds the map's maximum.
    * ``"all"`` (paper-literal): the bounding box of every pixel over the threshold.
    * ``"components"`` (Wang et al. 2017): one box per connected component.

    If no pixel is over the threshold (threshold >= the map's maximum, or a constant map),
    the box is the single pixel at the map's maximum (ours; documented, never empty).

How it is computed (ours, exact and fast): the upsampled map is never thresholded pixel by
pixel. Between four neighbouring grid cells the bilinear map is a bilinear function ``f``
(the border half-cells are the edge values extended, i.e. a degenerate bilinear patch).
Two facts make the work O((h + w)(H + W)) per map instead of O(H W) per threshold:

    1. Within a patch, for a fixed pixel column the map is linear in the row, so the
       column maximum over the patch's pixel rows is attained at its first or last pixel
       row; the pixel extent of ``{f > t}`` inside every patch follows from 2 rows and
       2 columns of the upsampled map per patch.
    2. Every connected piece of ``{f > t}`` inside a patch contains a grid cell centre
       over ``t`` (``f`` is monotone along every axis-parallel line), two adjacent cell
       centres over ``t`` are joined along their edge (``f`` is linear there), and two
       diagonal ones are joined inside the patch iff the other two are over ``t`` or the
       patch's saddle value is over ``t``. The components of ``{f > t}`` are therefore
       the components of a small graph on the grid cells, labelled with
       ``scipy.ndimage.label`` for all thresholds at once.

Components are those of the continuous bilinear map; they agree with a pixel-level
``scipy.ndimage.label`` of the upsampled map except where a neck narrower than a pixel
joins two blobs (the test suite compares both on random maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

BoxMode = Literal["max_component", "all", "components"]
BOX_MODES: tuple[str, ...] = ("max_component", "all", "components")

_GRAPH_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_GRAPH_STRUCTURE[1] = True  # 8-connectivity inside each threshold's slice, none across slices


# --------------------------------------------------------------------------- box arithmetic


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Area ``w * h`` of boxes ``(..., 4)`` (negative sizes count as 0)."""
    b = np.asarray(boxes, dtype=np.float64)
    return np.clip(b[..., 2], 0, None) * np.clip(b[..., 3], 0, None)


def intersection_area(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Area of the intersection of boxes ``a`` and ``b`` (``(..., 4)`` each, broadcast)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ax1, ay1 = a[..., 0] + np.clip(a[..., 2], 0, None), a[..., 1] + np.clip(a[..., 3], 0, None)
    bx1, by1 = b[..., 0] + np.clip(b[..., 2], 0, None), b[..., 1] + np.clip(b[..., 3], 0, None)
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    return iw * ih


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes ``(..., 4)`` (broadcast). 0 where the union is empty."""
    inter = intersection_area(a, b)
    union = box_area(a) + box_area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def iobb(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Intersection over the *predicted* box's area (Wang et al. 2017). 0 for a zero-area prediction."""
    inter = intersection_area(pred, gt)
    area = box_area(pred)
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def scale_boxes(boxes: np.ndarray, from_size: tuple[float, float], to_size: tuple[float, float]) -> np.ndarray:
    """Rescale ``(..., 4)`` xywh boxes from an image of ``from_size`` to ``to_size`` (both (W, H)).

    E.g. from the 7 x 7 grid to the original 1024 x 1024 image (each cell is 146.3 px), or
    from the cached 256 x 256 image to the original size. Continuous coordinates, so a
    round trip is exact up to floating point.
    """
    b = np.asarray(boxes, dtype=np.float64)
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    return b * np.array([sx, sy, sx, sy])


def clip_boxes(boxes: np.ndarray, size: tuple[float, float]) -> np.ndarray:
    """Clip ``(..., 4)`` xywh boxes to the image ``[0, W] x [0, H]``."""
    b = np.asarray(boxes, dtype=np.float64)
    x0 = np.clip(b[..., 0], 0, size[0])
    y0 = np.clip(b[..., 1], 0, size[1])
    x1 = np.clip(b[..., 0] + b[..., 2], 0, size[0])
    y1 = np.clip(b[..., 1] + b[..., 3], 0, size[1])
    return np.stack([x0, y0, np.clip(x1 - x0, 0, None), np.clip(y1 - y0, 0, None)], axis=-1)


def box_mask(box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Fraction of each pixel of an image of ``size`` (W, H) covered by ``box`` -> (H, W) float32.

    Used to draw oracle heatmaps from ground-truth boxes (tests, baselines).
    """
    x, y, w, h = (float(v) for v in box)
    cols = np.arange(size[0], dtype=np.float64)
    rows = np.arange(size[1], dtype=np.float64)
    cx = np.clip(np.minimum(cols + 1, x + w) - np.maximum(cols, x), 0, 1)
    cy = np.clip(np.minimum(rows + 1, y + h) - np.maximum(rows, y), 0, 1)
    return np.outer(cy, cx).astype(np.float32)


def area_coverage_grid(box: np.ndarray, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each cell of a ``grid`` (gh, gw) covered by ``box`` given in ``image_size`` pixels.

    Returns (gh, gw) float32: an oracle map on a coarse grid (e.g. 56 x 56) for round-trip tests.
    """
    gh, gw = grid
    b = scale_boxes(np.asarray(box, dtype=np.float64), image_size, (gw, gh))
    return box_mask(b, (gw, gh))


# --------------------------------------------------------------------------- bilinear upsampling


@dataclass(frozen=True)
class _Axis:
    """Bilinear sampling of one axis: ``n_out`` pixels from ``n_in`` grid cells (align_corners=False).

    The grid is padded by one replicated cell on each side (padded cell ``k`` sits at source
    coordinate ``k - 1``), so every pixel lies in exactly one band ``k`` in ``[0, n_in]``
    between padded cells ``k`` and ``k + 1``, with fraction ``frac`` towards ``k + 1``.
    """

    band: np.ndarray  # (n_out,) int
    frac: np.ndarray  # (n_out,) float64
    starts: np.ndarray  # (n_in + 1,) first pixel of each band (n_out where empty)
    ends: np.ndarray  # (n_in + 1,) last pixel of each band (-1 where empty)

    def sample(self, padded: np.ndarray, pixels: np.ndarray | slice = slice(None), axis: int = 0) -> np.ndarray:
        """Interpolate ``padded`` (cells on ``axis``) at the given output pixels of this axis."""
        band, frac = self.band[pixels], self.frac[pixels]
        lo = np.take(padded, band, axis=axis)
        hi = np.take(padded, band + 1, axis=axis)
        shape = [1] * padded.ndim
        shape[axis] = len(band)
        frac = frac.reshape(shape)
        return lo + frac * (hi - lo)

    @staticmethod
    def make(n_out: int, n_in: int) -> _Axis:
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        base = np.floor(src)
        band = base.astype(np.int64) + 1
        frac = src - base
        ids = np.arange(n_in + 1)
        starts = np.searchsorted(band, ids, side="left")
        ends = np.searchsorted(band, ids, side="right") - 1
        empty = starts > ends
        starts = np.where(empty, n_out, starts)
        ends = np.where(empty, -1, ends)
        return _Axis(band, frac, starts, ends)


def upsample_map(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a map (h, w) to ``size`` (W, H) -> (H, W) float32.

    Same values as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
    """
    grid = np.asarray(grid, dtype=np.float64)
    ay = _Axis.make(size[1], grid.shape[0])
    ax = _Axis.make(size[0], grid.shape[1])
    padded = np.pad(grid, 1, mode="edge")
    return ay.sample(ax.sample(padded, axis=1), axis=0).astype(np.float32)


# --------------------------------------------------------------------------- map -> boxes


def boxes_from_map(
    grid: np.ndarray,
    size: tuple[int, int],
    thresholds: np.ndarray | list[float] | float,
    mode: BoxMode = "max_component",
) -> list[np.ndarray]:
    """Boxes from one localization map, for several CAM thresholds at once.

    Args:
        grid: the map on its grid, (h, w) (e.g. the eq. 11 map on the 7 x 7 grid, in [0, 1]).
        size: the image size (W, H) the map is upsampled to (bilinear, align_corners=False).
        thresholds: (T,) CAM thresholds; pixels with value > threshold are kept.
        mode: ``"max_component"``, ``"all"`` or ``"components"`` (module docstring).

    Returns:
        T arrays of boxes ``(K, 4)`` xywh in pixels of ``size``; K = 1 except in
        ``"components"`` mode (components ordered by their maximum, highest first).
    """
    if mode not in BOX_MODES:
        raise ValueError(f"unknown box mode {mode!r}; expected one of {BOX_MODES}")
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"map must be a non-empty 2-D grid (h, w), got shape {grid.shape}")
    if not np.all(np.isfinite(grid)):
        raise ValueError("map contains NaN or inf values")
    W, H = int(size[0]), int(size[1])
    if W < 1 or H < 1:
        raise ValueError(f"image size must be positive, got {size}")
    ts = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    h, w = grid.shape
    ay, ax = _Axis.make(H, h), _Axis.make(W, w)
    padded = np.pad(grid, 1, mode="edge")  # (h+2, w+2)
    right = ax.sample(padded, axis=1)  # (h+2, W): the grid's rows interpolated along x
    by = np.flatnonzero(ay.starts <= ay.ends)  # non-empty row bands
    bx = np.flatnonzero(ax.starts <= ax.ends)
    # fact 1: the maximum over a row band's pixel rows is at its first or last row (per column),
    # and likewise per column band; the same rows give the upsampled map's maximum pixel
    first_rows = ay.sample(right, ay.starts[by])  # (nby, W)
    last_rows = ay.sample(right, ay.ends[by])
    colmax = np.maximum(first_rows, last_rows)  # (nby, W)
    down = ay.sample(padded, axis=0)  # (H, w+2)
    rowmax = np.maximum(ax.sample(down, ax.starts[bx], axis=1), ax.sample(down, ax.ends[bx], axis=1)).T  # (nbx, H)
    x_lo, x_hi = _band_extents(colmax, ts, ax.starts[bx])  # (T, nby, nbx)
    y_lo, y_hi = _band_extents(rowmax, ts, ay.starts[by])  # (T, nbx, nby)
    y_lo, y_hi = y_lo.transpose(0, 2, 1), y_hi.transpose(0, 2, 1)  # (T, nby, nbx)
    edge_rows = np.concatenate([ay.starts[by], ay.ends[by]])
    edge_vals = np.concatenate([first_rows, last_rows])
    peak_value = float(edge_vals.max())
    cand_r, cand_c = np.nonzero(edge_vals == peak_value)
    first = np.lexsort((cand_c, edge_rows[cand_r]))[0]  # smallest row, then column (np.argmax order)
    peak_pixel = (int(edge_rows[cand_r[first]]), int(cand_c[first]))
    fallback = np.array([peak_pixel[1], peak_pixel[0], 1.0, 1.0])

    if mode == "all":
        out = []
        for t in range(len(ts)):
            box = _union_box(x_lo[t], x_hi[t], y_lo[t], y_hi[t], np.ones(x_lo[t].shape, bool))
            out.append((box if box is not None else fallback)[None])
        return out

    labels, patch_on, split = _component_graph(padded, ts)
    out = []
    for t in range(len(ts)):
        lab = labels[t]
        patch_lab = np.where(patch_on[t], lab[1::2, 1::2], 0)[np.ix_(by, bx)]  # (nby, nbx)
        if mode == "max_component":
            comp = _pixel_component(padded, ay, ax, lab, patch_on[t], peak_pixel) if peak_value > ts[t] else 0
            wanted = [comp] if comp > 0 else []
        else:  # every component holds at least one grid cell over the threshold
            wanted = [int(c) for c in np.unique(lab[::2, ::2]) if c > 0]
        boxes: list[tuple[float, np.ndarray]] = []
        for comp in wanted:
            member = patch_lab == comp
            box = _union_box(x_lo[t], x_hi[t], y_lo[t], y_hi[t], member)
            for piece in _split_pieces(padded, ay, ax, split[t], lab, comp, ts[t]):
                box = piece if box is None else _merge_boxes(box, piece)
            if box is not None:
                boxes.append((_component_peak(padded, lab, comp), box))
        if not boxes:
            out.append(fallback[None])
        else:
            boxes.sort(key=lambda item: -item[0])
            out.append(np.stack([b for _, b in boxes]))
    return out


def _band_extents(maxima: np.ndarray, ts: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First/last pixel index over the threshold in each band segment.

    Args:
        maxima: (nb_other, n_pix) maxima of the map over the other axis' band.
        ts: (T,) thresholds.
        starts: (nb,) first pixel of each non-empty band on this axis (bands are contiguous
            and cover every pixel, so band i is ``[starts[i], starts[i + 1])``).

    Returns:
        lo, hi: (T, nb_other, nb); lo > hi where no pixel is over the threshold.
    """
    n_pix = maxima.shape[1]
    over = maxima[None] > ts[:, None, None]  # (T, nb_other, n_pix)
    idx = np.arange(n_pix)
    lo = np.minimum.reduceat(np.where(over, idx, n_pix), starts, axis=2)
    hi = np.maximum.reduceat(np.where(over, idx, -1), starts, axis=2)
    return lo, hi


def _union_box(x_lo, x_hi, y_lo, y_hi, member) -> np.ndarray | None:
    ok = member & (x_lo <= x_hi)
    if not ok.any():
        return None
    x0, x1 = x_lo[ok].min(), x_hi[ok].max()
    y0, y1 = y_lo[ok].min(), y_hi[ok].max()
    return np.array([x0, y0, x1 - x0 + 1, y1 - y0 + 1], dtype=np.float64)


def _merge_boxes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return np.array([x0, y0, x1 - x0, y1 - y0], dtype=np.float64)


def _pixel_component(padded, ay: _Axis, ax: _Axis, lab, patch_on_t, pixel: tuple[int, int]) -> int:
    """Label of the component holding ``pixel`` (row, col), whose value is over the threshold."""
    k, j = int(ay.band[pixel[0]]), int(ax.band[pixel[1]])
    if patch_on_t[k, j]:
        return int(lab[2 * k + 1, 2 * j + 1])
    # a split patch: the piece is the quadrant around the saddle that holds the pixel
    ga, gb, gc, ge = padded[k, j], padded[k, j + 1], padded[k + 1, j], padded[k + 1, j + 1]
    denom = ga - gb - gc + ge
    du = int(ax.frac[pixel[1]] > (ga - gc) / denom)
    dv = int(ay.frac[pixel[0]] > (ga - gb) / denom)
    return int(lab[2 * (k + dv), 2 * (j + du)])


def _component_peak(padded: np.ndarray, lab: np.ndarray, comp: int) -> float:
    corners = lab[::2, ::2] == comp
    return float(padded[corners].max()) if corners.any() else -np.inf


def _saddle_values(padded: np.ndarray) -> np.ndarray:
    """Saddle value of the bilinear function in every patch (h+1, w+1); +inf where there is none."""
    a, b = padded[:-1, :-1], padded[:-1, 1:]
    c, e = padded[1:, :-1], padded[1:, 1:]
    denom = a + e - b - c
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (a * e - b * c) / denom
    return np.where(denom != 0, s, np.inf)


def _component_graph(padded: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label the components of ``{f > t}`` for every threshold (fact 2 of the module docstring).

    Nodes on a (2P - 1, 2Q - 1) lattice for the padded grid (P, Q) = (h + 2, w + 2): cells at
    (even, even), edges between adjacent cells at (even, odd) / (odd, even), patches at
    (odd, odd). A patch node is on when the patch's part of ``{f > t}`` is non-empty and
    connected; 8-connectivity then joins exactly what the bilinear map joins.

    Returns:
        labels (T, 2P - 1, 2Q - 1) int, patch_on (T, P - 1, Q - 1) bool, split (T, P - 1, Q - 1)
        bool: patches whose part of ``{f > t}`` is two pieces around diagonal corners.
    """
    on = padded[None] > ts[:, None, None]  # (T, P, Q)
    T, P, Q = on.shape
    nodes = np.zeros((T, 2 * P - 1, 2 * Q - 1), dtype=bool)
    nodes[:, ::2, ::2] = on
    nodes[:, ::2, 1::2] = on[:, :, :-1] & on[:, :, 1:]
    nodes[:, 1::2, ::2] = on[:, :-1, :] & on[:, 1:, :]
    a, b, c, e = on[:, :-1, :-1], on[:, :-1, 1:], on[:, 1:, :-1], on[:, 1:, 1:]
    diagonal_only = (a & e & ~b & ~c) | (b & c & ~a & ~e)
    saddle_over = _saddle_values(padded)[None] > ts[:, None, None]
    split = diagonal_only & ~saddle_over
    patch_on = (a | b | c | e) & ~split
    nodes[:, 1::2, 1::2] = patch_on
    labels, _ = ndimage.label(nodes, structure=_GRAPH_STRUCTURE)
    return labels, patch_on, split


def _split_pieces(padded, ay: _Axis, ax: _Axis, split_t, lab, comp, t) -> list[np.ndarray]:
    """Boxes of the pieces of split patches (saddle below ``t``) that belong to component ``comp``.

    Such a patch holds two pieces of ``{f > t}`` in opposite quadrants around its saddle point;
    a piece belongs to the component of its corner. Rare, so computed on the patch's pixels.
    """
    pieces = []
    cells = lab[::2, ::2]
    for k, j in zip(*np.nonzero(split_t), strict=True):
        corner_labels = {(0, 0): cells[k, j], (0, 1): cells[k, j + 1], (1, 0): cells[k + 1, j], (1, 1): cells[k + 1, j + 1]}
        mine = [pos for pos, value in corner_labels.items() if value == comp]
        if not mine:
            continue
        r0, r1 = ay.starts[k], ay.ends[k]
        c0, c1 = ax.starts[j], ax.ends[j]
        if r0 > r1 or c0 > c1:
            continue
        block = ay.sample(ax.sample(padded, np.arange(c0, c1 + 1), axis=1), np.arange(r0, r1 + 1))
        over = block > t
        if len(mine) < 2:  # only one of the two pieces: restrict to its quadrant around the saddle
            ga, gb, gc, ge = padded[k, j], padded[k, j + 1], padded[k + 1, j], padded[k + 1, j + 1]
            denom = ga - gb - gc + ge
            u_s, v_s = (ga - gc) / denom, (ga - gb) / denom
            u = ax.frac[c0 : c1 + 1]
            v = ay.frac[r0 : r1 + 1]
            (dv, du) = mine[0]
            in_u = u > u_s if du else u < u_s
            in_v = v > v_s if dv else v < v_s
            over &= in_v[:, None] & in_u[None, :]
        rows = np.flatnonzero(over.any(axis=1))
        cols = np.flatnonzero(over.any(axis=0))
        if len(rows):
            pieces.append(np.array([c0 + cols[0], r0 + rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1], dtype=np.float64))
    return pieces
