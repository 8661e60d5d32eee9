"""Perceptual hash (pHash) of cached images, vectorised over batches, and Hamming distances.

The paper (section 3.2) orders positive and negative candidates by perceptual
similarity to the anchor using pHash (Zauner 2010). The reference implementation
is ``imagehash.phash`` (hash_size 8, highfreq_factor 4)::

    pixels = image.convert("L").resize((32, 32), LANCZOS)          # uint8
    dct    = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)
    low    = dct[:8, :8];  bits = low > median(low)                  # 64 bits

This module computes the same thing for a whole batch at once:

1. Resize: Pillow's antialiased Lanczos (a = 3) resampling is separable; its
   fixed-point coefficients are rebuilt here as two matrices, (32, W) and (32, H),
   computed once per input size, and applied with matmuls in the same order as
   Pillow (horizontal pass, round/clip to uint8, vertical pass, round/clip), in
   float32, recomputing in float64 the rare sums that lie near a rounding boundary.
   On the same uint8 input this reproduces Pillow's 32x32 image exactly (tested).
2. 2-D DCT-II, unnormalised as ``scipy.fftpack.dct`` (y_k = 2 sum_n x_n cos(pi k (2n+1) / 2N)),
   only the top-left 8x8 block: ``C8 @ P @ C8.T`` with C8 the first 8 rows of the
   DCT matrix, in float64.
3. Threshold at the median of the 64 values (strict ``>``, as imagehash) and pack
   the bits, row-major (row = vertical frequency), first bit = most significant,
   into one uint64. ``int(str(imagehash.phash(img)), 16)`` equals our value when
   the hashes agree, so Hamming distances are directly comparable.

:func:`phash_index` hashes every row of a prepared cache and stores the result
beside it (``phash.npy`` + ``phash.json``), rebuilt only when the cache's images
change.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cxrloc.fileio import atomic_open, atomic_write_json, sha256_file

log = logging.getLogger(__name__)

HASH_SIZE = 8  # imagehash default: 8x8 = 64 bits
RESIZED = 32  # hash_size * highfreq_factor (4)
LANCZOS_A = 3.0  # Pillow's Lanczos support (a = 3)
PILLOW_PRECISION_BITS = 22  # Pillow's fixed-point coefficient precision for 8-bit images (32 - 8 - 2)
INDEX_FILE = "phash.npy"
INDEX_META = "phash.json"
INDEX_FORMAT = 1
ALGORITHM = "phash-8x8-dct32-lanczos-pillow"  # changes whenever the hash definition changes
FALLBACK_ENV = "CXRLOC_PHASH_DIR"  # where the index goes when the cache folder is read-only


# --------------------------------------------------------------------------- the hash


def _lanczos(x: np.ndarray) -> np.ndarray:
    """Pillow's truncated sinc: sinc(x) sinc(x / 3) on [-3, 3)."""
    inside = (x >= -LANCZOS_A) & (x < LANCZOS_A)
    return np.where(inside, np.sinc(x) * np.sinc(x / LANCZOS_A), 0.0)


@lru_cache(maxsize=32)
def resample_matrix(in_size: int, out_size: int = RESIZED) -> np.ndarray:
    """Pillow's antialiased Lanczos resampling along one axis as an (out_size, in_size) matrix.

    Rebuilds Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc``: for output
    pixel i the centre is (i + 0.5) * scale, the support 3 * max(scale, 1), the taps
    are normalised to sum 1 and rounded to 22-bit fixed point. The returned values
    are those integers divided by 2**22 (exact in float32).

    Returns:
        (out_size, in_size) float64, read-only.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resample sizes must be >= 1, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = LANCZOS_A * filter_scale
    one = float(1 << PILLOW_PRECISION_BITS)
    mat = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _lanczos((np.arange(lo, hi) - center + 0.5) / filter_scale)
        total = taps.sum()
        if total != 0.0:
            taps = taps / total
        fixed = np.where(taps < 0, np.trunc(-0.5 + taps * one), np.trunc(0.5 + taps * one))
        mat[i, lo:hi] = fixed / one
    mat.setflags(write=False)
    return mat


@lru_cache(maxsize=4)
def dct_matrix(n: int = RESIZED, k: int = HASH_SIZE) -> np.ndarray:
    """First ``k`` rows of the unnormalised DCT-II matrix of size ``n`` (``scipy.fftpack.dct`` type 2).

    Returns:
        (k, n) float64 with entry [u, x] = 2 cos(pi u (2x + 1) / (2n)).
    """
    u = np.arange(k)[:, None]
    x = np.arange(n)[None, :]
    mat = 2.0 * np.cos(np.pi * u * (2 * x + 1) / (2 * n))
    mat.setflags(write=False)
    return mat


@lru_cache(maxsize=32)
def _resample_plan(in_size: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
    """The (32, in_size) Lanczos matrix in float32 and float64, and its band blocks (o0, o1, lo, hi).

    The matrix is banded (each output reads ~6 * scale inputs), so the horizontal
    pass multiplies only the input columns each group of 16 outputs uses.
    """
    mat = resample_matrix(in_size)
    blocks = []
    for o0 in range(0, RESIZED, 16):
        o1 = min(o0 + 16, RESIZED)
        cols = np.flatnonzero(np.any(mat[o0:o1] != 0, axis=0))
        lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
        blocks.append((o0, o1, lo, hi))
    return torch.from_numpy(mat.astype(np.float32)), torch.from_numpy(mat.copy()), blocks


_TIE = 1e-3  # float32 sums are within ~3e-5 of the exact value; closer than this to x.5 -> recompute exactly


def _round_like_pillow(acc: torch.Tensor, exact: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]) -> torch.Tensor:
    """Pillow's rounding of a filtered value: floor(x + 0.5), clipped to [0, 255].

    ``acc`` holds float32 sums; the few that lie within ``_TIE`` of a rounding
    boundary are recomputed by ``exact(indices)`` in float64, which is exact here
    (8-bit pixels times 22-bit fixed-point weights), so the result equals Pillow's
    integer arithmetic.
    """
    near = (acc - acc.floor() - 0.5).abs_() < _TIE
    rounded = acc.add(0.5).floor_()
    if near.any():
        idx = near.nonzero(as_tuple=True)
        rounded[idx] = torch.floor(exact(idx) + 0.5).to(rounded.dtype)
    return rounded.clamp_(0, 255)


def resize32(images: np.ndarray) -> np.ndarray:
    """Resize a batch of grayscale images to 32x32 exactly as Pillow's ``resize((32, 32), LANCZOS)``.

    Two passes as in Pillow: horizontal (B*H, W) @ (W, 32), round to uint8, then
    vertical (32, H) @ (B, H, 32), round to uint8.

    Args:
        images: (B, H, W) uint8.

    Returns:
        (B, 32, 32) uint8.
    """
    images = _check_batch(images)
    b, h, w = images.shape
    if not images.flags.writeable:  # e.g. a slice of the cache's read-only memmap
        images = np.array(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    if w != RESIZED:  # Pillow skips a pass whose size does not change
        kh, kh64, blocks = _resample_plan(w)
        flat = x.reshape(b * h, w)
        acc = torch.empty(b * h, RESIZED)
        for o0, o1, lo, hi in blocks:
            torch.mm(flat[:, lo:hi], kh[o0:o1, lo:hi].T, out=acc[:, o0:o1])
        x = _round_like_pillow(acc, lambda i: (flat[i[0]].double() * kh64[i[1]]).sum(1)).reshape(b, h, RESIZED)
    if h != RESIZED:
        kv, kv64, _ = _resample_plan(h)
        x = _round_like_pillow(torch.matmul(kv, x), lambda i: (kv64[i[1]] * x[i[0], :, i[2]].double()).sum(1))
    return x.to(torch.uint8).numpy()


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack (..., 64) booleans into uint64, first bit most significant (imagehash's hex order)."""
    if bits.shape[-1] != 64:
        raise ValueError(f"expected 64 bits in the last axis, got shape {bits.shape}")
    packed = np.packbits(bits.astype(bool), axis=-1)  # (..., 8) uint8, big-endian bits
    return np.ascontiguousarray(packed).view(">u8")[..., 0].astype(np.uint64)


def unpack_bits(hashes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (...,) uint64 -> (..., 64) bool."""
    be = np.asarray(hashes, dtype=np.uint64).astype(">u8")
    return np.unpackbits(be[..., None].view(np.uint8), axis=-1).astype(bool)


def phash_batch(images: np.ndarray) -> np.ndarray:
    """pHash of a batch of grayscale uint8 images (imagehash.phash, hash_size 8).

    Args:
        images: (B, H, W) or (H, W) uint8.

    Returns:
        (B,) uint64 (or a uint64 scalar array for one image).
    """
    single = np.ndim(images) == 2
    batch = _check_batch(images[None] if single else images)
    small = resize32(batch).astype(np.float64)  # (B, 32, 32)
    c8 = dct_matrix()
    low = c8 @ small @ c8.T  # (B, 8, 8): top-left of the 2-D DCT-II
    flat = low.reshape(len(batch), HASH_SIZE * HASH_SIZE)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    out = pack_bits(bits)
    return out[0] if single else out


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Hamming distance between 64-bit hashes, broadcasting like ``a ^ b``.

    Uses ``np.bitwise_count`` (NumPy >= 2.0) or the SWAR popcount otherwise.

    Returns:
        uint8 array of the broadcast shape, values 0..64.
    """
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return popcount64(x)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64, as uint8."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.uint8, copy=False)
    return _popcount_swar(x)


def _popcount_swar(x: np.ndarray) -> np.ndarray:
    """Classic bit-parallel popcount (fallback for NumPy < 2.0)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.uint8)


def _check_batch(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected a (B, H, W) uint8 batch of grayscale images, got shape {arr.shape} {arr.dtype}")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"empty images of shape {arr.shape[1:]}")
    return arr


# --------------------------------------------------------------------------- the index beside a cache


def phash_index(
    cache: Any,
    *,
    batch_size: int = 32,
    fallback_dir: str | Path | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> np.ndarray:
    """pHash of every image of a prepared cache, stored beside it and reused while the cache is unchanged.

    The index is ``phash.npy`` ((N,) uint64, row i = cache row i) plus
    ``phash.json`` (the cache's ``images.npy`` SHA-256 from ``meta.json``, count,
    size, algorithm, and the SHA-256 of ``phash.npy``), both written atomically,
    json last. A stored index is reused only when all of these match, so
    rewriting the cache (new images) rebuilds it.

    When the cache folder cannot be written (read-only), the index goes to
    ``fallback_dir`` (default ``$CXRLOC_PHASH_DIR`` or ``~/.cache/cxrloc/phash``),
    in a sub-folder named by the images' checksum; if that fails too it is kept in
    memory only, with a warning.

    Args:
        cache: a :class:`cxrloc.data.cache.Cache` or the path of a cache folder.
        batch_size: images hashed per step (small batches stay in the CPU cache; 32 is fastest here).
        fallback_dir: base folder for the index of a read-only cache.
        progress: show a tqdm bar.
        workers: threads hashing batches in parallel (default: torch's thread count, at most the cores).

    Returns:
        (N,) uint64 hashes (read-only array).
    """
    from cxrloc.data.cache import IMAGES_FILE, Cache

    if not isinstance(cache, Cache):
        cache = Cache(cache)
    images_sha = cache.meta.get("files", {}).get(IMAGES_FILE, {}).get("sha256") or sha256_file(cache.root / IMAGES_FILE)
    expected = {
        "format": INDEX_FORMAT,
        "algorithm": ALGORITHM,
        "images_sha256": images_sha,
        "count": len(cache),
        "size": cache.size,
    }
    fallback = _fallback_folder(fallback_dir, images_sha)
    for folder in (cache.root, fallback):
        stored = _load_index(folder, expected)
        if stored is not None:
            log.info("pHash index reused from %s", folder / INDEX_FILE)
            return stored

    hashes = _hash_cache(cache, batch_size, progress, workers)
    for folder in (cache.root, fallback):
        try:
            _save_index(folder, hashes, expected)
        except OSError as e:
            log.warning("cannot write the pHash index to %s (%s)", folder, e)
            continue
        if folder != cache.root:
            log.warning("cache folder %s is not writable; pHash index stored in %s", cache.root, folder)
        break
    else:
        log.warning("pHash index for %s kept in memory only (no writable location)", cache.root)
    hashes.setflags(write=False)
    return hashes


def _hash_cache(cache: Any, batch_size: int, progress: bool, workers: int | None = None) -> np.ndarray:
    """Hash all rows in batches, ``workers`` batches at a time.

    Ours: one thread per core, each running single-threaded torch, instead of one
    batch at a time on torch's intra-op threads. The small matmuls then need no
    thread synchronisation between cores, which degrades far less when the machine
    is busy (measured on 2 shared cores at load ~6: 4-6x faster than 2 intra-op
    threads); ``benchmarks/mining.py`` times both ways in the same run.
    """
    images = cache.images
    n = len(cache)
    out = np.empty(n, dtype=np.uint64)
    workers = workers or max(1, min(os.cpu_count() or 1, torch.get_num_threads()))

    def work(start: int) -> int:
        out[start : start + batch_size] = phash_batch(np.array(images[start : start + batch_size]))
        return start

    starts = range(0, n, batch_size)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            done = pool.map(work, starts)
            for _ in tqdm(done, total=len(starts), desc="pHash", unit="batch", leave=False,
                          disable=not progress or n <= batch_size * 8):
                pass
    finally:
        torch.set_num_threads(torch_threads)
    return out


def _fallback_folder(base: str | Path | None, images_sha: str) -> Path:
    if base is None:
        base = os.environ.get(FALLBACK_ENV) or Path.home() / ".cache" / "cxrloc" / "phash"
    return Path(base) / images_sha[:16]


def _load_index(folder: Path, expected: dict[str, Any]) -> np.ndarray | None:
    meta_path, data_path = folder / INDEX_META, folder / INDEX_FILE
    if not meta_path.exists() or not data_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); rebuilding the pHash index", meta_path, e)
        return None
    if any(meta.get(k) != v for k, v in expected.items()):
        log.info("%s: stale (cache changed); rebuilding the pHash index", meta_path)
        return None
    try:
        if sha256_file(data_path) != meta.get("sha256"):
            log.warning("%s: checksum mismatch; rebuilding the pHash index", data_path)
            return None
        hashes = np.load(data_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); rebuilding the pHash index", data_path, e)
        return None
    if hashes.shape != (expected["count"],) or hashes.dtype != np.uint64:
        log.warning("%s: shape %s %s, expected (%d,) uint64; rebuilding", data_path, hashes.shape, hashes.dtype, expected["count"])
        return None
    hashes.setflags(write=False)
    return hashes


def _save_index(folder: Path, hashes: np.ndarray, expected: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / INDEX_FILE
    (folder / INDEX_META).unlink(missing_ok=True)  # invalid until the new json is written
    with atomic_open(data_path) as f:
        np.save(f, hashes)
    atomic_write_json(folder / INDEX_META, {**expected, "sha256": sha256_file(data_path)})
