"""Precision and fast paths chosen by what the processor does fast (cxrloc.hardware), capability mocked."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from cxrloc.hardware import (
    CpuCapability,
    choose_precision,
    cpu_capability,
    machine_description,
    native_bf16,
)

AVX2 = CpuCapability(arch="x86_64", isa="AVX2", flags=("avx2", "fma"))
SAPPHIRE = CpuCapability(arch="x86_64", isa="AVX512", flags=("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                                             "amx_bf16", "amx_tile"))
ZEN4 = CpuCapability(arch="x86_64", isa="AVX512", flags=("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"))
SKYLAKE = CpuCapability(arch="x86_64", isa="AVX512", flags=("avx2", "fma", "avx512f"))
GRAVITON3 = CpuCapability(arch="aarch64", isa="SVE256", flags=("asimd", "sve", "bf16", "i8mm"))
GRAVITON2 = CpuCapability(arch="aarch64", isa="DEFAULT", flags=("asimd", "asimddp"))


@pytest.mark.parametrize(("cap", "native"), [
    (AVX2, False), (SAPPHIRE, True), (ZEN4, True), (SKYLAKE, False), (GRAVITON3, True), (GRAVITON2, False),
    # a bf16 CPU made to behave as AVX2 (ATEN_CPU_CAPABILITY=avx2 lowers ATen's dispatch level)
    (replace(ZEN4, isa="AVX2"), False),
    # oneDNN capped below its bf16 ISA, or at it
    (replace(SAPPHIRE, onednn_max_isa="AVX2"), False),
    (replace(SAPPHIRE, onednn_max_isa="AVX512_CORE"), False),
    (replace(SAPPHIRE, onednn_max_isa="AVX512_CORE_BF16"), True),
    (replace(SAPPHIRE, onednn_max_isa="AVX512_CORE_AMX"), True),
    (CpuCapability(arch="ppc64le", isa="DEFAULT", flags=()), False),
])
def test_native_bf16_decision(cap, native):
    assert native_bf16(cap) is native
    assert cap.native_bf16 is native
    assert ("bf16 native" in cap.summary()) is native


def test_auto_precision_on_the_cpu_follows_native_bf16():
    assert choose_precision("auto", "cpu", AVX2).used == "32-true"
    assert choose_precision("auto", "cpu", SKYLAKE).used == "32-true"
    assert choose_precision("auto", "cpu", SAPPHIRE).used == "bf16-mixed"
    assert choose_precision("auto", "cpu", GRAVITON3).used == "bf16-mixed"
    choice = choose_precision("auto", "cpu", AVX2)
    assert "AVX2" in choice.reason and not choice.slow and choice.requested == "auto"


def test_explicit_precision_is_obeyed_with_a_warning_when_slow(caplog):
    with caplog.at_level(logging.WARNING, logger="cxrloc.hardware"):
        slow = choose_precision("bf16-mixed", "cpu", AVX2)
    assert slow.used == "bf16-mixed" and slow.slow
    assert any("slower" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cxrloc.hardware"):
        fast = choose_precision("bf16-mixed", "cpu", SAPPHIRE)
        plain = choose_precision("32-true", "cpu", AVX2)
    assert (fast.used, fast.slow, plain.used, plain.slow) == ("bf16-mixed", False, "32-true", False)
    assert not caplog.records
    assert choose_precision("16-mixed", "cpu", SAPPHIRE).slow  # fp16 on a CPU is emulated too


def test_auto_precision_on_gpus_and_other_devices():
    assert choose_precision("auto", "cuda", cuda_bf16=True).used == "bf16-mixed"
    assert choose_precision("auto", "cuda", cuda_bf16=False).used == "16-mixed"
    assert choose_precision("32-true", "cuda", cuda_bf16=True).used == "32-true"
    assert choose_precision("auto", "mps").used == "32-true"


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="train.precision"):
        choose_precision("bf16", "cpu", AVX2)


def test_aten_avx2_override_makes_auto_pick_float32():
    """ATEN_CPU_CAPABILITY=avx2 (+ oneDNN capped at AVX2) emulates an AVX2 machine on any x86 CPU."""
    code = ("import json; from cxrloc.hardware import cpu_capability, choose_precision; c = cpu_capability(); "
            "print(json.dumps([c.isa, c.onednn_max_isa, c.native_bf16, choose_precision('auto', 'cpu', c).used]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    isa, onednn, native, used = json.loads(out.strip().splitlines()[-1])
    if cpu_capability().arch == "x86_64":
        assert isa == "AVX2"
    assert (onednn, native, used) == ("AVX2", False, "32-true")


def test_machine_description_names_the_capability():
    m = machine_description(note="x")
    assert m["cpu_capability"]["isa"] == cpu_capability().isa
    assert m["cpu_summary"] == cpu_capability().summary()
    assert m["note"] == "x" and m["cores"] >= 1
