import pytest
import yaml

from cxrloc.config import Config, ConfigError, available_configs, load_config


def test_paper_defaults_pinned():
    """Every hyper-parameter of METHOD.md has the paper's value as default."""
    c = Config()
    assert c.model.backbone == "densenet121" and c.model.pretrained is True
    assert c.model.cam_threshold == 0.8
    assert c.model.rv_pooling == "gap" and c.model.normalize_embeddings is False
    assert c.model.output_stride == 32  # DenseNet-121: (B, 1024, 7, 7) at 224
    assert c.loss.margin == 0.5
    assert (c.loss.weight_g, c.loss.weight_rv, c.loss.weight_dl) == (1.0, 1.0, 1.0)
    assert c.loss.use_dl and c.loss.use_rv and not c.loss.aux_on_all
    assert c.mining.positive_mode == "partial" and c.mining.partial_fraction == 0.25
    assert c.mining.num_positive_candidates == 500 and c.mining.num_negative_candidates == 1000
    assert c.mining.ordering == "phash" and c.mining.curriculum_epochs == 10 and c.mining.hard_fraction == 0.1
    assert c.train.optimizer == "adam" and c.train.lr == 1e-3 and c.train.lr_decay_factor == 0.1
    assert c.train.max_epochs == 30 and c.train.batch_size == 16
    assert not c.train.compile and not c.train.channels_last  # ours, opt-in: eager fp32 as the paper
    assert c.train.compile_mode == "default"  # "reduce-overhead" (CUDA graphs) is opt-in
    assert c.eval.hflip_tta is False  # ours, opt-in: the paper predicts on the image as it is
    assert c.model.global_pooling == "gap" and c.model.lse_r == 10.0  # paper eq. 1: GAP; "lse" is ours
    assert c.data.image_size == 224 and c.data.rotation_degrees == 5.0 and c.data.hflip_prob == 0.5
    assert c.data.scale_range == 0.0 and c.data.translate_fraction == 0.0  # ours, off: the paper has neither
    assert c.data.vflip_prob == 0.0  # ours, off: the paper flips horizontally only
    assert c.data.mean == (0.485, 0.456, 0.406) and c.data.std == (0.229, 0.224, 0.225)
    assert c.eval.iou_thresholds == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7) and c.eval.cv_folds == 10


def test_shipped_variants():
    names = set(available_configs())
    assert {"baseline", "dlrv", "dlrv_no_dl", "dlrv_no_rv", "dlrv_random_mining", "dlrv_exact_positives"} <= names
    assert load_config("baseline").variant == "baseline"
    assert load_config("dlrv").variant == "dlrv"
    assert load_config("dlrv_no_dl").variant == "dlrv_no_dl"
    assert load_config("dlrv_no_rv").variant == "dlrv_no_rv"
    assert load_config("dlrv_random_mining").mining.ordering == "random"
    assert load_config("dlrv_exact_positives").mining.positive_mode == "exact"
    paper_rows = ("baseline", "dlrv", "dlrv_no_dl", "dlrv_no_rv", "dlrv_random_mining", "dlrv_exact_positives")
    assert not any(load_config(name).eval.hflip_tta for name in paper_rows)  # paper inference: no TTA
    assert all(load_config(name).model.global_pooling == "gap" for name in paper_rows)  # eq. 1


def test_overrides_and_roundtrip(tmp_path):
    c = load_config("dlrv", ["train.lr=1e-4", "eval.iou_thresholds=[0.2, 0.4]", "train.devices=2"])
    assert c.train.lr == 1e-4 and c.eval.iou_thresholds == (0.2, 0.4) and c.train.devices == "2"
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(c.to_dict()))
    assert load_config(p) == c
    assert Config.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.marginn=1", "unknown key 'loss.marginn'"),
        ("train.lr=fast", "train.lr = 'fast' has the wrong type"),
        ("train.max_epochs=1.5", "train.max_epochs"),
        ("mining.ordering=smart", "is not one of"),
        ("train.compile_mode=fast", "train.compile_mode = 'fast' is not one of 'default', 'reduce-overhead'"),
        ("eval.hflip_tta=maybe", "eval.hflip_tta"),
        ("model.global_pooling=max", "model.global_pooling = 'max' is not one of 'gap', 'lse'"),
        ("loss.use_dl=1", "loss.use_dl"),
        ("model.cam_threshold=1.5", "cam_threshold must be in (0, 1)"),
        ("nokey", "expected key=value"),
    ],
)
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("dlrv", [override])


def test_bad_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train\.epochs'"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
