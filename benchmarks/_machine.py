"""The machine description every benchmark writes beside its numbers (shared helper, not a benchmark)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """CPU model, cores, load average at start, library versions, plus ``extra`` fields."""
    import numpy as np
    import PIL
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from cxrloc.malloc import malloc_state  # benchmarks put src/ on sys.path before importing this file

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
        "cpu_malloc": malloc_state(),  # tune_cpu_malloc() applied or not (cxrloc/malloc.py)
        **extra,
    }
