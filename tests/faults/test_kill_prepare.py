"""``cxrloc prepare`` SIGKILLed at random points: the rerun completes and the cache is byte-identical.

The kill points are drawn (seeded) from every event of an uninterrupted run: each image
decode, each fsync (a temporary file written but not renamed, a chunk marker line) and
each rename. A second family kills the process-pool run at a random time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fault_child import KillSwitch
from fault_tools import CHILD, PREPARE_KW, cache_bytes, child_env, run_child

from cxrloc.cli import main
from cxrloc.data.cache import Cache, CacheError
from cxrloc.data.prepare import prepare_cache


@pytest.fixture(scope="module")
def event_count(synth_data, tmp_path_factory) -> int:
    """Number of kill points of an uninterrupted run (same code as the child counts)."""
    out = tmp_path_factory.mktemp("count") / "cache"
    switch = KillSwitch(kill_at=0)
    with pytest.MonkeyPatch.context() as mp:
        switch.install(mp.setattr)
        prepare_cache(synth_data, out, **PREPARE_KW)
    assert switch.count > SYNTH_EVENTS_AT_LEAST
    return switch.count


SYNTH_EVENTS_AT_LEAST = 40 + 10  # 40 decodes + 10 chunk markers, plus the atomic writes


def _killed(synth_data, out, kill_at, log) -> None:
    proc = run_child(["prepare", str(synth_data), str(out), str(kill_at), "1", str(PREPARE_KW["chunk_size"])], log)
    assert proc.returncode == -signal.SIGKILL, log.read_text()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sigkill_at_random_event_then_rerun_is_byte_identical(synth_data, clean_cache, event_count, tmp_path, seed):
    """Seed k kills at a random event of the k-th quarter of the run (decoding ... finalising); odd seeds twice."""
    rng = np.random.default_rng(seed)
    out = tmp_path / "cache"
    lo, hi = 1 + seed * event_count // 4, 1 + (seed + 1) * event_count // 4
    first = int(rng.integers(lo, hi))
    second = int(rng.integers(first, event_count + 1))
    _killed(synth_data, out, first, tmp_path / "kill1.log")
    if not (out / "meta.json").exists():  # killed before the end: the folder is unfinished and says so
        with pytest.raises(CacheError, match="unfinished"):
            Cache(out)
    if seed % 2:  # and once more while resuming (a second crash must not spoil the first's progress)
        proc = run_child(["prepare", str(synth_data), str(out), str(second - first + 1), "1",
                          str(PREPARE_KW["chunk_size"])], tmp_path / "kill2.log")
        assert proc.returncode in (0, -signal.SIGKILL), (tmp_path / "kill2.log").read_text()
    result = prepare_cache(synth_data, out, **PREPARE_KW)
    assert cache_bytes(out) == cache_bytes(clean_cache), f"kill at event {first} of {event_count}"
    Cache(out).verify()
    assert not result.bad_images


def test_sigkill_while_dropping_bad_rows(synth_data, tmp_path):
    """With an undecodable image the partial array is compacted into a new file: killed there, still identical."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    victim = sorted((data / "images").glob("*.png"))[5]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated PNG
    clean = prepare_cache(data, tmp_path / "clean", **PREPARE_KW)
    assert len(clean.bad_images) == 1 and victim.name in clean.bad_images[0]
    switch = KillSwitch(kill_at=0)
    with pytest.MonkeyPatch.context() as mp:
        switch.install(mp.setattr)
        prepare_cache(data, tmp_path / "count", **PREPARE_KW)
    for k, kill_at in enumerate((switch.count - 13, switch.count - 12, switch.count - 8)):  # compaction, index.csv
        out = tmp_path / f"cache{k}"
        _killed(data, out, kill_at, tmp_path / f"kill{k}.log")
        prepare_cache(data, out, **PREPARE_KW)
        assert cache_bytes(out) == cache_bytes(tmp_path / "clean"), f"kill at event {kill_at} of {switch.count}"


def test_kill_before_the_final_rename_then_cli_rerun(synth_data, clean_cache, event_count, tmp_path, capsys):
    """The last events are meta.json's fsync and rename: killed there, a rerun only rewrites meta.json."""
    out = tmp_path / "cache"
    _killed(synth_data, out, event_count - 1, tmp_path / "kill.log")
    leftovers = sorted(p.name for p in out.iterdir())
    assert "meta.json" not in leftovers and any(n.startswith(".meta.json.") for n in leftovers), leftovers
    with pytest.raises(CacheError, match="unfinished"):
        Cache(out)
    assert main(["prepare", "--data-dir", str(synth_data), "--out", str(out), "--size", "64", "--workers", "1",
                 "--chunk-size", "4", "--no-progress"]) == 0
    assert "resumed an interrupted run" in capsys.readouterr().out
    assert cache_bytes(out) == cache_bytes(clean_cache)


@pytest.mark.parametrize("seed", [10, 11])
def test_sigkill_of_the_worker_pool_at_a_random_time(synth_data, clean_cache, tmp_path, seed):
    """Two decoding processes, the parent killed at a random moment (workers die with it: PR_SET_PDEATHSIG)."""
    out = tmp_path / "cache"
    cmd = [sys.executable, str(CHILD), "prepare", str(synth_data), str(out), "0", "2", "2"]
    with open(tmp_path / "timing.log", "w") as log:
        t0 = time.monotonic()
        subprocess.run(cmd[:4] + [str(tmp_path / "timing")] + cmd[5:], stdout=log, stderr=log, env=child_env(),
                       check=True, timeout=300)
        duration = time.monotonic() - t0
        delay = float(np.random.default_rng(seed).uniform(0.3, 1.0)) * duration
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=child_env())
        time.sleep(delay)
        workers = _children_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) in (-signal.SIGKILL, 0)
    _wait_until_gone(workers)
    prepare_cache(synth_data, out, **{**PREPARE_KW, "workers": 2})
    assert cache_bytes(out) == cache_bytes(clean_cache)


def _children_of(parent: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _stat(int(p))[1] == parent]


def _stat(pid: int) -> tuple[str, int]:
    """(state, parent pid) of a process; ("X", -1) when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):
        return "X", -1


def _wait_until_gone(pids: list[int], timeout: float = 15.0) -> None:
    """Pool workers of a killed parent must exit (else they would go on writing into the partial file)."""
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if _stat(p)[0] not in ("X", "Z")]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker processes {alive} of the killed prepare are still running")
