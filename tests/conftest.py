"""Shared fixtures. The real-data sample comes from $CXRLOC_SAMPLE_DIR (never copied into the repo).

When CXRLOC_REQUIRE_SAMPLE=1 (CI), a missing sample folder is an error, and any
skipped test other than those marked ``gpu`` fails the run, so nothing is
silently skipped there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REQUIRE_SAMPLE = os.environ.get("CXRLOC_REQUIRE_SAMPLE") == "1"
_default_sample = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih-cxr14"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real ChestX-ray14 sample folder (``$CXRLOC_SAMPLE_DIR``, default ../shared/data/nih-cxr14)."""
    path = Path(os.environ.get("CXRLOC_SAMPLE_DIR", _default_sample))
    if not (path / "images").is_dir():
        if REQUIRE_SAMPLE:
            pytest.fail(f"CXRLOC_REQUIRE_SAMPLE=1 but the sample folder {path} is missing")
        pytest.skip(f"real ChestX-ray14 sample not found at {path} (set CXRLOC_SAMPLE_DIR)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


_bad_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if REQUIRE_SAMPLE and report.skipped and "gpu" not in report.keywords:
        _bad_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _bad_skips:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"CXRLOC_REQUIRE_SAMPLE=1: {len(_bad_skips)} test(s) skipped that must run in CI:", red=True)
            for nodeid in _bad_skips:
                tr.write_line(f"  {nodeid}", red=True)
        session.exitstatus = 1


@pytest.fixture
def inject_loss_factor(monkeypatch: pytest.MonkeyPatch):
    """``inject({k: factor})``: multiply the loss by ``factor`` (nan or inf) on the k-th loss evaluation (1-based)."""
    from cxrloc.model.losses import DLRVLoss

    real = DLRVLoss.forward

    def inject(at: dict[int, float]) -> None:
        calls = {"n": 0}

        def forward(self, outputs, labels, num_anchors=None):
            terms = real(self, outputs, labels, num_anchors)
            calls["n"] += 1
            if calls["n"] in at:
                terms = {**terms, "loss": terms["loss"] * at[calls["n"]]}
            return terms

        monkeypatch.setattr(DLRVLoss, "forward", forward)

    return inject
