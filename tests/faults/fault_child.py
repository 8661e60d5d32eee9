"""Child processes of the fault suite: runs that SIGKILL themselves at a chosen point, and the decoder fuzz worker.

Usage (run by the tests, not collected by pytest)::

    python fault_child.py prepare DATA OUT KILL_AT WORKERS CHUNK   # KILL_AT = 0: never
    python fault_child.py train CACHE OUT MODE ARG                 # MODE: batch | checkpoint-write
    python fault_child.py decode FILE...                           # fuzz worker, one line per file

A SIGKILL gives the process no chance to clean up (no ``finally``, no ``atexit``):
exactly what an OOM killer, a pre-empted node or ``kill -9`` does.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillSwitch:
    """Counts file-system and decoding events; SIGKILLs this process at event number ``kill_at``.

    Events: every image decode (``read_image_resized`` in the prepare worker), every
    ``os.fsync`` (the end of each atomic write and each ``chunks.done`` line, i.e. a
    temporary file fully written but not yet renamed) and every ``os.replace``
    (the rename itself). ``kill_at=0`` only counts.
    """

    def __init__(self, kill_at: int) -> None:
        self.kill_at, self.count = kill_at, 0

    def tick(self) -> None:
        self.count += 1
        if self.count == self.kill_at:
            die()

    def install(self, patch: Any) -> None:
        """``patch(obj, name, value)`` sets an attribute (pytest's monkeypatch.setattr, or setattr)."""
        import cxrloc.data.prepare_worker as worker

        for obj, name in ((worker, "read_image_resized"), (os, "fsync"), (os, "replace")):
            real = getattr(obj, name)

            def wrapped(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                self.tick()
                return _real(*args, **kwargs)

            patch(obj, name, wrapped)


def prepare_main(data: str, out: str, kill_at: str, workers: str, chunk: str) -> None:
    from cxrloc.data.prepare import prepare_cache

    KillSwitch(int(kill_at)).install(setattr)
    prepare_cache(data, out, size=64, workers=int(workers), chunk_size=int(chunk), progress=False)


def train_main(cache: str, out: str, mode: str, arg: str) -> None:
    import torch
    from fault_tools import FAST_TRAIN
    from lightning.pytorch.callbacks import Callback

    import cxrloc.model.checkpoint as checkpoint
    from cxrloc.config import load_config
    from cxrloc.fileio import atomic_open
    from cxrloc.train import train

    torch.set_num_threads(1)
    callbacks = []
    if mode == "batch":  # SIGKILL after training batch ARG of the second epoch (mid-epoch)
        class KillMidEpoch(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
                if trainer.current_epoch == 1 and batch_idx == int(arg):
                    die()

        callbacks.append(KillMidEpoch())
    elif mode == "checkpoint-write":  # SIGKILL half-way through writing last.pt of epoch ARG
        real_write = checkpoint.atomic_write_bytes

        def write(path: Any, data: bytes) -> None:
            if Path(path).name == "last.pt" and torch.load(_buffer(data), weights_only=True)["epoch"] == int(arg):
                with atomic_open(path) as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    die()
            real_write(path, data)

        checkpoint.atomic_write_bytes = write
    else:
        raise SystemExit(f"unknown mode {mode}")
    train(load_config("dlrv", list(FAST_TRAIN)), cache, out, progress="none", callbacks=callbacks)


def _buffer(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


def decode_main(files: list[str]) -> None:
    """Decode each file; print ``START i`` before and ``OK i H W`` / ``ERR i`` after (flushed)."""
    import numpy as np

    from cxrloc.data.io import ImageDecodeError, image_size, read_image

    for i, name in enumerate(files):
        print(f"START {i}", flush=True)
        try:
            arr = read_image(name)
        except ImageDecodeError as e:
            if Path(name).name not in str(e):
                print(f"BAD {i} message does not name the file: {e}", flush=True)
                continue
            print(f"ERR {i}", flush=True)
        except BaseException as e:  # noqa: BLE001 - the point: anything else is a finding
            print(f"BAD {i} {type(e).__name__}: {str(e)[:300]!r}", flush=True)
            continue
        else:
            if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 2 and min(arr.shape) >= 1):
                print(f"BAD {i} returned {type(arr).__name__} {getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}",
                      flush=True)
                continue
            print(f"OK {i} {arr.shape[0]} {arr.shape[1]}", flush=True)
        try:
            image_size(name)
        except ImageDecodeError:
            pass
        except BaseException as e:  # noqa: BLE001
            print(f"BAD {i} image_size raised {type(e).__name__}: {str(e)[:300]!r}", flush=True)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "prepare":
        prepare_main(*rest)
    elif command == "train":
        train_main(*rest)
    elif command == "decode":
        decode_main(rest)
    else:
        raise SystemExit(f"unknown command {command!r}")
