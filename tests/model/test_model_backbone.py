"""Backbones: shapes, strides, local weights, and the offline ImageNet fallback (never downloads)."""

from __future__ import annotations

import logging

import pytest
import torch
from torchvision.models import densenet121

from cxrloc.model import backbone as bb
from cxrloc.model.backbone import BackboneError, create_backbone


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty TORCH_HOME, unreachable network, and a download that fails the test if called."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("CXRLOC_OFFLINE", raising=False)
    monkeypatch.setattr(bb, "_warned", set())
    calls = {"probe": 0, "download": 0}

    def probe(host, port=443, timeout=2.0):
        calls["probe"] += 1
        return False

    def download(url, dst):
        calls["download"] += 1
        raise AssertionError("tests must never download")

    monkeypatch.setattr(bb, "_network_reachable", probe)
    monkeypatch.setattr(bb, "_download_weights", download)
    return calls


@pytest.mark.parametrize(
    ("name", "stride", "channels"), [("densenet-tiny", 32, 64), ("densenet-tiny", 16, 64), ("densenet121", 32, 1024)]
)
def test_feature_map_shape_and_non_negative(name, stride, channels):
    torch.manual_seed(0)
    module, k = create_backbone(name, pretrained=False, output_stride=stride)
    size = 224 if name == "densenet121" else 128
    with torch.no_grad():
        g = module.eval()(torch.randn(1, 3, size, size))
    assert k == channels and g.shape == (1, channels, size // stride, size // stride)
    assert g.min() >= 0  # g = ReLU(features)


def test_densenet121_matches_torchvision_features():
    """Same module as torchvision's densenet121().features followed by ReLU."""
    torch.manual_seed(0)
    module, _ = create_backbone("densenet121", pretrained=False)
    reference = densenet121().eval()
    reference.features.load_state_dict(module.features.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), torch.relu(reference.features(x)))


def test_unknown_name_and_stride_are_errors():
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("resnet50")
    with pytest.raises(BackboneError, match="output_stride"):
        create_backbone("densenet-tiny", output_stride=4)


def test_pretrained_offline_falls_back_with_one_warning(no_network, caplog):
    caplog.set_level(logging.WARNING, logger="cxrloc.model.backbone")
    torch.manual_seed(0)
    a, _ = create_backbone("densenet121", pretrained=True)
    b, _ = create_backbone("densenet121", pretrained=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RANDOM initialisation" in warnings[0].getMessage()
    assert no_network["download"] == 0 and no_network["probe"] >= 1
    assert isinstance(a, bb.DenseNetBackbone) and isinstance(b, bb.DenseNetBackbone)


def test_offline_env_skips_even_the_probe(no_network, monkeypatch, caplog):
    monkeypatch.setenv("CXRLOC_OFFLINE", "1")
    caplog.set_level(logging.WARNING, logger="cxrloc.model.backbone")
    create_backbone("densenet121", pretrained=True)
    assert no_network == {"probe": 0, "download": 0}
    assert "CXRLOC_OFFLINE" in caplog.text


def test_failed_download_falls_back(no_network, monkeypatch, caplog):
    monkeypatch.setattr(bb, "_network_reachable", lambda *a, **k: True)
    caplog.set_level(logging.WARNING, logger="cxrloc.model.backbone")
    create_backbone("densenet121", pretrained=True)
    assert no_network["download"] == 1  # tried, raised, fell back
    assert "download failed" in caplog.text


def classic_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A DenseNet-121 state_dict as torchvision's ImageNet file: 'norm.1'-style keys, no batch counters."""
    torch.manual_seed(seed)
    state = densenet121().state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for part in ("norm1", "norm2", "conv1", "conv2"):
            key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        out[key] = value
    assert any(".norm.1." in k for k in out)
    return out


def test_cached_imagenet_file_is_used_without_network(no_network, tmp_path):
    state = classic_state_dict(seed=5)
    cached = bb.imagenet_weights_file()
    assert str(cached).startswith(str(tmp_path / "torch_home"))  # honours TORCH_HOME
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    module, _ = create_backbone("densenet121", pretrained=True)
    assert no_network == {"probe": 0, "download": 0}
    torch.testing.assert_close(module.features.conv0.weight, state["features.conv0.weight"])
    key = "features.denseblock1.denselayer1.norm.1.weight"
    torch.testing.assert_close(module.features.denseblock1.denselayer1.norm1.weight, state[key])


def test_weights_path_loads_and_errors_name_the_file(tmp_path):
    state = classic_state_dict(seed=7)
    path = tmp_path / "dn121.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    module, _ = create_backbone("densenet121", weights_path=path)
    torch.testing.assert_close(module.features.norm5.running_mean, state["features.norm5.running_mean"])
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("densenet121", weights_path=tmp_path / "missing.pth")
    with pytest.raises(BackboneError, match="do not match"):
        create_backbone("densenet-tiny", weights_path=path)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BackboneError, match="broken.pth: cannot read"):
        create_backbone("densenet121", weights_path=broken)


def test_stride16_keeps_parameter_names():
    a, _ = create_backbone("densenet-tiny", output_stride=16)
    b, _ = create_backbone("densenet-tiny", output_stride=32)
    assert a.state_dict().keys() == b.state_dict().keys()
