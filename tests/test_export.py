"""`cxrloc export`: the ONNX graph reproduces `cxrloc predict` on the real sample; metadata; failures write nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cxrloc import export as export_mod
from cxrloc.cli import main
from cxrloc.config import load_config
from cxrloc.data.io import read_image_resized
from cxrloc.data.transforms import batch_transform
from cxrloc.evaluate.boxes import boxes_from_map
from cxrloc.labels import FINDINGS
from cxrloc.model import build_model, load_model, save_checkpoint
from cxrloc.predict import Predictor, collect_inputs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    cfg = load_config("dlrv", ["model.backbone=densenet-tiny", "model.pretrained=false", "data.image_size=96"])
    save_checkpoint(tmp / "tiny.pt", build_model(cfg.model, use_region=cfg.loss.use_rv), cfg, epoch=3, metric=0.7)
    return tmp / "tiny.pt"


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def _sample_pixels(sample_dir: Path, size: int = 256) -> tuple[np.ndarray, list[tuple[int, int]]]:
    files, _ = collect_inputs([sample_dir])
    decoded = [read_image_resized(f, size) for f in files]
    return np.stack([d[0] for d in decoded]), [d[1] for d in decoded]


def _predictor(checkpoint: Path, hflip_tta: bool) -> Predictor:
    model, cfg, _ = load_model(checkpoint)
    return Predictor(model, cfg, hflip_tta=hflip_tta)


@pytest.mark.parametrize("hflip_tta", [False, True])
def test_onnx_reproduces_predict_on_the_real_sample(sample_dir, checkpoint, exported, tmp_path, hflip_tta):
    folder = exported
    if hflip_tta:
        folder = tmp_path / "tta"
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder), "--hflip-tta"]) == 0
    pixels, sizes = _sample_pixels(sample_dir)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, logits, cams = session.run(None, {"image": pixels[:, None].astype(np.float32)})
    want_probs, want_cams = _predictor(checkpoint, hflip_tta).run_batch(pixels)
    assert probs.shape == (len(pixels), 14) and cams.shape == want_cams.shape
    np.testing.assert_allclose(probs, want_probs, atol=1e-4)
    np.testing.assert_allclose(cams, want_cams, atol=1e-4)
    for i, size in enumerate(sizes):  # the boxes `cxrloc predict` would draw, from the exported maps
        for c in range(len(FINDINGS)):
            got = boxes_from_map(cams[i, c], size, [0.5])[0]
            want = boxes_from_map(want_cams[i, c], size, [0.5])[0]
            np.testing.assert_allclose(got, want, atol=1.0)
    assert json.loads((folder / "model.json").read_text())["hflip_tta"] is hflip_tta


def test_batch_size_is_dynamic(exported):
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 5):
        probs, logits, cams = session.run(None, {"image": export_mod.verification_images(b, 256)})
        assert probs.shape == logits.shape == (b, 14) and cams.shape[:2] == (b, 14)
        assert np.all((0 <= probs) & (probs <= 1)) and cams.min() >= 0 and cams.max() <= 1


def test_metadata_beside_and_inside_the_model(checkpoint, exported):
    meta = json.loads((exported / "model.json").read_text())
    assert meta["schema"] == export_mod.SCHEMA and meta["file"] == "model.onnx"
    assert meta["sha256"] == hashlib.sha256((exported / "model.onnx").read_bytes()).hexdigest()
    assert meta["model"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["model"]["epoch"] == 3 and meta["model"]["image_size"] == 96 and meta["findings"] == list(FINDINGS)
    assert meta["input"]["shape"] == ["batch", 1, 256, 256] and list(meta["outputs"]) == ["probs", "logits", "cam_grid"]
    assert meta["thresholds"] == {"decision": 0.5, "map": 0.5, "box_mode": "max_component", "region_cam_eq8": 0.8}
    diff = meta["verification"]["max_abs_diff"]
    assert set(diff) == {"probs", "logits", "cam_grid"} and max(diff.values()) <= export_mod.TOLERANCE
    proto = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(proto)
    inside = json.loads({p.key: p.value for p in proto.metadata_props}["cxrloc"])
    assert inside == {k: v for k, v in meta.items() if k != "sha256"}


def test_the_graph_preprocesses_exactly_like_batch_transform(checkpoint):
    model, cfg, _ = load_model(checkpoint)
    graph = export_mod.InferenceGraph(model, cfg)
    pixels = torch.from_numpy(export_mod.verification_images(3, 256)).round().to(torch.uint8)
    with torch.inference_mode():
        got = graph(pixels.float())
        want = model.predict(batch_transform(pixels[:, 0], cfg.data, train=False))
    torch.testing.assert_close(got[0], want["probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[2], want["cam_grid"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["baseline", "dlrv_no_rv", "demo"])
def test_other_variants_export_and_match(name, tmp_path):
    """No RV head in use (baseline, no-RV), and the demo's LSE pooling, output stride 8 and box pooling."""
    torch.manual_seed(1)
    sets = ["model.pretrained=false", "data.image_size=64"]
    if name != "demo":
        sets.append("model.backbone=densenet-tiny")
    cfg = load_config(name, sets)
    save_checkpoint(tmp_path / "c.pt", build_model(cfg.model, use_region=cfg.loss.use_rv), cfg, epoch=1, metric=None)
    meta = export_mod.export_onnx(tmp_path / "c.pt", tmp_path / "out", input_size=128)
    assert max(meta["verification"]["max_abs_diff"].values()) <= 1e-4
    assert meta["hflip_tta"] is cfg.eval.hflip_tta and meta["model"]["variant"] == cfg.variant
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = export_mod.verification_images(2, 128, seed=7).round().astype(np.uint8)  # what a decoder gives
    probs, _, cams = session.run(None, {"image": pixels.astype(np.float32)})
    want_probs, want_cams = _predictor(tmp_path / "c.pt", cfg.eval.hflip_tta).run_batch(pixels[:, 0])
    np.testing.assert_allclose(probs, want_probs, atol=1e-4)
    np.testing.assert_allclose(cams, want_cams, atol=1e-4)


def test_predict_with_the_onnx_export_equals_predict_with_the_checkpoint(sample_dir, checkpoint, exported, tmp_path):
    common = [str(sample_dir), "--threshold", "0.3", "--batch-size", "4", "--no-overlays"]
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "torch"), *common]) == 0
    assert main(["predict", "--onnx", str(exported), "--out", str(tmp_path / "onnx"), *common]) == 0
    want = json.loads((tmp_path / "torch" / "predictions.json").read_text())
    got = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert got["model"]["onnx"] == str(exported / "model.onnx") and got["model"]["sha256"] == want["model"]["sha256"]
    assert got["settings"] == want["settings"] and len(got["images"]) == len(want["images"]) == 15
    n_boxes = 0
    for g, w in zip(got["images"], want["images"], strict=True):
        assert g["file"] == w["file"] and (g["width"], g["height"]) == (w["width"], w["height"])
        np.testing.assert_allclose(list(g["probabilities"].values()), list(w["probabilities"].values()), atol=1e-4)
        assert [d["finding"] for d in g["detections"]] == [d["finding"] for d in w["detections"]]
        for dg, dw in zip(g["detections"], w["detections"], strict=True):
            for bg, bw in zip(dg["boxes"], dw["boxes"], strict=True):
                n_boxes += 1
                assert all(abs(bg[k] - bw[k]) <= 1.0 for k in "xywh")
    assert n_boxes > 0
