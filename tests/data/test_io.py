import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from cxrloc.data.io import (
    ImageDecodeError,
    image_size,
    read_image,
    read_image_resized,
    resize_gray,
    scale_to_uint8,
)


@pytest.fixture
def gray(rng):
    return rng.integers(0, 256, (40, 56), dtype=np.uint8)


def test_8bit_gray_roundtrip_exact(tmp_path, gray):
    Image.fromarray(gray).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (40, 56)
    np.testing.assert_array_equal(out, gray)
    assert image_size(tmp_path / "a.png") == (56, 40)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_colour_modes_become_luminance(tmp_path, rng, mode):
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    im = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        im = Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (20, 30), dtype=np.uint8)]), "RGBA")
    elif mode == "LA":
        im = Image.merge("LA", [Image.fromarray(rgb[..., 0]), Image.fromarray(rgb[..., 1])])
    elif mode == "P":
        im = im.quantize(16)
    im.save(tmp_path / "c.png")
    out = read_image(tmp_path / "c.png")
    if mode == "LA":
        np.testing.assert_array_equal(out, rgb[..., 0])  # alpha ignored
    else:
        ref = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"), dtype=np.float64)
        luma = ref @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
        assert np.abs(out - luma).max() <= 1.0


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(1000, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit content in 16 bits
    Image.fromarray(values).save(tmp_path / "d16.png")
    assert Image.open(tmp_path / "d16.png").mode.startswith("I")
    out = read_image(tmp_path / "d16.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    expected = np.rint((values.astype(float) - 1000) * 255 / 3000)
    assert np.abs(out - expected).max() <= 1
    assert len(np.unique(out)) > 200  # a linear ramp, not a saturated 255 plateau
    assert read_image_resized(tmp_path / "d16.png", 16)[0].shape == (16, 16)


def test_scale_to_uint8_edge_cases():
    np.testing.assert_array_equal(scale_to_uint8(np.full((3, 3), 7.0)), np.zeros((3, 3), np.uint8))
    out = scale_to_uint8(np.array([[0.0, np.nan], [np.inf, 2.0]]))
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[1, 1] == 255


def test_jpeg(tmp_path, rng):
    y, x = np.mgrid[0:600, 0:500]
    img = ((x + y) % 256).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "j.jpg", quality=95)
    full = read_image(tmp_path / "j.jpg")
    assert full.shape == (600, 500) and np.abs(full.astype(int) - img).mean() < 3
    small, size = read_image_resized(tmp_path / "j.jpg", 64)  # reduced-scale JPEG decoding (draft)
    assert size == (500, 600) and small.shape == (64, 64)
    ref = resize_gray(full, 64)
    assert np.abs(small.astype(int) - ref).mean() < 4


def test_resize_is_antialiased(tmp_path):
    checker = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)  # 1-pixel checkerboard
    Image.fromarray(checker).save(tmp_path / "k.png")
    small, size = read_image_resized(tmp_path / "k.png", 64)
    assert size == (256, 256) and small.shape == (64, 64)
    assert abs(small.astype(float).mean() - 127.5) < 1.0 and small.std() < 2.0  # no aliasing pattern survives
    with pytest.raises(ValueError, match="size must be"):
        read_image_resized(tmp_path / "k.png", 0)


def test_non_square_resized_whole(tmp_path):
    img = np.zeros((100, 200), np.uint8)
    img[:, 100:] = 200  # right half bright
    Image.fromarray(img).save(tmp_path / "w.png")
    small, size = read_image_resized(tmp_path / "w.png", 32)
    assert size == (200, 100) and small.shape == (32, 32)
    assert small[:, :15].max() < 5 and small[:, 17:].min() > 195  # whole image squeezed, no crop


def test_corrupt_truncated_and_non_images_name_the_file(tmp_path, gray):
    Image.fromarray(gray).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2 : len(data) // 2 + 50] = bytes(50)
    (tmp_path / "corrupt.png").write_bytes(bytes(flipped))
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, what in [("trunc.png", "corrupt or truncated"), ("corrupt.png", "corrupt or truncated"), ("text.png", "not a readable image"), ("empty.png", "not a readable image")]:
        with pytest.raises(ImageDecodeError, match=rf"{name}: {what}"):
            read_image(tmp_path / name)
        with pytest.raises(ImageDecodeError, match=name):
            read_image_resized(tmp_path / name, 16)
    with pytest.raises(ImageDecodeError, match="missing.png: cannot open"):
        read_image(tmp_path / "missing.png")


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (the pixel data is a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(10_000, 9_000))  # 8 bytes of pixel data, 90 MP claimed
    with pytest.raises(ImageDecodeError, match=r"bomb.png: refused, header claims 10000x9000 = 90,000,000 pixels"):
        read_image(tmp_path / "bomb.png")
    (tmp_path / "huge.png").write_bytes(_png_claiming(100_000, 100_000))  # beyond Pillow's own hard limit too
    with pytest.raises(ImageDecodeError, match=r"huge.png: refused, header claims more pixels than the limit"):
        read_image_resized(tmp_path / "huge.png", 64)
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ImageDecodeError, match="limit of 5,000"):
        read_image(tmp_path / "small.png", max_pixels=5_000)
    assert read_image(tmp_path / "small.png", max_pixels=10_000).shape == (100, 100)


# --------------------------------------------------------------------------- DICOM


EXPLICIT_LE, JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80"


def write_dicom(path, pixels, photometric="MONOCHROME2", slope=None, intercept=None, center=None, width=None,
                function=None, transfer_syntax=EXPLICIT_LE, pixel_data=True, bits_stored=12):
    pytest.importorskip("pydicom")  # the `dicom` extra (installed in CI); only the DICOM tests need it
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if function is not None:
        ds.VOILUTFunction = function
    if pixel_data:
        raw = pixels.astype("<u2").tobytes()
        ds.PixelData = encapsulate([raw]) if transfer_syntax != EXPLICIT_LE else raw
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def ramp():
    return np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (32, 1))


def test_dicom_monochrome1_is_inverted(tmp_path, ramp):
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", ramp, "MONOCHROME2"))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", ramp, "MONOCHROME1"))
    assert m2.shape == (32, 64) and m2[0, 0] == 0 and m2[0, -1] == 255  # min-max when no window
    np.testing.assert_array_equal(m1, 255 - m2)
    assert image_size(tmp_path / "m1.dcm") == (64, 32)


def test_dicom_rescale_and_window(tmp_path, ramp):
    out = read_image(write_dicom(tmp_path / "w.dcm", ramp, slope=2, intercept=-1000, center=3000, width=2001))
    hu = ramp.astype(float) * 2 - 1000
    expected = np.clip(((hu - (3000 - 0.5)) / 2000 + 0.5), 0, 1) * 255  # PS3.3 C.11.2.1.2.1, LINEAR
    assert np.abs(out - np.rint(expected)).max() <= 1
    assert (out == 0).any() and (out == 255).any()
    sig = read_image(write_dicom(tmp_path / "s.dcm", ramp, center=2000, width=1000, function="SIGMOID"))
    expected = 255 / (1 + np.exp(-4 * (ramp.astype(float) - 2000) / 1000))
    assert np.abs(sig - np.rint(expected)).max() <= 1


def test_dicom_without_pixels_or_with_unsupported_syntax(tmp_path, ramp):
    with pytest.raises(ImageDecodeError, match="nopix.dcm: DICOM file has no pixel data"):
        read_image(write_dicom(tmp_path / "nopix.dcm", ramp, pixel_data=False))
    path = write_dicom(tmp_path / "jls.dcm", ramp, transfer_syntax=JPEG_LS_LOSSLESS)
    with pytest.raises(ImageDecodeError, match=r"jls.dcm: cannot decode DICOM pixel data, transfer syntax JPEG-LS Lossless"):
        read_image(path)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 10)
    with pytest.raises(ImageDecodeError, match="junk.dcm"):
        read_image(tmp_path / "junk.dcm")


def test_dicom_found_by_magic_and_bomb_checked(tmp_path, ramp):
    path = write_dicom(tmp_path / "noext", ramp)  # no extension: recognised by the DICM preamble
    assert read_image(path).shape == (32, 64)
    with pytest.raises(ImageDecodeError, match="noext: refused"):
        read_image(path, max_pixels=100)
    small, size = read_image_resized(path, 16)
    assert small.shape == (16, 16) and size == (64, 32)


def test_dicom_without_pydicom_says_how_to_install(tmp_path, ramp, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", ramp)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(ImageDecodeError, match=r"x.dcm: a DICOM file, but pydicom is not installed \(pip install 'cxrloc\[dicom\]'\)"):
        read_image(path)
