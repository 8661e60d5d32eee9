"""Session fixtures of the fault suite: one synthetic dataset, one cache, one reference training run.

Built once per session and never modified by a test (tests copy what they damage):

* ``synth_data``: ``cxrloc synth`` output, 40 images of 64 x 64 (ChestX-ray14 layout).
* ``clean_cache``: ``cxrloc prepare`` of it (size 64, chunks of 4 images), untouched by training.
* ``reference_run``: an uninterrupted 2-epoch run of the ``dlrv`` config with ``densenet-tiny`` at
  32 px on one thread (a copy of the cache), and ``epoch1_run``, a copy of that run folder taken
  when epoch 1 was complete (checkpoints/last.pt = epoch 1): the starting point of the resume,
  disk-full and non-finite tests.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_tools import FAST_TRAIN, PREPARE_KW, SYNTH_IMAGES, SYNTH_SIZE, torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: identical numbers to the one-thread child processes, and fast on busy cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cxrloc.data.synth.generator import generate_dataset

    root = tmp_path_factory.mktemp("faults-data") / "synth"
    generate_dataset(root, SYNTH_IMAGES, size=SYNTH_SIZE, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def clean_cache(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted prepare of ``synth_data`` (compare against, never write into)."""
    from cxrloc.data.prepare import prepare_cache

    out = tmp_path_factory.mktemp("faults-cache") / "clean"
    prepare_cache(synth_data, out, **PREPARE_KW)
    return out


@dataclass(frozen=True)
class ReferenceRun:
    cache: Path  # the cache it trained on (holds the pHash index too)
    run: Path  # 2 epochs, uninterrupted
    epoch1: Path  # the same run folder as it was after epoch 1


@pytest.fixture(scope="session")
def reference_run(clean_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    from lightning.pytorch.callbacks import Callback

    from cxrloc.config import load_config
    from cxrloc.train import train

    base = tmp_path_factory.mktemp("faults-train")
    cache = base / "cache"
    shutil.copytree(clean_cache, cache)
    run, epoch1 = base / "run", base / "epoch1"

    class SnapshotAfterEpoch1(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            if trainer.current_epoch == 1:
                shutil.copytree(run, epoch1)

    with torch_threads(1):
        result = train(load_config("dlrv", list(FAST_TRAIN)), cache, run, progress="none",
                       callbacks=[SnapshotAfterEpoch1()])
    assert result.status == "completed" and result.epochs_completed == 2
    return ReferenceRun(cache=cache, run=run, epoch1=epoch1)


@pytest.fixture
def epoch1_copy(reference_run: ReferenceRun, tmp_path: Path) -> Path:
    """A private copy of the run folder after epoch 1 (to resume, damage, fill the disk under)."""
    dst = tmp_path / "run"
    shutil.copytree(reference_run.epoch1, dst)
    return dst
