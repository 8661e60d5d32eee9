"""Typed configuration: dataclasses with the paper's values as defaults, YAML load/merge, CLI overrides.

Every equation constant and hyper-parameter of the method (docs: METHOD.md) has a
field here; the default is the paper's value, or ours where the paper is silent
(said in the field's comment). A YAML file overrides any subset of fields;
``--set section.field=value`` overrides on top. An unknown key or a value of the
wrong type is a :class:`ConfigError` that names the key and where it came from.

Example:
    >>> cfg = load_config("dlrv", overrides=["train.max_epochs=5"])
    >>> cfg.loss.margin
    0.5
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass
class DataConfig:
    """Input pipeline (METHOD.md, data protocol)."""

    image_size: int = 224  # paper: whole image resized 1024 -> 224, no crop
    rotation_degrees: float = 5.0  # paper: random rotation within +-5 degrees
    hflip_prob: float = 0.5  # paper: horizontal flip
    scale_range: float = 0.0  # ours (paper: none): random zoom by a factor in [1 - s, 1 + s]
    translate_fraction: float = 0.0  # ours (paper: none): random shift by up to this fraction of the side
    vflip_prob: float = 0.0  # ours (paper: none): vertical flip (cancels learned up/down CAM offsets)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet
    num_workers: int = 2  # DataLoader workers


@dataclass
class ModelConfig:
    """Embedding network and the two classifiers (eq. 1, 6-8, 10-11)."""

    backbone: Literal["densenet121", "densenet-tiny", "densenet-small"] = "densenet121"
    pretrained: bool = True  # ImageNet init when weights are available (falls back with a warning)
    weights_path: str | None = None  # local torchvision DenseNet-121 state_dict
    output_stride: Literal[32, 16, 8] = 32  # paper: DenseNet-121 stride 32 (7x7 at 224); ours: 16 or 8 for small demo inputs
    cam_threshold: float = 0.8  # paper: threshold on the normalised attentive map
    rv_pooling: Literal["gap", "box"] = "gap"  # paper-literal GAP over the masked map; "box": mean over box cells
    normalize_embeddings: bool = False  # ours: raw 1024-d embeddings (option: L2-normalise)
    # global logits (eq. 1): "gap" = W_G . GAP(g) (paper); "lse" (ours) = log-sum-exp over the cells of
    # each class map M_c (eq. 6), (1/r) log mean exp(r M_c) + b (LSE pooling as in Wang et al. 2017)
    global_pooling: Literal["gap", "lse"] = "gap"
    lse_r: float = 10.0  # sharpness r of "lse" (r -> 0: GAP, r -> inf: max)


@dataclass
class LossConfig:
    """L = w_G L_G + w_RV L_RV + w_DL L_DL (eq. 9; paper: equal weights)."""

    use_dl: bool = True  # triplet distance learning (eq. 4-5); off for "w/o DL" and the baseline
    use_rv: bool = True  # region verification (eq. 6-8); off for "w/o RV" and the baseline
    margin: float = 0.5  # paper: triplet margin m
    weight_g: float = 1.0
    weight_rv: float = 1.0
    weight_dl: float = 1.0
    aux_on_all: bool = False  # paper: L_G and L_RV on anchors only; True: also on positives and negatives


@dataclass
class MiningConfig:
    """Triplets and hard-example mining (section 3.2)."""

    positive_mode: Literal["exact", "partial"] = "partial"  # paper's main model: partial
    partial_fraction: float = 0.25  # paper: 25% of positive candidates are partial matches
    num_positive_candidates: int = 500  # paper: up to 500 random positives per anchor
    num_negative_candidates: int = 1000  # paper: 1000 random negatives per anchor
    ordering: Literal["phash", "random"] = "phash"  # "random" = ablation without pHash ordering
    curriculum_epochs: int = 10  # paper: hardest examples after 10 epochs
    hard_fraction: float = 0.1  # ours: window width; from epoch 10 draw from the hardest 10%


@dataclass
class TrainConfig:
    """Optimisation (section 4, implementation details) and the training engine."""

    optimizer: Literal["adam"] = "adam"  # paper: Adam
    lr: float = 1e-3  # paper
    lr_decay_epochs: int = 10  # paper: "divided by 10 after E epochs", E tuned on validation; ours: 10
    lr_decay_factor: float = 0.1  # paper: divided by 10
    weight_decay: float = 0.0
    max_epochs: int = 30  # paper: at most 30 epochs
    batch_size: int = 16  # ours (paper silent): 16 triplets = 48 images through the backbone
    seed: int = 0
    # Lightning precision; "auto" (ours): bf16-mixed where the CPU runs bfloat16 natively (AVX512-BF16, AMX,
    # ARM BF16) or the GPU supports it, else float32 on the CPU / float16 on older GPUs (cxrloc.hardware)
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "auto"] = "32-true"
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", an int as string, or a list like "0,1"
    strategy: str = "auto"  # "ddp" for several GPUs / nodes
    num_nodes: int = 1
    channels_last: bool = False
    compile: bool = False  # ours: torch.compile the backbone (fused kernels; fewer launches on a GPU)
    # torch.compile mode; "reduce-overhead" adds CUDA graphs (H200: 3.1x the eager DLRV step, README)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss: stop the run, or skip the batch and count it
    limit_train_batches: float = 1.0  # fraction (<=1) or number (>1) of batches per epoch; 1.0 = all
    log_every_n_steps: int = 50


@dataclass
class EvalConfig:
    """Evaluation protocol (Tables 1-3)."""

    iou_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # paper, Table 2
    box_mode: Literal["max_component", "all", "components"] = "max_component"  # ours; "all" is paper-literal
    map_threshold: float = 0.5  # fixed CAM threshold reported beside the cross-validated one
    threshold_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # searched by CV
    cv_folds: int = 10  # paper: 10-fold cross-validation over the box images
    bootstrap: int = 1000  # patient-level bootstrap resamples for 95% CIs
    hflip_tta: bool = False  # ours: also predict the mirrored image and average scores and maps (evaluate, predict)
    seed: int = 0


@dataclass
class Config:
    """The whole configuration of a run; one YAML file per paper variant under ``configs/``."""

    name: str = "dlrv"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples), safe for YAML, JSON and ``weights_only`` checkpoints."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Config:
        """Build and validate a config from a (possibly partial) nested dict."""
        cfg = cls()
        _merge(cfg, data, source, prefix="")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check value ranges; raises :class:`ConfigError` naming the field."""
        checks = [
            (0 < self.model.cam_threshold < 1, "model.cam_threshold must be in (0, 1)"),
            (self.loss.margin >= 0, "loss.margin must be >= 0"),
            (0 <= self.mining.partial_fraction <= 1, "mining.partial_fraction must be in [0, 1]"),
            (0 < self.mining.hard_fraction <= 1, "mining.hard_fraction must be in (0, 1]"),
            (self.mining.num_positive_candidates >= 1, "mining.num_positive_candidates must be >= 1"),
            (self.mining.num_negative_candidates >= 1, "mining.num_negative_candidates must be >= 1"),
            (self.mining.curriculum_epochs >= 0, "mining.curriculum_epochs must be >= 0"),
            (self.train.lr > 0, "train.lr must be > 0"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.max_epochs >= 1, "train.max_epochs must be >= 1"),
            (self.data.image_size >= 32, "data.image_size must be >= 32"),
            (0 <= self.data.hflip_prob <= 1, "data.hflip_prob must be in [0, 1]"),
            (0 <= self.data.scale_range < 1, "data.scale_range must be in [0, 1)"),
            (0 <= self.data.translate_fraction <= 0.5, "data.translate_fraction must be in [0, 0.5]"),
            (0 <= self.data.vflip_prob <= 1, "data.vflip_prob must be in [0, 1]"),
            (self.eval.cv_folds >= 2, "eval.cv_folds must be >= 2"),
            (0 < self.eval.map_threshold < 1, "eval.map_threshold must be in (0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"config {self.name!r}: {msg}")

    @property
    def variant(self) -> str:
        """Which row of the paper this config trains: baseline, dlrv, dlrv_no_dl or dlrv_no_rv."""
        if not self.loss.use_dl and not self.loss.use_rv:
            return "baseline"
        if not self.loss.use_dl:
            return "dlrv_no_dl"
        if not self.loss.use_rv:
            return "dlrv_no_rv"
        return "dlrv"


def available_configs() -> list[str]:
    """Names of the configs shipped with the package (``configs/*.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A shipped config name (``"dlrv"``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"} and p.exists():
        return p
    shipped = CONFIG_DIR / f"{p.stem}.yaml"
    if p.suffix in {"", ".yaml", ".yml"} and shipped.exists() and not p.exists():
        return shipped
    raise ConfigError(f"config {str(name_or_path)!r} not found (not a file; shipped configs: {', '.join(available_configs())})")


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``None``) and apply ``key=value`` overrides.

    Args:
        name_or_path: shipped config name (``"dlrv"``), YAML path, or None for defaults.
        overrides: items like ``"train.lr=1e-4"``; values are parsed as YAML scalars.
    """
    cfg = Config()
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
        _merge(cfg, data, str(path), prefix="")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not a YAML scalar: {e}") from e
        nested: dict[str, Any] = {}
        cur = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        _merge(cfg, nested, f"override {item!r}", prefix="")
    cfg.validate()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from cxrloc.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- internals


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _merge(target: Any, data: dict[str, Any], source: str, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(target))
    known = {f.name for f in fields(target)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {where!r} (known keys here: {', '.join(sorted(known))})"
            )
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, source, prefix=f"{where}.")
        else:
            setattr(target, key, _coerce(value, hints[key], where, source))


def _coerce(value: Any, hint: Any, where: str, source: str) -> Any:
    """Check ``value`` against the type ``hint``; allow int -> float and list -> tuple."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = ConfigError(f"{source}: {where} = {value!r} has the wrong type (expected {_type_name(hint)})")
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a, where, source)
            except ConfigError:
                continue
        raise bad
    if hint is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: {where} = {value!r} is not one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: {where} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where, source) for v, a in zip(value, args, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. devices=2 or precision=32
        raise bad
    raise bad


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))
