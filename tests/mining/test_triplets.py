"""Triplet miner: label rules (property test), candidate counts, partial fraction, curriculum, determinism, shards."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrloc.config import MiningConfig
from cxrloc.mining import TripletMiner, curriculum_window, hamming

C = 14


def _labels(sets: list[frozenset[int]]) -> np.ndarray:
    out = np.zeros((len(sets), C), dtype=np.uint8)
    for i, s in enumerate(sets):
        out[i, list(s)] = 1
    return out


def _random_hashes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)


class Pools:
    """Brute-force pools of one anchor, straight from the rules in METHOD.md."""

    def __init__(self, labels: np.ndarray, train: np.ndarray, a: int):
        la = labels[a].astype(bool)
        others = train[train != a]
        lo = labels[others].astype(bool)
        same = (lo == la).all(1)
        share = (lo & la).any(1)
        if la.any():
            self.exact = set(others[same])
            self.partial = set(others[share & ~same])
            self.negative = set(others[~share])
        else:  # No Finding: positives = other No Finding images, negatives = any image with a disease
            self.exact = set(others[~lo.any(1)])
            self.partial = set()
            self.negative = set(others[lo.any(1)])


# --------------------------------------------------------------------------- property test: label rules

label_set = st.one_of(
    st.just(frozenset()),  # No Finding
    st.frozensets(st.sampled_from([0, 2, 3]), min_size=1, max_size=2),  # common findings, many overlaps
    st.frozensets(st.integers(0, C - 1), min_size=1, max_size=4),  # anything, rare labels included
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sets=st.lists(label_set, min_size=2, max_size=40),
    train_mask_seed=st.integers(0, 2**16),
    mode=st.sampled_from(["exact", "partial"]),
    ordering=st.sampled_from(["phash", "random"]),
    n_pos=st.integers(1, 6),
    n_neg=st.integers(1, 6),
    partial_fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    curriculum_epochs=st.integers(0, 3),
    hard_fraction=st.sampled_from([0.1, 0.5, 1.0]),
    epoch=st.integers(0, 5),
    seed=st.integers(0, 100),
)
def test_every_triplet_obeys_the_label_rules(sets, train_mask_seed, mode, ordering, n_pos, n_neg, partial_fraction,
                                             curriculum_epochs, hard_fraction, epoch, seed):
    labels = _labels(sets)
    n = len(labels)
    rng = np.random.default_rng(train_mask_seed)
    train = np.flatnonzero(rng.random(n) < 0.8)
    if len(train) == 0:
        train = np.array([0])
    hashes = _random_hashes(n, seed)
    cfg = MiningConfig(positive_mode=mode, partial_fraction=partial_fraction, num_positive_candidates=n_pos,
                       num_negative_candidates=n_neg, ordering=ordering, curriculum_epochs=curriculum_epochs,
                       hard_fraction=hard_fraction)
    miner = TripletMiner(labels, hashes, train, cfg, seed=seed)
    triplets = miner.epoch_triplets(epoch)
    assert triplets.shape == (len(train), 3) and triplets.dtype == np.int64
    assert sorted(triplets[:, 0]) == sorted(train)  # every anchor exactly once
    assert np.isin(triplets, train).all()  # training split only

    blocks = {int(a): (blk, i) for blk in miner.candidates(epoch) for i, a in enumerate(blk.anchors)}
    assert len(blocks) == len(train)
    want_partial = int(round(partial_fraction * n_pos))
    start, width = curriculum_window(epoch, cfg)
    for a_pos, p_pos, n_pos_row in triplets:
        a, p, ng = int(a_pos), int(p_pos), int(n_pos_row)
        pools = Pools(labels, train, a)
        blk, i = blocks[a]
        pos_rows, neg_rows = blk.positives[i], blk.negatives[i]
        exact_cols = ~blk.positive_is_partial
        # candidate sets: distinct, never the anchor, from the right pools, of the right size
        assert len(set(pos_rows)) == len(pos_rows) and len(set(neg_rows)) == len(neg_rows)
        assert a not in set(pos_rows) and a not in set(neg_rows)
        assert set(pos_rows[exact_cols]) <= pools.exact
        assert set(pos_rows[~exact_cols]) <= pools.partial
        assert set(neg_rows) <= pools.negative
        ne, np_ = int(exact_cols.sum()), int((~exact_cols).sum())
        E, P = len(pools.exact), len(pools.partial)
        if mode == "exact":
            assert ne == min(E, n_pos) and np_ == (min(P, n_pos) if E == 0 else 0)
        else:  # 75/25 (or as configured), the other pool filling a short one
            assert ne + np_ == min(n_pos, E + P)
            assert np_ == min(P, max(want_partial, n_pos - E))
        assert len(neg_rows) == min(n_neg, len(pools.negative))
        # the chosen pair comes from the candidates (or is the documented fallback: the anchor itself)
        if len(pos_rows):
            assert p in set(pos_rows)
        else:
            assert p == a and not pools.exact and not pools.partial
        if len(neg_rows):
            assert ng in set(neg_rows)
        else:
            assert ng == a and not pools.negative
        # the pick lies in the curriculum window of the candidates sorted by hardness
        if ordering == "phash":
            for chosen, rows, sign in ((p, pos_rows, 1), (ng, neg_rows, -1)):
                k = len(rows)
                if k == 0:
                    continue
                key = sign * hamming(hashes[a], hashes[rows]).astype(int)
                key_sorted = np.sort(key)
                lo = min(int(start * k), k - 1)
                hi = min(int(np.floor((start + width) * k)), k - 1)
                chosen_key = sign * int(hamming(hashes[a], hashes[chosen]))
                assert key_sorted[lo] <= chosen_key <= key_sorted[hi]


# --------------------------------------------------------------------------- statistics at scale


def _two_label_world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels where most anchors have large exact and partial pools: {0}, {0,1}, {1}, {2}, No Finding."""
    rng = np.random.default_rng(seed)
    sets = [frozenset(), frozenset({0}), frozenset({0, 1}), frozenset({1}), frozenset({2})]
    choice = rng.choice(len(sets), n, p=[0.3, 0.25, 0.2, 0.15, 0.1])
    return _labels([sets[c] for c in choice]), np.arange(n)


@pytest.mark.parametrize("ordering", ["random", "phash"])
def test_partial_fraction_is_a_quarter(ordering):
    labels, train = _two_label_world(6000, seed=0)
    cfg = MiningConfig(ordering=ordering, num_positive_candidates=40, num_negative_candidates=40)
    miner = TripletMiner(labels, _random_hashes(len(labels), 1), train, cfg, seed=3)
    a, p, _ = miner.epoch_triplets(12).T
    both_pools = labels[a, :2].any(1)  # {0}, {0,1}, {1}: large exact and partial pools -> 30 + 10 candidates
    exact = (labels[a] == labels[p]).all(1)
    frac = 1 - exact[both_pools].mean()
    sd = np.sqrt(0.25 * 0.75 / both_pools.sum())
    assert abs(frac - 0.25) < 4 * sd, (frac, sd)
    assert exact[~both_pools].all()  # No Finding and {2} have no partial matches
    assert miner.report.partial_candidate_fraction == pytest.approx(10 * both_pools.sum() / (40 * len(a)))


def test_exact_mode_prefers_exact_matches():
    labels, train = _two_label_world(800, seed=4)
    labels[799] = 0
    labels[799, [5, 0]] = 1  # a unique label set: falls back to partial matches
    miner = TripletMiner(labels, None, train, MiningConfig(positive_mode="exact", ordering="random"), seed=0)
    a, p, _ = miner.epoch_triplets(0).T
    exact = (labels[a] == labels[p]).all(1)
    assert exact[a != 799].all()
    i = int(np.flatnonzero(a == 799)[0])
    assert not exact[i] and labels[p[i], 0] == 1
    assert miner.report.anchors_without_exact_match == 1


def test_curriculum_moves_from_easy_to_hard():
    labels, train = _two_label_world(3000, seed=5)
    hashes = _random_hashes(len(labels), 6)
    miner = TripletMiner(labels, hashes, train, MiningConfig(), seed=0)
    pos_d, neg_d = [], []
    for epoch in range(0, 13, 2):
        a, p, n = miner.epoch_triplets(epoch).T
        pos_d.append(hamming(hashes[a], hashes[p]).mean())
        neg_d.append(hamming(hashes[a], hashes[n]).mean())
    assert np.all(np.diff(pos_d[:6]) > 0.3), pos_d  # epochs 0..10: positives get farther
    assert np.all(np.diff(neg_d[:6]) < -0.3), neg_d  # negatives get nearer
    assert pos_d[5] - pos_d[0] > 8 and neg_d[0] - neg_d[5] > 8
    assert abs(pos_d[6] - pos_d[5]) < 0.5 and abs(neg_d[6] - neg_d[5]) < 0.5  # after epoch 10: hardest tenth
    # random ordering does not move
    rnd = TripletMiner(labels, hashes, train, MiningConfig(ordering="random"), seed=0)
    d0, d10 = (hamming(hashes[t[:, 0]], hashes[t[:, 1]]).mean() for t in (rnd.epoch_triplets(0), rnd.epoch_triplets(10)))
    assert abs(d0 - d10) < 0.5 and abs(d0 - 32) < 1


def test_curriculum_window_values():
    cfg = MiningConfig()
    assert curriculum_window(0, cfg) == (0.0, 0.1)
    assert curriculum_window(5, cfg) == pytest.approx((0.45, 0.1))
    assert curriculum_window(10, cfg) == pytest.approx((0.9, 0.1))
    assert curriculum_window(29, cfg) == pytest.approx((0.9, 0.1))
    assert curriculum_window(0, MiningConfig(curriculum_epochs=0)) == pytest.approx((0.9, 0.1))
    with pytest.raises(ValueError, match="epoch"):
        curriculum_window(-1, cfg)


# --------------------------------------------------------------------------- determinism and shards


def test_deterministic_per_seed_and_epoch():
    labels, train = _two_label_world(500, seed=7)
    hashes = _random_hashes(len(labels), 8)
    cfg = MiningConfig(num_positive_candidates=30, num_negative_candidates=60)
    m1 = TripletMiner(labels, hashes, train, cfg, seed=11)
    m2 = TripletMiner(labels, hashes, train, cfg, seed=11)
    np.testing.assert_array_equal(m1.epoch_triplets(3), m2.epoch_triplets(3))
    np.testing.assert_array_equal(m1.epoch_triplets(3), m1.epoch_triplets(3))
    first = m1.epoch_triplets(3).copy()
    m1.epoch_triplets(4)
    np.testing.assert_array_equal(m1.epoch_triplets(3), first)  # recomputed, same
    assert not np.array_equal(m1.epoch_triplets(4), first)
    m3 = TripletMiner(labels, hashes, train, cfg, seed=12)
    assert not np.array_equal(m3.epoch_triplets(3), first)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_shards_cover_every_anchor_once(world_size):
    labels, train = _two_label_world(103, seed=9)
    train = train[train % 10 != 3]  # 93 anchors, not a multiple of most world sizes
    miner = TripletMiner(labels, _random_hashes(len(labels), 0), train, MiningConfig(), seed=1)
    full = miner.epoch_triplets(2)
    shards = [miner.epoch_triplets(2, r, world_size, pad=False) for r in range(world_size)]
    anchors = np.concatenate([s[:, 0] for s in shards])
    assert sorted(anchors) == sorted(train)  # disjoint and complete
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # the same triplets whatever the world size
    as_set = lambda t: set(map(tuple, t.tolist()))  # noqa: E731
    assert set().union(*map(as_set, shards)) == as_set(full)
    padded = [miner.epoch_triplets(2, r, world_size) for r in range(world_size)]
    per_rank = -(-len(train) // world_size)
    assert all(len(s) == per_rank for s in padded)  # equal lengths for DDP
    allp = np.concatenate([s[:, 0] for s in padded])
    assert set(allp) == set(train) and len(allp) - len(train) == per_rank * world_size - len(train)
    with pytest.raises(ValueError, match="rank"):
        miner.epoch_triplets(0, world_size, world_size)


# --------------------------------------------------------------------------- fallbacks and errors


def test_anchor_without_positive_or_negative_uses_itself(caplog):
    sets = [frozenset({13}), frozenset(), frozenset({0}), frozenset({0}), frozenset({0, 1})]
    labels = _labels(sets)
    with caplog.at_level(logging.WARNING):
        miner = TripletMiner(labels, _random_hashes(5, 0), np.arange(5), MiningConfig(), seed=0)
    t = miner.epoch_triplets(0)
    row = {int(a): (int(p), int(n)) for a, p, n in t}
    assert row[0][0] == 0 and row[1][0] == 1  # unique Hernia; the only No Finding image
    assert row[2][0] in (3, 4) and row[4][0] in (2, 3)
    assert miner.report.anchors_without_positive == 2 and sorted(miner.report.fallback_positive_rows) == [0, 1]
    assert "no positive" in caplog.text

    caplog.clear()
    all_share = _labels([frozenset({0}), frozenset({0, 1}), frozenset({0, 2}), frozenset({1})])
    with caplog.at_level(logging.WARNING):
        miner = TripletMiner(all_share, None, np.arange(4), MiningConfig(ordering="random"), seed=0)
    row = {int(a): (int(p), int(n)) for a, p, n in miner.epoch_triplets(0)}
    assert row[1][1] == 1  # {0, 1}: every other image shares label 0 or 1 with it
    assert row[0][1] == 3 and row[2][1] == 3 and row[3][1] in (0, 2)
    assert miner.report.anchors_without_negative == 1 and miner.report.fallback_negative_rows == [1]
    assert "no negative" in caplog.text


def test_non_train_rows_are_never_used():
    labels, _ = _two_label_world(400, seed=10)
    train = np.arange(0, 400, 2)
    miner = TripletMiner(labels, _random_hashes(400, 1), train, MiningConfig(num_negative_candidates=50), seed=0)
    assert np.isin(miner.epoch_triplets(1), train).all()


def test_errors_are_clear():
    labels = _labels([frozenset({0}), frozenset()])
    with pytest.raises(ValueError, match="needs the pHash"):
        TripletMiner(labels, None, [0, 1], MiningConfig(ordering="phash"))
    with pytest.raises(ValueError, match=r"\(2,\) uint64"):
        TripletMiner(labels, np.zeros(3, np.uint64), [0, 1], MiningConfig())
    with pytest.raises(ValueError, match="train_indices"):
        TripletMiner(labels, None, [0, 5], MiningConfig(ordering="random"))
    with pytest.raises(ValueError, match="empty"):
        TripletMiner(labels, None, [], MiningConfig(ordering="random"))
    with pytest.raises(ValueError, match="only 0 and 1"):
        TripletMiner(labels * 2, None, [0, 1], MiningConfig(ordering="random"))


def test_paper_defaults_give_375_exact_and_125_partial_candidates():
    labels, train = _two_label_world(4000, seed=12)
    miner = TripletMiner(labels, _random_hashes(4000, 2), train, MiningConfig(), seed=0)
    for blk in miner.candidates(0):
        if labels[blk.anchors[0]].any() and blk.positives.shape[1] == 500:
            assert (~blk.positive_is_partial).sum() == 375 and blk.positive_is_partial.sum() == 125
            assert blk.negatives.shape[1] == 1000
            break
    else:
        pytest.fail("no label set with full pools")
