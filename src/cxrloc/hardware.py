"""What this machine does fast: the CPU's capability, native bfloat16, and the precision to train in.

One processor runs bfloat16 natively and another emulates it: on an x86 CPU with
AVX512-BF16 or AMX a DenseNet-121 step under bf16 autocast is 1.6-1.9x faster than in
float32, on an AVX2-only CPU (most laptops, many cloud machines) it is 7-9x *slower*
(the README's benchmark rows, each with its processor). So precision is chosen by
capability, not assumed:

* :func:`cpu_capability` reads what the CPU offers *as PyTorch will use it*: ATen's
  dispatch level (``torch.backends.cpu.get_cpu_capability()``, which honours
  ``ATEN_CPU_CAPABILITY``), oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``) and the processor's
  flags (``/proc/cpuinfo``). Setting ``ATEN_CPU_CAPABILITY=avx2`` and
  ``ONEDNN_MAX_CPU_ISA=AVX2`` on a newer CPU makes it behave, and be described, as an
  AVX2 machine.
* :func:`native_bf16` decides from those facts alone (a pure function, tested with the
  capability mocked): x86 with AVX512-BF16 or AMX-BF16, ATen at an AVX512 level and
  oneDNN not capped below its bf16 ISA; ARM with the BF16 extension.
* :func:`choose_precision` turns ``train.precision: auto`` into a Lightning precision:
  on the CPU ``bf16-mixed`` only where bf16 is native, else ``32-true``; on a CUDA GPU
  ``bf16-mixed`` where the GPU supports it (Ampere and newer), else ``16-mixed``. An
  explicit precision is obeyed, with a warning when it will be slow on this CPU.
* :func:`machine_description` is the one description of the machine that reports and
  benchmarks write beside their numbers.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the precisions Lightning accepts that cxrloc trains with
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
#: x86 flags (as /proc/cpuinfo spells them) that matter for our fast paths
X86_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
#: ARM features that matter (``Features`` line of /proc/cpuinfo)
ARM_FLAGS = ("asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")
#: oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which oneDNN runs bf16 natively
ONEDNN_BF16_ISAS = frozenset({
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL",
})


@dataclass(frozen=True)
class CpuCapability:
    """The CPU as PyTorch will use it.

    Attributes:
        arch: ``platform.machine()``: ``x86_64``, ``aarch64``, ...
        isa: ATen's dispatch level: ``AVX2``, ``AVX512``, ``DEFAULT``, ``SVE256``, ...
        flags: the relevant processor flags present (:data:`X86_FLAGS` / :data:`ARM_FLAGS`).
        onednn_max_isa: ``ONEDNN_MAX_CPU_ISA`` when set (upper case), else None.
    """

    arch: str
    isa: str
    flags: tuple[str, ...]
    onednn_max_isa: str | None = None

    @property
    def native_bf16(self) -> bool:
        return native_bf16(self)

    def summary(self) -> str:
        """One line for logs and reports, e.g. ``x86_64 AVX2 (avx2 fma), bf16 emulated``."""
        cap = f", ONEDNN_MAX_CPU_ISA={self.onednn_max_isa}" if self.onednn_max_isa else ""
        return (f"{self.arch} {self.isa} ({' '.join(self.flags) or 'no listed flags'}{cap}), "
                f"bf16 {'native' if self.native_bf16 else 'emulated'}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags), "native_bf16": self.native_bf16}


def native_bf16(cap: CpuCapability) -> bool:
    """Whether bfloat16 matrix products run natively (fast) on this CPU as PyTorch will use it."""
    if cap.arch in ("x86_64", "AMD64", "i686", "x86"):
        if not cap.isa.upper().startswith("AVX512"):
            return False  # ATen dispatches AVX2 (or lower) kernels: bf16 is converted in software
        if cap.onednn_max_isa is not None and cap.onednn_max_isa.upper() not in ONEDNN_BF16_ISAS:
            return False
        return "avx512_bf16" in cap.flags or "amx_bf16" in cap.flags
    if cap.arch in ("aarch64", "arm64"):
        return "bf16" in cap.flags
    return False


def cpu_capability() -> CpuCapability:
    """This CPU: ATen's dispatch level, oneDNN's cap and the relevant /proc/cpuinfo flags."""
    import torch

    arch = platform.machine()
    try:
        isa = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old torch: assume the generic level
        isa = "DEFAULT"
    present = _cpuinfo_flags()
    wanted = ARM_FLAGS if arch in ("aarch64", "arm64") else X86_FLAGS
    flags = tuple(f for f in wanted if f in present)
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None
    return CpuCapability(arch=arch, isa=isa, flags=flags, onednn_max_isa=onednn.upper() if onednn else None)


def _cpuinfo_flags() -> set[str]:
    """The ``flags`` (x86) or ``Features`` (ARM) of the first processor in /proc/cpuinfo; empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why (recorded in run.json, summary.json and the reports).

    Attributes:
        requested: what the config asked for (``auto`` or a Lightning precision).
        used: the Lightning precision passed to the Trainer.
        device: ``cpu`` or ``cuda`` (or ``mps``).
        reason: one sentence a person understands.
        slow: True when an explicit choice will be slow on this processor (a warning was logged).
    """

    requested: str
    used: str
    device: str
    reason: str
    slow: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_precision(
    requested: str,
    device: str,
    cap: CpuCapability | None = None,
    cuda_bf16: bool | None = None,
) -> PrecisionChoice:
    """Resolve ``train.precision`` for a device.

    Args:
        requested: ``auto``, ``32-true``, ``bf16-mixed`` or ``16-mixed``.
        device: where the model runs: ``cpu``, ``cuda`` or ``mps``.
        cap: the CPU (default: :func:`cpu_capability`); only read for ``cpu``.
        cuda_bf16: whether the GPU supports bf16 (default: ``torch.cuda.is_bf16_supported()``).

    Returns:
        :class:`PrecisionChoice`.

    Raises:
        ValueError: an unknown precision.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision = {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if device == "cpu":
        cap = cap or cpu_capability()
        native = native_bf16(cap)
        where = f"this CPU ({cap.arch} {cap.isa}{', ONEDNN_MAX_CPU_ISA=' + cap.onednn_max_isa if cap.onednn_max_isa else ''})"
        if requested == "auto":
            if native:
                return PrecisionChoice(requested, "bf16-mixed", device, f"auto: {where} runs bfloat16 natively")
            return PrecisionChoice(requested, "32-true", device,
                                   f"auto: {where} has no native bfloat16 (AVX512-BF16 / AMX / ARM BF16), float32 is faster")
        if requested in ("bf16-mixed", "16-mixed") and not (native and requested == "bf16-mixed"):
            reason = (f"{requested} as configured; {where} emulates it: expect training several times slower than "
                      "32-true (7-9x measured on AVX2); train.precision=auto picks the fast one")
            log.warning("precision %s", reason)
            return PrecisionChoice(requested, requested, device, reason, slow=True)
        return PrecisionChoice(requested, requested, device, f"{requested} as configured")
    if device == "cuda":
        if requested == "auto":
            if cuda_bf16 is None:
                import torch

                cuda_bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
            if cuda_bf16:
                return PrecisionChoice(requested, "bf16-mixed", device, "auto: the GPU supports bfloat16")
            return PrecisionChoice(requested, "16-mixed", device, "auto: the GPU has no bfloat16; float16 with loss scaling")
        return PrecisionChoice(requested, requested, device, f"{requested} as configured")
    if requested == "auto":  # mps and others: mixed precision support varies; float32 is always correct
        return PrecisionChoice(requested, "32-true", device, f"auto: float32 on {device}")
    return PrecisionChoice(requested, requested, device, f"{requested} as configured")


def training_device(accelerator: str) -> str:
    """The device type Lightning will train on for ``train.accelerator`` (``auto`` picks CUDA when present)."""
    import torch

    a = accelerator.lower()
    if a in ("gpu", "cuda"):
        return "cuda"
    if a == "mps":
        return "mps"
    if a == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
    return "cpu"


def machine_description(**extra: Any) -> dict[str, Any]:
    """CPU model and capability, cores, memory, OS, library versions (for reports and benchmarks).

    ``extra`` fields are added as given.
    """
    import numpy as np
    import PIL
    import torch

    import cxrloc

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    from cxrloc.malloc import malloc_state

    cap = cpu_capability()
    return {
        "cpu": cpu,
        "cpu_capability": cap.to_dict(),
        "cpu_summary": cap.summary(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem_gib,
        "load_average_at_start": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "cxrloc": cxrloc.__version__,
        "cpu_malloc": malloc_state(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    }
