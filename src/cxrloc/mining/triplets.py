"""Triplet mining with pHash hardness and an easy-to-hard curriculum (section 3.2, eq. 3).

Every training anchor gets one (anchor, positive, negative) triplet per epoch.

Label rules (METHOD.md, "Triplets and hard-example mining"):

* negative: an image whose label set shares no disease with the anchor's;
* positive, ``positive_mode="exact"``: an identical label set; an anchor with no
  exact match falls back to partial matches;
* positive, ``positive_mode="partial"`` (the paper's main model): of the up to
  500 positive candidates, ``1 - partial_fraction`` (75%) are exact matches and
  ``partial_fraction`` (25%) partial matches (share >= 1 disease, not identical);
  when one pool is short the other fills the remaining places;
* No Finding (ours): for an anchor without any disease, the positives are other
  No Finding images and the negatives are all images with >= 1 disease.

All pools hold training rows only; an anchor is never its own candidate.

Candidates and hardness: per anchor and epoch, up to ``num_positive_candidates``
(500) positives and ``num_negative_candidates`` (1000) negatives are drawn at
random, without replacement, from the pools, sorted by the Hamming distance of
their pHash to the anchor's (easiest first: a positive is hard when far, a
negative when near; ties broken at random), and one candidate of each kind is
taken at a rank drawn from the curriculum window (:func:`curriculum_window`).
With ``ordering="random"`` (the ablation) the pick is uniform over the candidates.

Scale (ours): candidates are never stored. Anchors with the same label set share
their pools, so the work is grouped by label set (a few hundred in ChestX-ray14)
and done in chunks of anchors with array operations. Each epoch draws one random
permutation of the training rows; a pool is that permutation restricted to the
pool's members, and an anchor's candidates are a window of consecutive pool
entries at a uniformly random offset. For every anchor this is a uniformly random
subset of the pool (windows of different anchors overlap, which does not matter
here). Everything is a function of (seed, epoch): rerunning an epoch, or another
rank computing it, gives the same triplets.

Anchors without a possible partner (ours, reported in :attr:`TripletMiner.report`
and logged): with no positive in the training split the anchor is its own positive
(distance 0: its triplet term is the hinge ``max(0, m - ||f(a) - f(n)||)``), with no
negative it is its own negative (the term becomes ``||f(a) - f(p)|| + m``: it
still pulls the positive closer). The training engine thus always gets exactly
one row per anchor.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cxrloc.config import MiningConfig
from cxrloc.mining.phash import popcount64

log = logging.getLogger(__name__)

_SENTINEL = np.uint16(0xFFFF)  # sort key of a slot that is not a candidate (sorts last)
_MAX_KEY = 64  # Hamming distances of 64-bit hashes are 0..64


def curriculum_window(epoch: int, cfg: MiningConfig) -> tuple[float, float]:
    """The curriculum's rank window for one epoch, as fractions of the sorted candidate list.

    Ours (the paper says "a bias towards easier examples initially and the hardest
    examples after 10 epochs"): the window has width ``hard_fraction`` and slides
    linearly from the easiest tenth (epoch 0) to the hardest tenth (epoch
    ``curriculum_epochs``); from then on it stays on the hardest ``hard_fraction``.

    Returns:
        (start, width): ranks are drawn uniformly from [start * n, (start + width) * n).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    width = float(cfg.hard_fraction)
    if cfg.curriculum_epochs <= 0 or epoch >= cfg.curriculum_epochs:
        return 1.0 - width, width
    return epoch / cfg.curriculum_epochs * (1.0 - width), width


@dataclass
class MiningReport:
    """What the pools look like for the training anchors (computed once, logged)."""

    num_anchors: int
    num_label_sets: int
    no_finding_anchors: int
    anchors_without_exact_match: int  # positives come from partial matches only (or none)
    anchors_without_positive: int  # positive = the anchor itself
    anchors_without_negative: int  # negative = the anchor itself
    mean_positive_candidates: float
    mean_negative_candidates: float
    partial_candidate_fraction: float  # among all positive candidates
    fallback_positive_rows: list[int]  # cache rows whose positive is themselves (first 100)
    fallback_negative_rows: list[int]  # cache rows whose negative is themselves (first 100)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CandidateBlock:
    """The candidates of some anchors that share a label set (for inspection and tests).

    Attributes:
        anchors: (m,) cache rows.
        positives: (m, kp) cache rows; columns ``positive_is_partial`` are partial matches.
        positive_is_partial: (kp,) bool.
        negatives: (m, kn) cache rows.
    """

    anchors: np.ndarray
    positives: np.ndarray
    positive_is_partial: np.ndarray
    negatives: np.ndarray


class TripletMiner:
    """Per-epoch (anchor, positive, negative) triplets over the training split (section 3.2).

    Args:
        labels: (N, C) 0/1 multi-hot labels of ALL cache rows (C = 14; an all-zero row is No Finding).
        hashes: (N,) uint64 pHash of all cache rows (:func:`cxrloc.mining.phash_index`);
            may be None when ``cfg.ordering == "random"``.
        train_indices: cache rows of the training split; the anchors and the only candidates.
        cfg: mining settings (paper defaults in :class:`cxrloc.config.MiningConfig`).
        seed: base seed; epoch e uses the stream (seed, e).
        chunk_size: anchors processed together (memory ~ chunk_size * 1500 * 12 bytes); part of
            the random stream, so keep it fixed for reproducible epochs.

    Example:
        >>> miner = TripletMiner(cache.labels, phash_index(cache), cache.indices("train"), cfg.mining, seed=0)
        >>> triplets = miner.epoch_triplets(epoch, rank, world_size)   # (T, 3) int64 cache rows
    """

    def __init__(
        self,
        labels: np.ndarray,
        hashes: np.ndarray | None,
        train_indices: np.ndarray,
        cfg: MiningConfig | None = None,
        seed: int = 0,
        chunk_size: int = 1024,
    ):
        self.cfg = cfg or MiningConfig()
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        labels = np.asarray(labels)
        if labels.ndim != 2 or not 1 <= labels.shape[1] <= 62:
            raise ValueError(f"labels must be (N, C) multi-hot with 1 <= C <= 62, got shape {labels.shape}")
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must contain only 0 and 1")
        n_rows = len(labels)
        train = np.asarray(train_indices, dtype=np.int64).ravel()
        if len(train) == 0:
            raise ValueError("train_indices is empty: no anchors to mine triplets for")
        if train.min() < 0 or train.max() >= n_rows:
            raise ValueError(f"train_indices must be cache rows in [0, {n_rows}), got range [{train.min()}, {train.max()}]")
        if len(np.unique(train)) != len(train):
            raise ValueError("train_indices contains duplicates")
        if self.cfg.positive_mode not in ("exact", "partial"):
            raise ValueError(f"mining.positive_mode must be 'exact' or 'partial', got {self.cfg.positive_mode!r}")
        if self.cfg.ordering not in ("phash", "random"):
            raise ValueError(f"mining.ordering must be 'phash' or 'random', got {self.cfg.ordering!r}")
        if self.cfg.ordering == "phash":
            if hashes is None:
                raise ValueError("mining.ordering='phash' needs the pHash of every cache row (hashes=None given)")
            hashes = np.asarray(hashes)
            if hashes.shape != (n_rows,) or hashes.dtype != np.uint64:
                raise ValueError(f"hashes must be ({n_rows},) uint64 (one per cache row), got {hashes.shape} {hashes.dtype}")
        self.hashes = hashes if self.cfg.ordering == "phash" else None
        self._train_hashes = None  # hashes per train position, set below

        self.train = np.sort(train)
        weights = np.left_shift(np.int64(1), np.arange(labels.shape[1], dtype=np.int64))
        codes = labels[self.train].astype(np.int64) @ weights  # (T,) label set as a bit code
        self.label_sets, self.group = np.unique(codes, return_inverse=True)  # (U,), (T,)
        self.group = self.group.astype(np.int64)
        self.group_size = np.bincount(self.group, minlength=len(self.label_sets))
        self._members = np.argsort(self.group, kind="stable")  # train positions grouped by label set
        self._member_start = np.concatenate([[0], np.cumsum(self.group_size)])
        if self.hashes is not None:
            self._train_hashes = np.ascontiguousarray(self.hashes[self.train])
        self._build_pool_tables()
        self.report = self._make_report()
        self._log_report()
        self._last: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ pools
    def _build_pool_tables(self) -> None:
        """Which label-set groups are partial / negative pools of which (U x U), and pool sizes."""
        cfg, sets, sizes = self.cfg, self.label_sets, self.group_size
        u = len(sets)
        share = (sets[:, None] & sets[None, :]) != 0  # share >= 1 disease
        no_finding = sets == 0
        self._partial_of = share & ~np.eye(u, dtype=bool)  # empty row for No Finding
        negative = ~share
        negative[no_finding] = ~no_finding[None, :]  # No Finding anchor: any image with a disease
        self._negative_of = negative
        exact_pool = sizes - 1  # the anchor itself is excluded
        partial_pool = self._partial_of.astype(np.int64) @ sizes
        negative_pool = negative.astype(np.int64) @ sizes
        n_pos, n_neg = cfg.num_positive_candidates, cfg.num_negative_candidates
        if cfg.positive_mode == "exact":
            n_exact = np.minimum(exact_pool, n_pos)
            n_partial = np.where(exact_pool == 0, np.minimum(partial_pool, n_pos), 0)
        else:
            want_partial = int(round(cfg.partial_fraction * n_pos))
            n_exact = np.minimum(exact_pool, n_pos - want_partial)
            n_partial = np.minimum(partial_pool, want_partial)
            n_exact = n_exact + np.minimum(exact_pool - n_exact, n_pos - n_exact - n_partial)  # top up exact
            n_partial = n_partial + np.minimum(partial_pool - n_partial, n_pos - n_exact - n_partial)
        self._pool_sizes = np.stack([exact_pool, partial_pool, negative_pool], axis=1)  # (U, 3)
        self._n_exact, self._n_partial = n_exact, n_partial
        self._n_negative = np.minimum(negative_pool, n_neg)

    def _make_report(self) -> MiningReport:
        sizes = self.group_size
        no_pos = (self._n_exact + self._n_partial) == 0
        no_neg = self._n_negative == 0
        n_pos_total = float(((self._n_exact + self._n_partial) * sizes).sum())
        return MiningReport(
            num_anchors=len(self.train),
            num_label_sets=len(self.label_sets),
            no_finding_anchors=int(sizes[self.label_sets == 0].sum()),
            anchors_without_exact_match=int(sizes[self._pool_sizes[:, 0] == 0].sum()),
            anchors_without_positive=int(sizes[no_pos].sum()),
            anchors_without_negative=int(sizes[no_neg].sum()),
            mean_positive_candidates=n_pos_total / len(self.train),
            mean_negative_candidates=float((self._n_negative * sizes).sum()) / len(self.train),
            partial_candidate_fraction=float((self._n_partial * sizes).sum()) / n_pos_total if n_pos_total else 0.0,
            fallback_positive_rows=[int(r) for r in self._rows_of_groups(no_pos)[:100]],
            fallback_negative_rows=[int(r) for r in self._rows_of_groups(no_neg)[:100]],
        )

    def _rows_of_groups(self, group_mask: np.ndarray) -> np.ndarray:
        """Cache rows of the anchors whose label-set group is in ``group_mask`` (U,) bool."""
        return self.train[np.sort(np.flatnonzero(group_mask[self.group]))]

    def _log_report(self) -> None:
        r = self.report
        log.info(
            "triplet miner: %d anchors, %d label sets (%d No Finding), %.0f positive / %.0f negative candidates "
            "per anchor on average, %.1f%% partial; ordering=%s, mode=%s",
            r.num_anchors, r.num_label_sets, r.no_finding_anchors, r.mean_positive_candidates,
            r.mean_negative_candidates, 100 * r.partial_candidate_fraction, self.cfg.ordering, self.cfg.positive_mode,
        )
        if r.anchors_without_exact_match:
            log.info("%d anchors have no exact label-set match in the training split", r.anchors_without_exact_match)
        if r.anchors_without_positive:
            log.warning("%d anchors have no positive in the training split; they use themselves as positive "
                        "(e.g. rows %s)", r.anchors_without_positive, r.fallback_positive_rows[:5])
        if r.anchors_without_negative:
            log.warning("%d anchors have no negative in the training split; they use themselves as negative "
                        "(e.g. rows %s)", r.anchors_without_negative, r.fallback_negative_rows[:5])

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return len(self.train)

    def epoch_triplets(self, epoch: int, rank: int = 0, world_size: int = 1, pad: bool = True) -> np.ndarray:
        """The triplets of one epoch (for one rank), as cache row numbers.

        All ranks compute the same full epoch (a function of (seed, epoch) only, so
        it does not depend on world_size) in a shuffled order, and rank r takes rows
        r, r + world_size, ... (as ``torch.utils.data.DistributedSampler``). With
        ``pad=True`` the list is first padded by repeating its first rows up to a
        multiple of world_size, so every rank gets the same number of rows (DDP needs
        equal batch counts); at most world_size - 1 anchors then appear twice in the
        epoch. With ``pad=False`` shards are disjoint and cover every anchor exactly
        once, lengths differing by at most one.

        Args:
            epoch: 0-based epoch (selects the curriculum window and the random stream).
            rank, world_size: this process's shard.
            pad: equalise shard lengths (see above).

        Returns:
            (T_rank, 3) int64 rows (anchor, positive, negative).
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        triplets = self._full_epoch(int(epoch))
        n = len(triplets)
        total = -(-n // world_size) * world_size if pad else n
        order = np.arange(total) % n
        return triplets[order[rank::world_size]]

    def candidates(self, epoch: int) -> list[CandidateBlock]:
        """The candidate sets of every anchor in one epoch (slow; for inspection and tests).

        Uses the same random draws as :meth:`epoch_triplets` for that epoch.
        """
        blocks: list[CandidateBlock] = []
        self._run_epoch(int(epoch), collect=blocks)
        return [
            CandidateBlock(self.train[b.anchors], self.train[b.positives], b.positive_is_partial, self.train[b.negatives])
            for b in blocks
        ]

    # ------------------------------------------------------------------ the epoch
    def _full_epoch(self, epoch: int) -> np.ndarray:
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        triplets = self._run_epoch(epoch)
        triplets.setflags(write=False)
        self._last = (epoch, triplets)
        return triplets

    def _run_epoch(self, epoch: int, collect: list[CandidateBlock] | None = None) -> np.ndarray:
        start, width = curriculum_window(epoch, self.cfg)
        rng = np.random.default_rng([self.seed, epoch])
        n_train = len(self.train)
        perm = rng.permutation(n_train)  # the epoch's pool order (positions into self.train)
        perm_group = self.group[perm]
        by_group = np.argsort(perm_group, kind="stable")  # exact pools, each in permuted order
        slot = np.empty(n_train, dtype=np.int64)  # anchor's position inside its own exact pool
        slot[perm[by_group]] = np.arange(n_train) - self._member_start[perm_group[by_group]]
        out = np.empty((n_train, 3), dtype=np.int64)
        for g in range(len(self.label_sets)):
            members = self._members[self._member_start[g] : self._member_start[g + 1]]
            exact_pool = perm[by_group[self._member_start[g] : self._member_start[g + 1]]]
            partial_pool = perm[self._partial_of[g][perm_group]] if self._n_partial[g] else perm[:0]
            negative_pool = perm[self._negative_of[g][perm_group]] if self._n_negative[g] else perm[:0]
            pools = _GroupPools(self, g, exact_pool, partial_pool, negative_pool)
            for c0 in range(0, len(members), self.chunk_size):
                chunk = members[c0 : c0 + self.chunk_size]
                pos, neg = pools.pick(chunk, slot[chunk], rng, start, width, collect)
                out[chunk] = np.stack([chunk, pos, neg], axis=1)
        out = self.train[out]  # train positions -> cache rows
        return out[rng.permutation(n_train)]


class _GroupPools:
    """The pools of one label-set group for one epoch, and the per-chunk pick (all in train positions)."""

    def __init__(self, miner: TripletMiner, g: int, exact: np.ndarray, partial: np.ndarray, negative: np.ndarray):
        self.cfg = miner.cfg
        self.n_exact = int(miner._n_exact[g])
        self.n_partial = int(miner._n_partial[g])
        self.n_negative = int(miner._n_negative[g])
        self.exact, self.partial, self.negative = exact, partial, negative
        self.hashes = miner._train_hashes
        self._hash_cache: dict[str, np.ndarray] = {}

    def pick(
        self,
        anchors: np.ndarray,
        self_slot: np.ndarray,
        rng: np.random.Generator,
        start: float,
        width: float,
        collect: list[CandidateBlock] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One positive and one negative per anchor (train positions); fallback = the anchor itself."""
        m = len(anchors)
        # window offsets: the exact window takes one extra slot that holds the anchor itself when it falls inside
        off_e = rng.integers(0, len(self.exact), m) if self.n_exact else np.zeros(m, np.int64)
        off_p = rng.integers(0, max(len(self.partial), 1), m)
        off_n = rng.integers(0, max(len(self.negative), 1), m)
        ke = self.n_exact + 1 if self.n_exact else 0  # exact window length incl. the slot of the anchor
        self_col = np.minimum((self_slot - off_e) % max(len(self.exact), 1), self.n_exact)  # slot to skip
        if collect is not None:
            collect.append(self._materialise(anchors, off_e, ke, self_col, off_p, off_n))
        n_pos = self.n_exact + self.n_partial
        rank_pos = _draw_rank(rng, n_pos, m, start, width, self.cfg.ordering)
        rank_neg = _draw_rank(rng, self.n_negative, m, start, width, self.cfg.ordering)

        if self.cfg.ordering == "phash" and n_pos:
            keys = np.empty((m, ke + self.n_partial), dtype=np.uint16)
            ah = self.hashes[anchors]
            if ke:
                keys[:, :ke] = self._keys("exact", off_e, ke, ah, rng, positive=True)
                keys[np.arange(m), self_col] = _SENTINEL
            if self.n_partial:
                keys[:, ke:] = self._keys("partial", off_p, self.n_partial, ah, rng, positive=True)
            col_pos = _select(keys, rank_pos)
        elif ke:  # uniform over the candidates: rank r is the r-th candidate (they are in random order)
            col_pos = np.where(rank_pos < self.n_exact, rank_pos + (rank_pos >= self_col), ke + rank_pos - self.n_exact)
        else:
            col_pos = rank_pos
        if self.cfg.ordering == "phash" and self.n_negative:
            keys = self._keys("negative", off_n, self.n_negative, self.hashes[anchors], rng, positive=False)
            col_neg = _select(keys, rank_neg)
        else:
            col_neg = rank_neg

        pos = anchors.copy()
        if n_pos:
            in_exact = col_pos < ke
            if ke:
                pos = np.where(in_exact, _take(self.exact, off_e + np.minimum(col_pos, ke - 1)), pos)
            if self.n_partial:
                pos = np.where(in_exact, pos, _take(self.partial, off_p + np.maximum(col_pos - ke, 0)))
        neg = _take(self.negative, off_n + col_neg) if self.n_negative else anchors.copy()
        return pos, neg

    def _keys(self, which: str, offsets: np.ndarray, k: int, anchor_hash: np.ndarray,
              rng: np.random.Generator, positive: bool) -> np.ndarray:
        """(m, k) uint16 sort keys: hardness-ordered distance in the high byte, a random tie-breaker in the low byte."""
        if which not in self._hash_cache:
            pool = getattr(self, which)
            self._hash_cache[which] = _wrap(self.hashes[pool], k)
        windows = sliding_window_view(self._hash_cache[which], k)[offsets]  # (m, k) uint64
        np.bitwise_xor(windows, anchor_hash[:, None], out=windows)
        dist = popcount64(windows)
        hardness = dist if positive else _MAX_KEY - dist  # easiest first
        keys = hardness.astype(np.uint16) << np.uint16(8)
        keys |= np.frombuffer(rng.bytes(keys.size), dtype=np.uint8).reshape(keys.shape)
        return keys

    def _materialise(self, anchors, off_e, ke, self_col, off_p, off_n) -> CandidateBlock:
        m = len(anchors)
        if ke:
            ex = _take(self.exact, off_e[:, None] + np.arange(ke))
            keep = np.arange(ke)[None, :] != self_col[:, None]
            ex = ex[keep].reshape(m, ke - 1)
        else:
            ex = np.empty((m, 0), np.int64)
        pa = _take(self.partial, off_p[:, None] + np.arange(self.n_partial))
        ne = _take(self.negative, off_n[:, None] + np.arange(self.n_negative))
        pos = np.concatenate([ex, pa], axis=1)
        is_partial = np.arange(pos.shape[1]) >= ex.shape[1]
        return CandidateBlock(anchors=anchors, positives=pos, positive_is_partial=is_partial, negatives=ne)


def _wrap(values: np.ndarray, k: int) -> np.ndarray:
    """``values`` followed by its first k entries, so windows of length k may wrap around."""
    return np.concatenate([values, values[:k]])


def _take(pool: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """pool[positions mod len(pool)]."""
    return pool[positions % len(pool)]


def _draw_rank(rng: np.random.Generator, n: int, m: int, start: float, width: float, ordering: str) -> np.ndarray:
    """(m,) ranks in [0, n): uniform over the curriculum window (phash) or over all n (random)."""
    if n == 0:
        return np.zeros(m, dtype=np.int64)
    u = rng.random(m)
    frac = u if ordering == "random" else start + u * width
    return np.minimum((frac * n).astype(np.int64), n - 1)


def _select(keys: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Column of the element of rank ``rank[i]`` in row i when sorted by key (keys are unique up to rare ties)."""
    kth = np.sort(keys, axis=1, kind="stable")[np.arange(len(keys)), rank]
    return np.argmax(keys == kth[:, None], axis=1)
