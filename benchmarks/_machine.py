"""The machine description every benchmark writes beside its numbers (shared helper, not a benchmark).

It is :func:`cxrloc.hardware.machine_description`: CPU model and capability (ATen's dispatch level,
native bfloat16 or not, the relevant flags), cores, memory, load at the start, library versions.
"""

from __future__ import annotations

from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """CPU model and capability, cores, load average at start, library versions, plus ``extra`` fields."""
    from cxrloc.hardware import (
        machine_description,  # benchmarks put src/ on sys.path before importing this file
    )

    return machine_description(**extra)
