"""Training engine: Lightning module, data module, checkpoint callback and ``train()`` (METHOD.md, Training).

Example:
    >>> from cxrloc.config import load_config
    >>> from cxrloc.train import train
    >>> cfg = load_config("demo")
    >>> result = train(cfg, data="cache", out="runs/demo")     # doctest: +SKIP
    >>> result.best_metric, result.best_checkpoint               # doctest: +SKIP
"""

from cxrloc.train.engine import TrainResult, read_summary, train

__all__ = ["TrainResult", "read_summary", "train"]
