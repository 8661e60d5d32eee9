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

How it is computed (ours; exact, and fast): the result is the same as thresholding the full
upsampled map and labelling its pixels with ``scipy.ndimage.label`` (4-connectivity), but the
upsampled map is never thresholded pixel by pixel. The pixels between four neighbouring grid
cells form a *block* (the border half-cells are blocks too) on which the map is bilinear: along
any pixel row or column of a block it is linear. Hence

    1. every pixel over the threshold reaches a *corner pixel* of its block (first/last row x
       first/last column) by a monotone walk along its column, then along that row, so every
       component holds a corner pixel, and its bounding box is attained on the blocks' first and
       last pixel rows and columns;
    2. on each such row (column) segment of a block the pixels over the threshold form one
       interval touching an end of the segment.

Components are therefore labelled on a small graph whose nodes are the corner pixels
(2(h+1) x 2(w+1) of them), joined along a segment when both ends are over the threshold, across
two adjacent blocks when their facing row (column) intervals overlap, and inside a block whose
only over-threshold corners are diagonal by labelling that block's pixels (rare). All
thresholds are handled in one ``scipy.sparse.csgraph.connected_components`` call; a map costs
O((h + w)(H + W)) instead of O(H W) per threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components

BoxMode = Literal["max_component", "all", "components"]
BOX_MODES: tuple[str, ...] = ("max_component", "all", "components")



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
    lat = _Lattice(grid, W, H)
    row_lo, row_hi = _segment_extents(lat.rows, ts, lat.col_first)  # (T, nR, nbx) x-intervals on lattice rows
    col_lo, col_hi = _segment_extents(lat.cols, ts, lat.row_first)  # (T, nC, nby) y-intervals on lattice columns
    fallback = np.array([lat.peak[1], lat.peak[0], 1.0, 1.0])
    if mode == "all":
        out = []
        for t in range(len(ts)):
            rows_ok, cols_ok = row_lo[t] <= row_hi[t], col_lo[t] <= col_hi[t]
            if not rows_ok.any():
                out.append(fallback[None])
                continue
            x0, x1 = row_lo[t][rows_ok].min(), row_hi[t][rows_ok].max()
            y0, y1 = col_lo[t][cols_ok].min(), col_hi[t][cols_ok].max()
            out.append(np.array([[x0, y0, x1 - x0 + 1, y1 - y0 + 1]], dtype=np.float64))
        return out

    labels = lat.components(ts, row_lo, row_hi, col_lo, col_hi)  # (T, nR * nC)
    row_owner = lat.row_segment_owner(row_lo)  # (T, nR, nbx) node holding each row interval
    col_owner = lat.col_segment_owner(col_lo)  # (T, nC, nby)
    if mode == "max_component":  # all thresholds at once
        T = len(ts)
        comp = labels[:, lat.peak_node][:, None]  # (T, 1)
        rows_in = (row_lo <= row_hi).reshape(T, -1) & (np.take_along_axis(labels, row_owner.reshape(T, -1), 1) == comp)
        cols_in = (col_lo <= col_hi).reshape(T, -1) & (np.take_along_axis(labels, col_owner.reshape(T, -1), 1) == comp)
        x0 = np.where(rows_in, row_lo.reshape(T, -1), W).min(axis=1)
        x1 = np.where(rows_in, row_hi.reshape(T, -1), -1).max(axis=1)
        y0 = np.where(cols_in, col_lo.reshape(T, -1), H).min(axis=1)
        y1 = np.where(cols_in, col_hi.reshape(T, -1), -1).max(axis=1)
        boxes = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1).astype(np.float64)
        valid = (ts < lat.peak_value) & rows_in.any(axis=1)
        return [boxes[t][None] if valid[t] else fallback[None] for t in range(T)]
    out = []
    for t in range(len(ts)):
        row_ok, col_ok = row_lo[t] <= row_hi[t], col_lo[t] <= col_hi[t]
        row_lab = labels[t][row_owner[t]][row_ok]
        col_lab = labels[t][col_owner[t]][col_ok]
        wanted = np.unique(row_lab)
        boxes = []
        for comp in wanted:
            in_rows, in_cols = row_lab == comp, col_lab == comp
            x0, x1 = row_lo[t][row_ok][in_rows].min(), row_hi[t][row_ok][in_rows].max()
            y0, y1 = col_lo[t][col_ok][in_cols].min(), col_hi[t][col_ok][in_cols].max()
            peak = lat.values.ravel()[labels[t] == comp].max()
            boxes.append((peak, [x0, y0, x1 - x0 + 1, y1 - y0 + 1]))
        if not boxes:
            out.append(fallback[None])
            continue
        boxes.sort(key=lambda item: -item[0])
        out.append(np.array([b for _, b in boxes], dtype=np.float64))
    return out


def _segment_extents(lines: np.ndarray, ts: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First/last pixel over the threshold on every segment of every line (fact 2).

    A segment is linear, hence monotone: its pixels over ``t`` are the last ``n`` (rising
    segment) or the first ``n`` (falling segment), where ``n`` is found by a vectorised binary
    search of all thresholds in all segments at once (no pass over T x pixels).

    Args:
        lines: (n_lines, n_pix) map values along lattice rows (or columns).
        ts: (T,) thresholds.
        starts: (nb,) first pixel of each non-empty band along the line; bands are contiguous
            and cover every pixel, so segment i is ``[starts[i], starts[i + 1])``.

    Returns:
        lo, hi: (T, n_lines, nb); lo > hi where no pixel of the segment is over the threshold.
    """
    n_lines, n_pix = lines.shape
    nb = len(starts)
    ends = np.r_[starts[1:], n_pix] - 1
    seg = np.repeat(np.arange(nb), ends - starts + 1)  # (n_pix,) segment of each pixel
    falling = lines[:, starts] > lines[:, ends]  # (n_lines, nb)
    pix = np.arange(n_pix)
    reverse = (starts[seg] + ends[seg] - pix)[None, :]
    ascending = np.take_along_axis(lines, np.where(falling[:, seg], reverse, pix[None, :]), axis=1).ravel()
    base = (np.arange(n_lines) * n_pix)[:, None]
    first = np.broadcast_to(base + starts[None, :], (len(ts), n_lines, nb)).reshape(len(ts), -1)
    last = np.broadcast_to(base + ends[None, :], (len(ts), n_lines, nb)).reshape(len(ts), -1)
    t = ts[:, None]
    lo, hi = first.copy(), last + 1  # first index over t lies in [lo, hi]
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        right = ascending[np.minimum(mid, ascending.size - 1)] <= t
        lo = np.where(active & right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    count = (last + 1 - lo).reshape(len(ts), n_lines, nb)
    start_b, end_b = starts[None, None, :], ends[None, None, :]
    fall = falling[None]
    out_lo = np.where(fall, start_b, end_b - count + 1)
    out_hi = np.where(fall, start_b + count - 1, end_b)
    empty = count == 0
    return np.where(empty, n_pix, out_lo), np.where(empty, -1, out_hi)


class _Lattice:
    """The corner pixels of the blocks of an upsampled map and the lines through them.

    Attributes:
        rows: (nR, W) map values on the lattice rows (first/last pixel row of every row band).
        cols: (nC, H) map values on the lattice columns.
        values: (nR, nC) map values at the lattice (corner) pixels.
        row_first, row_last: (nby,) first/last pixel row of each non-empty row band (cols alike).
        peak, peak_value, peak_node: the upsampled map's maximum pixel (row, col) (first in
            row-major order, as ``np.argmax``), its value, its lattice node.
    """

    def __init__(self, grid: np.ndarray, W: int, H: int) -> None:
        h, w = grid.shape
        self.ay, self.ax = _Axis.make(H, h), _Axis.make(W, w)
        self.padded = np.pad(grid, 1, mode="edge")
        by = np.flatnonzero(self.ay.starts <= self.ay.ends)
        bx = np.flatnonzero(self.ax.starts <= self.ax.ends)
        self.row_first, self.row_last = self.ay.starts[by], self.ay.ends[by]
        self.col_first, self.col_last = self.ax.starts[bx], self.ax.ends[bx]
        self.R = np.unique(np.r_[self.row_first, self.row_last])
        self.C = np.unique(np.r_[self.col_first, self.col_last])
        self.rows = self.ay.sample(self.ax.sample(self.padded, axis=1), self.R)  # (nR, W)
        self.cols = self.ax.sample(self.ay.sample(self.padded, axis=0), self.C, axis=1).T  # (nC, H)
        self.values = self.rows[:, self.C]
        self.nR, self.nC = len(self.R), len(self.C)
        # lattice indices of each band's first / last line
        self.iy0, self.iy1 = np.searchsorted(self.R, self.row_first), np.searchsorted(self.R, self.row_last)
        self.jx0, self.jx1 = np.searchsorted(self.C, self.col_first), np.searchsorted(self.C, self.col_last)
        # the maximum lies on a lattice row (fact 1); first occurrence in row-major order
        self.peak_value = float(self.rows.max())
        r_idx, c = np.nonzero(self.rows == self.peak_value)
        first = np.lexsort((c, self.R[r_idx]))[0]
        self.peak = (int(self.R[r_idx[first]]), int(c[first]))
        m = int(np.searchsorted(self.C, self.peak[1]))
        if m >= self.nC or self.C[m] != self.peak[1]:  # cannot happen for a bilinear map; be safe
            m = int(np.argmin(np.abs(self.C - self.peak[1])))
        self.peak_node = int(r_idx[first]) * self.nC + m

    def row_segment_owner(self, row_lo: np.ndarray) -> np.ndarray:
        """Node holding each row-segment interval: its left end if the interval starts there, else its right end."""
        left = row_lo == self.col_first[None, None, :]
        col = np.where(left, self.jx0[None, None, :], self.jx1[None, None, :])
        return np.arange(self.nR)[None, :, None] * self.nC + col

    def col_segment_owner(self, col_lo: np.ndarray) -> np.ndarray:
        """Node holding each column-segment interval (top end if it starts there, else bottom end)."""
        top = col_lo == self.row_first[None, None, :]
        row = np.where(top, self.iy0[None, None, :], self.iy1[None, None, :])
        return row * self.nC + np.arange(self.nC)[None, :, None]

    def components(self, ts, row_lo, row_hi, col_lo, col_hi) -> np.ndarray:
        """Component label of every lattice node at every threshold -> (T, nR * nC)."""
        T, n = len(ts), self.nR * self.nC
        on = self.values[None] > ts[:, None, None]  # (T, nR, nC)
        node = np.arange(n).reshape(self.nR, self.nC)
        offset = (np.arange(T) * n)[:, None]
        src, dst = [], []

        def add(mask, a, b):  # mask (T, ...) ; a, b node ids broadcastable to mask
            tt = np.nonzero(mask)
            a = np.broadcast_to(a, mask.shape)[tt]
            b = np.broadcast_to(b, mask.shape)[tt]
            src.append(offset[tt[0], 0] + a)
            dst.append(offset[tt[0], 0] + b)

        # along lattice rows / columns inside a band: both ends over -> the whole segment is over
        a, b = node[:, self.jx0], node[:, self.jx1]  # (nR, nbx)
        add(on[:, :, self.jx0] & on[:, :, self.jx1], a[None], b[None])
        a, b = node[self.iy0, :], node[self.iy1, :]  # (nby, nC)
        add(on[:, self.iy0, :] & on[:, self.iy1, :], a[None], b[None])
        # across two adjacent bands: facing intervals overlap
        row_owner, col_owner = self.row_segment_owner(row_lo), self.col_segment_owner(col_lo)
        i1, i2 = self.iy1[:-1], self.iy0[1:]  # last row of band k, first row of band k + 1
        if len(i1):
            ok = (row_lo[:, i1] <= row_hi[:, i1]) & (row_lo[:, i2] <= row_hi[:, i2])
            ok &= np.maximum(row_lo[:, i1], row_lo[:, i2]) <= np.minimum(row_hi[:, i1], row_hi[:, i2])
            add(ok, row_owner[:, i1], row_owner[:, i2])
        m1, m2 = self.jx1[:-1], self.jx0[1:]
        if len(m1):
            ok = (col_lo[:, m1] <= col_hi[:, m1]) & (col_lo[:, m2] <= col_hi[:, m2])
            ok &= np.maximum(col_lo[:, m1], col_lo[:, m2]) <= np.minimum(col_hi[:, m1], col_hi[:, m2])
            add(ok, col_owner[:, m1], col_owner[:, m2])
        # inside a block whose only over-threshold corners are diagonal: label its pixels (rare).
        # Joined at t means joined at every lower t, so bisect over that block's thresholds.
        ca, cb = on[:, self.iy0][:, :, self.jx0], on[:, self.iy0][:, :, self.jx1]  # (T, nby, nbx)
        cc, ce = on[:, self.iy1][:, :, self.jx0], on[:, self.iy1][:, :, self.jx1]
        diagonal = (ca & ce & ~cb & ~cc) | (cb & cc & ~ca & ~ce)
        for k, j in zip(*np.nonzero(diagonal.any(axis=0)), strict=True):
            t_idx = np.flatnonzero(diagonal[:, k, j])
            t_idx = t_idx[np.argsort(ts[t_idx])]
            main = bool(ca[t_idx[0], k, j])
            a, b = self._diagonal_nodes(k, j, main)
            joined = self._diagonal_joined(ts[t_idx], k, j, main)  # prefix of t_idx (lowest thresholds)
            for t in t_idx[:joined]:
                src.append(np.array([t * n + a]))
                dst.append(np.array([t * n + b]))
        src_all = np.concatenate(src) if src else np.zeros(0, dtype=np.int64)
        dst_all = np.concatenate(dst) if dst else np.zeros(0, dtype=np.int64)
        graph = sparse.coo_matrix((np.ones(len(src_all), dtype=np.int8), (src_all, dst_all)), shape=(T * n, T * n))
        _, labels = connected_components(graph, directed=False)
        return labels.reshape(T, n)

    def _diagonal_nodes(self, k: int, j: int, main: bool) -> tuple[int, int]:
        """Lattice nodes of the two over-threshold diagonal corners of block (k, j)."""
        top, bottom = self.iy0[k] * self.nC, self.iy1[k] * self.nC
        if main:
            return int(top + self.jx0[j]), int(bottom + self.jx1[j])
        return int(top + self.jx1[j]), int(bottom + self.jx0[j])

    def _diagonal_joined(self, ts_sorted: np.ndarray, k: int, j: int, main: bool) -> int:
        """How many of the (increasing) thresholds join the block's two diagonal corners through its pixels."""
        r0, r1 = self.row_first[k], self.row_last[k]
        c0, c1 = self.col_first[j], self.col_last[j]
        block = self.ay.sample(self.ax.sample(self.padded, np.arange(c0, c1 + 1), axis=1), np.arange(r0, r1 + 1))
        ends = ((0, 0), (-1, -1)) if main else ((0, -1), (-1, 0))

        def joined(t: float) -> bool:
            lab, _ = ndimage.label(block > t)
            return bool(lab[ends[0]] != 0 and lab[ends[0]] == lab[ends[1]])

        lo, hi = 0, len(ts_sorted)  # answer in [lo, hi]: thresholds [0, answer) are joined
        while lo < hi:
            mid = (lo + hi) // 2
            if joined(ts_sorted[mid]):
                lo = mid + 1
            else:
                hi = mid
        return lo
