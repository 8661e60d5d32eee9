import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cxrloc.config import DataConfig
from cxrloc.data.io import read_image_resized
from cxrloc.data.transforms import (
    SampleTransform,
    augment_params,
    augment_vflip,
    augment_zoom_shift,
    batch_transform,
    eval_transform,
    load_model_input,
    train_transform,
)

CFG = DataConfig()


def test_paper_defaults_are_used():
    assert (CFG.image_size, CFG.rotation_degrees, CFG.hflip_prob) == (224, 5.0, 0.5)
    assert CFG.mean == (0.485, 0.456, 0.406) and CFG.std == (0.229, 0.224, 0.225)


def test_eval_shape_and_normalisation():
    images = torch.full((2, 256, 256), 100, dtype=torch.uint8)
    out = batch_transform(images, CFG)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    for c in range(3):
        expected = (100 / 255 - CFG.mean[c]) / CFG.std[c]
        torch.testing.assert_close(out[:, c], torch.full((2, 224, 224), expected), atol=1e-5, rtol=0)


def _to_unit(out):
    std = torch.tensor(CFG.std).view(1, 3, 1, 1)
    mean = torch.tensor(CFG.mean).view(1, 3, 1, 1)
    return out * std + mean


def test_resize_from_cache_size_is_bilinear_and_large_sources_are_antialiased():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (3, 256, 256), dtype=np.uint8))
    ref = F.interpolate(images[:, None].float() / 255, size=(224, 224), mode="bilinear", antialias=False, align_corners=False)
    torch.testing.assert_close(_to_unit(batch_transform(images, CFG)), ref.expand(-1, 3, -1, -1), atol=1e-5, rtol=0)
    big = torch.from_numpy(rng.integers(0, 256, (2, 1024, 1024), dtype=np.uint8))
    ref = F.interpolate(big[:, None].float() / 255, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    out = _to_unit(batch_transform(big, CFG))
    torch.testing.assert_close(out, ref.expand(-1, 3, -1, -1), atol=1e-5, rtol=0)
    assert out.std() < 0.05  # uniform noise averaged out, no aliasing


def test_one_resampling_from_cache_matches_affine_grid_reference():
    rng = np.random.default_rng(4)
    images = torch.from_numpy(rng.integers(0, 256, (4, 256, 256), dtype=np.uint8))
    angles = torch.tensor([4.5, -2.0, 0.0, -5.0])
    flips = torch.tensor([False, True, True, False])
    out = _to_unit(batch_transform(images, CFG, angles=angles, flips=flips))
    rad = angles * np.pi / 180
    sign = torch.where(flips, -1.0, 1.0)
    theta = torch.zeros(4, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(rad) * sign, -torch.sin(rad)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(rad) * sign, torch.cos(rad)
    grid = F.affine_grid(theta, [4, 1, 224, 224], align_corners=False)
    ref = F.grid_sample(images[:, None].float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(out, ref.expand(-1, 3, -1, -1), atol=1e-4, rtol=0)  # float32 rounding only


def _unnormalise(x):
    return x[:, :1] * CFG.std[0] + CFG.mean[0]


@pytest.mark.parametrize("angle", [4.0, -5.0, 30.0])
def test_rotation_matches_torchvision(angle):
    img = torch.zeros(1, 224, 224, dtype=torch.uint8)
    img[0, 30:80, 120:200] = 255
    ours = _unnormalise(batch_transform(img, CFG, angles=torch.tensor([angle])))
    ref = TF.rotate(img[:, None].float() / 255, angle, interpolation=TF.InterpolationMode.BILINEAR)  # counter-clockwise
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_flip_is_exact_and_composes_with_rotation():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.integers(0, 256, (2, 224, 224), dtype=np.uint8))
    plain = batch_transform(img, CFG)
    flipped = batch_transform(img, CFG, flips=torch.tensor([True, False]))
    torch.testing.assert_close(flipped[0], plain[0].flip(-1))
    torch.testing.assert_close(flipped[1], plain[1])
    both = _unnormalise(batch_transform(img, CFG, angles=torch.tensor([3.0, 3.0]), flips=torch.tensor([True, False])))
    rotated = TF.rotate(img[:, None].float() / 255, 3.0, interpolation=TF.InterpolationMode.BILINEAR)
    torch.testing.assert_close(both[0], rotated[0].flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(both[1], rotated[1], atol=1e-4, rtol=0)


def test_random_params_are_seeded_and_in_range():
    a1, f1 = augment_params(4000, CFG, torch.Generator().manual_seed(0))
    a2, f2 = augment_params(4000, CFG, torch.Generator().manual_seed(0))
    a3, _ = augment_params(4000, CFG, torch.Generator().manual_seed(1))
    assert torch.equal(a1, a2) and torch.equal(f1, f2) and not torch.equal(a1, a3)
    assert a1.abs().max() <= 5.0 and a1.abs().max() > 4.9 and abs(a1.mean()) < 0.2
    assert 0.45 < f1.float().mean() < 0.55
    a, f = augment_params(100, DataConfig(rotation_degrees=0.0, hflip_prob=0.0))
    assert a.abs().max() == 0 and not f.any()


def test_train_batch_is_reproducible_and_per_sample():
    img = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 256, 256), dtype=np.uint8)).expand(8, -1, -1)
    x1 = batch_transform(img, CFG, train=True, generator=torch.Generator().manual_seed(5))
    x2 = batch_transform(img, CFG, train=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x1, x2)
    assert len({tuple(x1[i, 0, 100, 90:95].tolist()) for i in range(8)}) == 8  # each sample its own rotation
    angles, flips = augment_params(8, CFG, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x1, batch_transform(img, CFG, angles=angles, flips=flips))


def test_sample_transform_equals_batch_path():
    img = np.random.default_rng(3).integers(0, 256, (256, 256), dtype=np.uint8)
    out = eval_transform(CFG)(img)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, batch_transform(torch.from_numpy(img)[None], CFG)[0])
    torch.manual_seed(7)
    t = train_transform(CFG)(img)
    torch.manual_seed(7)
    angles, flips = augment_params(1, CFG)
    torch.testing.assert_close(t, batch_transform(torch.from_numpy(img)[None], CFG, angles=angles, flips=flips)[0])
    assert eval_transform(CFG)(np.zeros((1024, 700), np.uint8)).shape == (3, 224, 224)  # any input size
    with pytest.raises(ValueError, match="grayscale"):
        SampleTransform(CFG)(np.zeros((2, 8, 8), np.uint8))


def test_batch_accepts_channel_dim_and_float():
    img = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    small = DataConfig(image_size=32)
    out = batch_transform(img, small)
    torch.testing.assert_close(out, batch_transform(img.float() / 255, small))
    with pytest.raises(ValueError, match=r"\(B, S, S\)"):
        batch_transform(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), small)


def test_load_model_input_matches_the_cache_path(sample_dir):
    path = sample_dir / "images" / "00000001_000.png"
    x, size = load_model_input(path, CFG, cache_size=256)
    assert size == (1024, 1024) and x.shape == (3, 224, 224)
    cached, _ = read_image_resized(path, 256)  # what prepare stores
    torch.testing.assert_close(x, eval_transform(CFG)(cached))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    img = torch.randint(0, 256, (4, 256, 256), dtype=torch.uint8)
    angles, flips = augment_params(4, CFG, torch.Generator().manual_seed(0))
    cpu = batch_transform(img, CFG, angles=angles, flips=flips)
    gpu = batch_transform(img.cuda(), CFG, angles=angles, flips=flips)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
    gen = torch.Generator().manual_seed(1)
    assert batch_transform(img.cuda(), CFG, train=True, generator=gen).shape == (4, 3, 224, 224)


def test_zoom_and_shift_match_affine_grid_reference():
    """Ours (off by default): in = R (F out) / z + s, one resampling with the rotation and the flip."""
    rng = np.random.default_rng(6)
    images = torch.from_numpy(rng.integers(0, 256, (3, 256, 256), dtype=np.uint8))
    angles, flips = torch.tensor([3.0, 0.0, -4.0]), torch.tensor([True, False, False])
    zooms, shifts = torch.tensor([1.2, 0.9, 1.0]), torch.tensor([[0.1, -0.05], [0.0, 0.2], [-0.3, 0.0]])
    out = _to_unit(batch_transform(images, CFG, angles=angles, flips=flips, zooms=zooms, shifts=shifts))
    rad, sign = angles * np.pi / 180, torch.where(flips, -1.0, 1.0)
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(rad) * sign / zooms, -torch.sin(rad) / zooms
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(rad) * sign / zooms, torch.cos(rad) / zooms
    theta[:, :, 2] = shifts
    grid = F.affine_grid(theta, [3, 1, 224, 224], align_corners=False)
    ref = F.grid_sample(images[:, None].float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(out, ref.expand(-1, 3, -1, -1), atol=1e-4, rtol=0)


def test_zoom_shift_is_off_by_default_and_seeded_in_range_when_on():
    assert (CFG.scale_range, CFG.translate_fraction) == (0.0, 0.0)  # paper: rotation and flip only
    assert augment_zoom_shift(8, CFG) == (None, None)  # draws nothing: the paper's random stream is unchanged
    cfg = DataConfig(scale_range=0.1, translate_fraction=0.05)
    z1, s1 = augment_zoom_shift(4000, cfg, torch.Generator().manual_seed(0))
    z2, s2 = augment_zoom_shift(4000, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(z1, z2) and torch.equal(s1, s2)
    assert 0.9 <= z1.min() < 0.91 and 1.09 < z1.max() <= 1.1 and s1.shape == (4000, 2)
    assert 0.099 < s1.abs().max() <= 0.1  # 5% of the side = 0.1 in normalised units (the image spans 2)
    img = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (4, 256, 256), dtype=np.uint8))
    plain = batch_transform(img, DataConfig(), train=True, generator=torch.Generator().manual_seed(3))
    moved = batch_transform(img, cfg, train=True, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(plain, moved)


def test_vertical_flip_is_exact_composes_and_is_off_by_default():
    rng = np.random.default_rng(7)
    img = torch.from_numpy(rng.integers(0, 256, (2, 224, 224), dtype=np.uint8))
    plain = batch_transform(img, CFG)
    flipped = batch_transform(img, CFG, vflips=torch.tensor([True, False]))
    torch.testing.assert_close(flipped[0], plain[0].flip(-2), atol=1e-4, rtol=0)
    torch.testing.assert_close(flipped[1], plain[1], atol=1e-4, rtol=0)
    both = batch_transform(img, CFG, flips=torch.tensor([True, True]), vflips=torch.tensor([True, False]))
    torch.testing.assert_close(both[0], plain[0].flip(-1).flip(-2), atol=1e-4, rtol=0)  # = 180 degrees
    assert augment_vflip(8, CFG) is None  # the paper's configs draw nothing extra
    v = augment_vflip(4000, DataConfig(vflip_prob=0.5), torch.Generator().manual_seed(0))
    assert 0.45 < v.float().mean() < 0.55
