"""CPU memory allocator tuning: keep large freed blocks for reuse instead of returning them to the OS.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves every block above
its mmap threshold (at most 32 MiB by default) with a fresh ``mmap`` and unmaps it on free, so
the next step's activation of the same size page-faults and zero-fills all of its pages again.
DenseNet-121 at 224 px has activations of up to 49 MiB (16 images) or 147 MiB (48 images: a
DLRV triplet batch), so on 2 CPU cores a DLRV training step took 11.7 s instead of 7.7 s, with
2.5-3.0 million page faults, and cost 4.7-4.8x a 16-image step instead of 3.0-3.4x
(``benchmarks/malloc.py`` measures both; the numbers are in the README).

:func:`tune_cpu_malloc` raises the threshold to 1 GiB and stops trimming the heap (glibc
``mallopt``), the CPU counterpart of CUDA's caching allocator: the process keeps its peak
memory reserved and reuses it. The ``cxrloc`` command line calls it once at start; Python
users call it themselves. It changes no result, only speed and resident memory.

It does nothing (and says why at debug level) when
  * the C library is not glibc (macOS, Windows, musl),
  * ``CXRLOC_MALLOC_TUNING=0`` is set (opt out),
  * the user already chose an allocator: ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``MALLOC_MMAP_MAX_`` or ``MALLOC_TOP_PAD_`` in the environment, or jemalloc/tcmalloc/mimalloc
    in ``LD_PRELOAD``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

#: blocks up to this size come from the reusable heap instead of mmap (glibc default: 128 KiB, adaptive up to 32 MiB)
MMAP_THRESHOLD = 1 << 30
#: free memory at the top of the heap kept instead of returned to the OS (the C ``int`` maximum)
TRIM_THRESHOLD = 2**31 - 1
#: ``mallopt`` parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
ENV_OPT_OUT = "CXRLOC_MALLOC_TUNING"
_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: dict[str, object] = {"applied": False, "reason": "not called"}


def skip_reason() -> str | None:
    """Why :func:`tune_cpu_malloc` would do nothing in this process, or None if it would tune."""
    if os.environ.get(ENV_OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_OPT_OUT}={os.environ[ENV_OPT_OUT]}"
    user = [k for k in _USER_ENV if k in os.environ]
    if user:
        return f"the environment sets {', '.join(user)}"
    preload = os.environ.get("LD_PRELOAD", "")
    other = [a for a in _OTHER_ALLOCATORS if a in preload]
    if other:
        return f"LD_PRELOAD loads {other[0]}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"the C library is not glibc ({platform.system()} {' '.join(platform.libc_ver()).strip()})"
    return None


def tune_cpu_malloc() -> bool:
    """Raise glibc's mmap threshold and trim threshold (once per process); True when they are in effect."""
    if _state["applied"]:
        return True
    reason = skip_reason()
    if reason is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            reason = None if ok else "mallopt refused the values"
        except (OSError, AttributeError) as e:
            reason = f"libc.so.6 has no usable mallopt ({e})"
    _state["applied"] = reason is None
    _state["reason"] = reason or f"mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    log.debug("CPU malloc tuning %s: %s", "on" if reason is None else "off", _state["reason"])
    return reason is None


def malloc_state() -> dict[str, object]:
    """``{"applied": bool, "reason": str}`` for this process (benchmarks record it beside their numbers)."""
    return dict(_state)
