"""The README's "Python API" examples run as written (only paths and the tiny-model overrides swapped in)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from train_builders import FAST

from cxrloc.labels import FINDINGS

README = Path(__file__).resolve().parents[2] / "README.md"


def api_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def swap(code: str, old: str, new: str) -> str:
    assert old in code, f"the README example no longer contains {old!r}"
    return code.replace(old, new)


def test_the_python_api_examples_run(tiny_cache, tmp_path):
    infer, training, _compare = api_blocks()  # the comparison example runs in tests/evaluate/test_eval_compare.py
    run_dir = tmp_path / "run"
    code = swap(training, '"cache-256"', repr(str(tiny_cache)))
    code = swap(code, '"runs/dlrv_2ep"', repr(str(run_dir)))
    code = swap(code, '["train.max_epochs=2"]', repr([*FAST, "train.max_epochs=2"]))
    trained: dict = {}
    exec(compile(code, "README.md (training example)", "exec"), trained)
    assert trained["result"].status == "completed" and trained["result"].epochs_completed == 2

    scan = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200), dtype=np.uint8)).save(scan)
    code = swap(infer, '"runs/dlrv/checkpoints/best.pt"', repr(str(trained["result"].best_checkpoint)))
    code = swap(code, '"scan.png"', repr(str(scan)))
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a user copying the example sees no warning either
        exec(compile(code, "README.md (inference example)", "exec"), ns)
    assert list(ns["probs"]) == list(FINDINGS) and all(0.0 <= p <= 1.0 for p in ns["probs"].values())
    assert (ns["width"], ns["height"]) == (200, 300)
    assert ns["maps"].shape[0] == 14 and 0.0 <= ns["maps"].min() and ns["maps"].max() <= 1.0
    x0, y0, w, h = (float(v) for v in (ns["x0"], ns["y0"], ns["w"], ns["h"]))
    assert 0 <= x0 and 0 <= y0 and w >= 1 and h >= 1 and x0 + w <= 200 and y0 + h <= 300
