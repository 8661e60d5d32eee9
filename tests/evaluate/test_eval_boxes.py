"""Boxes: IoU / IoBB by hand, coordinate scaling, bilinear upsampling, map -> box against brute force, oracles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from cxrloc.evaluate.boxes import (
    area_coverage_grid,
    box_area,
    box_mask,
    boxes_from_map,
    clip_boxes,
    iobb,
    iou,
    scale_boxes,
    upsample_map,
)
from cxrloc.model import upsample_maps

GRID_THRESHOLDS = np.round(np.arange(1, 20) * 0.05, 2)


# --------------------------------------------------------------------------- IoU / IoBB by hand


@pytest.mark.parametrize(
    ("a", "b", "expected_iou", "expected_iobb_ab"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0, 1.0),  # identical
        ((0, 0, 10, 10), (5, 5, 10, 10), 25 / 175, 25 / 100),  # partial overlap
        ((0, 0, 10, 10), (2, 2, 4, 4), 16 / 100, 16 / 100),  # b nested in a: IoBB(pred=a) = 16/100
        ((2, 2, 4, 4), (0, 0, 10, 10), 16 / 100, 1.0),  # pred nested in gt: IoBB = 1
        ((0, 0, 10, 10), (10, 0, 5, 10), 0.0, 0.0),  # touching along an edge
        ((0, 0, 10, 10), (10, 10, 5, 5), 0.0, 0.0),  # touching at a corner
        ((0, 0, 10, 10), (20, 20, 5, 5), 0.0, 0.0),  # disjoint
        ((3, 3, 0, 5), (0, 0, 10, 10), 0.0, 0.0),  # zero-width prediction inside gt
        ((3, 3, 0, 0), (3, 3, 0, 0), 0.0, 0.0),  # both degenerate: defined as 0, not NaN
        ((0, 0, 1, 1), (0.5, 0, 1, 1), 0.5 / 1.5, 0.5),  # sub-pixel (continuous coordinates)
    ],
)
def test_iou_and_iobb_by_hand(a, b, expected_iou, expected_iobb_ab):
    assert iou(np.array(a), np.array(b)) == pytest.approx(expected_iou)
    assert iou(np.array(b), np.array(a)) == pytest.approx(expected_iou)  # symmetric
    assert iobb(np.array(a), np.array(b)) == pytest.approx(expected_iobb_ab)  # IoBB(pred=a, gt=b)
    assert np.isfinite(iou(np.array(a), np.array(b)))


def test_iou_broadcasts():
    preds = np.array([[0, 0, 10, 10], [5, 5, 10, 10], [100, 100, 1, 1]], dtype=float)  # (3, 4)
    gts = np.array([[0, 0, 10, 10], [0, 0, 20, 20]], dtype=float)  # (2, 4)
    out = iou(preds[:, None, :], gts[None, :, :])
    assert out.shape == (3, 2)
    assert out[0, 0] == 1.0 and out[0, 1] == pytest.approx(100 / 400) and out[2].max() == 0.0
    assert box_area(preds).tolist() == [100, 100, 1]


def test_scale_boxes_grid_and_cache_to_original():
    # cell (row 2, col 1) of a 7x7 grid, scaled to a 1024 x 1024 original
    cell = scale_boxes(np.array([1, 2, 1, 1.0]), (7, 7), (1024, 1024))
    assert cell == pytest.approx([1024 / 7, 2 * 1024 / 7, 1024 / 7, 1024 / 7])
    # a box in a 256 cache of a non-square 2000 x 1500 original
    original = np.array([[400.0, 300.0, 200.0, 150.0]])
    in_cache = scale_boxes(original, (2000, 1500), (256, 256))
    assert in_cache[0] == pytest.approx([51.2, 51.2, 25.6, 25.6])
    assert scale_boxes(in_cache, (256, 256), (2000, 1500)) == pytest.approx(original)


def test_clip_boxes():
    out = clip_boxes(np.array([[-10, -5, 30, 30], [90, 90, 50, 50]], dtype=float), (100, 100))
    assert out.tolist() == [[0, 0, 20, 25], [90, 90, 10, 10]]


# --------------------------------------------------------------------------- upsampling


@pytest.mark.parametrize(("h", "w", "H", "W"), [(7, 7, 1024, 1024), (7, 5, 300, 411), (2, 3, 5, 7), (4, 4, 4, 4)])
def test_upsample_map_equals_torch_bilinear(rng, h, w, H, W):
    grid = rng.random((h, w))
    ours = upsample_map(grid, (W, H))
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(H, W), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    assert ours.shape == (H, W)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    model_ref = upsample_maps(torch.from_numpy(grid).float()[None, None], (H, W))[0, 0].numpy()
    np.testing.assert_allclose(ours, model_ref, atol=1e-5)


# --------------------------------------------------------------------------- map -> boxes


def _brute_force(U: np.ndarray, t: float, mode: str) -> np.ndarray:
    """Threshold the full upsampled map and label pixels (4-connectivity): the slow reference."""
    mask = U > t
    if not mask.any():
        r, c = np.unravel_index(np.argmax(U), U.shape)
        return np.array([[c, r, 1, 1.0]])

    def bbox(m):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        return [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1.0]

    if mode == "all":
        return np.array([bbox(mask)])
    lab, n = ndimage.label(mask)
    if mode == "max_component":
        r, c = np.unravel_index(np.argmax(U), U.shape)
        return np.array([bbox(lab == lab[r, c])])
    return np.array([bbox(lab == k) for k in range(1, n + 1)])


def test_boxes_from_map_match_pixel_labelling(rng):
    agree = total = 0
    for _ in range(25):
        h, w = rng.integers(2, 9, size=2)
        grid = rng.random((h, w))
        grid = (grid - grid.min()) / (grid.max() - grid.min())
        W, H = (int(v) for v in rng.integers(150, 450, size=2))
        U = torch.nn.functional.interpolate(torch.from_numpy(grid)[None, None], size=(H, W), mode="bilinear",
                                            align_corners=False)[0, 0].numpy()
        for mode in ("max_component", "all", "components"):
            ours = boxes_from_map(grid, (W, H), GRID_THRESHOLDS, mode)
            assert len(ours) == len(GRID_THRESHOLDS)
            for t, boxes in zip(GRID_THRESHOLDS, ours, strict=True):
                ref = _brute_force(U, t, mode)
                total += 1
                assert boxes.shape[1] == 4 and (boxes[:, 2:] >= 1).all()
                assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= W).all()
                assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= H).all()
                if mode == "components":
                    same = len(boxes) == len(ref) and np.allclose(np.sort(boxes, 0), np.sort(ref, 0))
                else:
                    assert len(boxes) == 1
                    same = np.allclose(boxes, ref)
                    assert iou(boxes[0], ref[0]) > 0.95  # a sub-pixel neck at most moves an edge a little
                agree += same
    # components are those of the continuous bilinear map; pixels can split a sub-pixel neck
    assert agree / total > 0.99, f"{agree}/{total}"


def test_two_blobs_by_mode():
    grid = np.zeros((7, 7))
    grid[1, 1] = 1.0  # strongest blob top-left
    grid[5, 5] = 0.8  # second blob bottom-right
    size = (700, 700)
    (mc,) = boxes_from_map(grid, size, [0.5], "max_component")
    (al,) = boxes_from_map(grid, size, [0.5], "all")
    (cp,) = boxes_from_map(grid, size, [0.5], "components")
    assert len(mc) == 1 and mc[0, 0] < 300 and mc[0, 1] < 300 and mc[0, 0] + mc[0, 2] < 300
    assert len(al) == 1 and al[0, 0] < 300 and al[0, 0] + al[0, 2] > 500  # spans both blobs
    assert len(cp) == 2
    np.testing.assert_allclose(cp[0], mc[0])  # ordered by peak: the strongest first
    assert cp[1, 0] > 400 and cp[1, 1] > 400


def test_nothing_over_threshold_gives_the_peak_pixel():
    grid = np.zeros((7, 7))
    grid[3, 4] = 1.0
    (box,) = boxes_from_map(grid, (700, 700), [0.999])
    # the pixel grid never samples the cell centre exactly: nothing is over 0.999
    assert box.shape == (1, 4) and box[0, 2] == box[0, 3] == 1
    assert 400 <= box[0, 0] < 500 and 300 <= box[0, 1] < 400
    (const,) = boxes_from_map(np.zeros((7, 7)), (100, 80), [0.5], "components")
    assert const.tolist() == [[0, 0, 1, 1]]


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        boxes_from_map(np.zeros(7), (10, 10), [0.5])
    with pytest.raises(ValueError, match="NaN"):
        boxes_from_map(np.full((7, 7), np.nan), (10, 10), [0.5])
    with pytest.raises(ValueError, match="box mode"):
        boxes_from_map(np.zeros((7, 7)), (10, 10), [0.5], "biggest")  # type: ignore[arg-type]


def test_seven_by_seven_cell_box_round_trip():
    """A box of whole 7x7 cells, drawn as a 0/1 grid map, comes back as the scaled cells."""
    grid = np.zeros((7, 7))
    grid[1:4, 2:6] = 1.0  # rows 1-3, cols 2-5
    (box,) = boxes_from_map(grid, (1024, 1024), [0.5])
    expected = scale_boxes(np.array([2, 1, 4, 3.0]), (7, 7), (1024, 1024))
    assert iou(box[0], expected) > 0.99


def _real_boxes(sample_dir) -> pd.DataFrame:
    df = pd.read_csv(sample_dir / "BBox_List_2017.csv").iloc[:, :6]
    df.columns = ["image_id", "finding", "x", "y", "w", "h"]
    return df


def test_oracle_maps_of_real_boxes_give_the_box_back(sample_dir):
    """Oracle heatmaps drawn from real BBox_List boxes: the box comes back with IoU > 0.95.

    Original resolution (no round trip) on a few boxes, and a round trip through a 256 x 256
    grid (the cache size; 4 px cells) on a spread of boxes that includes the 15 smallest.
    """
    df = _real_boxes(sample_dir)
    gt = df[["x", "y", "w", "h"]].to_numpy(float)
    assert len(gt) == 984
    size = (1024, 1024)
    for b in gt[[0, 500]]:
        (box,) = boxes_from_map(box_mask(b, size), size, [0.5])
        assert iou(box[0], b) > 0.95
    smallest = np.argsort(np.minimum(gt[:, 2], gt[:, 3]))[:15]
    picks = np.unique(np.r_[smallest, np.arange(0, len(gt), 25)])
    for i in picks:
        grid = area_coverage_grid(gt[i], size, (256, 256))
        (box,) = boxes_from_map(grid, size, [0.5])
        assert iou(box[0], gt[i]) > 0.95, (i, gt[i], box)
        # boxed at the cache size instead and scaled back: edges within one cache pixel (4 px)
        (small,) = boxes_from_map(grid, (256, 256), [0.5])
        back = scale_boxes(small[0], (256, 256), size)
        edges = lambda b: np.array([b[0], b[1], b[0] + b[2], b[1] + b[3]])  # noqa: E731
        assert np.abs(edges(back) - edges(gt[i])).max() <= 1024 / 256
