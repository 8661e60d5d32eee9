"""Decode chest X-ray files (PNG, JPEG, DICOM, ...) to 8-bit grayscale arrays.

Every reader returns a ``(H, W) uint8`` array (or a resized ``(S, S)`` one) and
raises :class:`ImageDecodeError` naming the file for anything it cannot read:
a corrupt or truncated file, an unknown format, a DICOM without pixel data or
with an unsupported transfer syntax, or an image whose header claims more than
``max_pixels`` pixels (refused *before* the pixel data is decoded, so a
decompression bomb costs nothing) or a side shorter than :data:`MIN_SIDE`.

Images that decode but whose intensities look wrong get a logged warning naming
the file (they are still used): nearly constant images (:func:`warn_if_flat`),
16/32-bit integer images whose values fit in 0..255, and CMYK/LAB/HSV colour images.

Conversions (METHOD.md, data protocol: "convert to 8-bit grayscale on load"):

- 8-bit ``L`` as is; ``1``/``P``/``LA``/``RGB``/``RGBA``/``CMYK`` to luminance
  (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B, alpha ignored).
- 16-bit (``I;16*``), 32-bit ``I`` and float ``F``: linearly scaled from the
  image's own [min, max] to [0, 255] (ours: never clipped at 255; a constant
  image becomes all zeros).
- DICOM (``pip install cxrloc[dicom]``): modality LUT / rescale slope and
  intercept, then the VOI transform (window centre/width with the LINEAR,
  LINEAR_EXACT or SIGMOID function of PS3.3 C.11.2.1.2, else a VOI LUT
  sequence, else the image's own min-max), and MONOCHROME1 inverted so that
  bone is bright as in MONOCHROME2.

Resizing to the cache size uses Pillow's Lanczos filter with ``reducing_gap=2``
(an exact box reduction by an integer factor first, then Lanczos), which is
antialiased and about twice as fast as a plain Lanczos resize on 1024 -> 256.
JPEG files are decoded at a reduced scale (``Image.draft``) when much larger
than the target.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

#: Refuse images with more pixels than this (8192 x 8192), checked on the header before decoding.
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Refuse images with a side shorter than this (a 1 x 1 "image" is not a radiograph), checked on the header.
MIN_SIDE = 8
#: Warn when 98% of the 8-bit pixels lie within fewer grey levels than this (nearly constant image).
MIN_GREY_SPREAD = 16
#: File name endings that are treated as images when scanning a dataset folder.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom")
#: Default resampling filter for downscaling (antialiased).
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 2.0

_EIGHT_BIT_COLOUR = {"1", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX"}


class ImageDecodeError(ValueError):
    """A file that cannot be decoded as an image; the message starts with the file's path."""


# --------------------------------------------------------------------------- public API


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to grayscale.

    Args:
        path: a PNG, JPEG, TIFF, BMP or DICOM file.
        max_pixels: refuse images whose header claims more pixels than this.

    Returns:
        (H, W) uint8 array in original resolution.

    Raises:
        ImageDecodeError: the file is unreadable, corrupt, truncated, too large, or not an image.
    """
    image, _ = _decode(Path(path), max_pixels, draft_size=None)
    out = image if isinstance(image, np.ndarray) else np.asarray(image, dtype=np.uint8).copy()
    warn_if_flat(path, out)
    return out


def read_image_resized(
    path: str | Path,
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file and resize the whole image (no crop) to ``size x size``.

    Args:
        path: an image file (see :func:`read_image`).
        size: side S of the output.
        max_pixels: refuse images whose header claims more pixels than this.

    Returns:
        ``(image, (width, height))``: image (S, S) uint8 and the original size in pixels.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    path = Path(path)
    image, orig_size = _decode(path, max_pixels, draft_size=size)
    out = resize_gray(image, size)
    warn_if_flat(path, out)
    return out, orig_size


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header only (no pixel decoding)."""
    path = Path(path)
    if _is_dicom(path):
        ds = _dcmread(path, stop_before_pixels=True)
        try:
            return int(ds.Columns), int(ds.Rows)
        except (AttributeError, TypeError, ValueError) as e:
            raise ImageDecodeError(f"{path}: DICOM header lacks valid Rows/Columns ({_describe(e)})") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size
    except Exception as e:  # noqa: BLE001 - any parser failure means "not a readable image"
        raise ImageDecodeError(f"{path}: not a readable image ({_describe(e)})") from e


def resize_gray(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """Antialiased resize of a grayscale image to a writable (size, size) uint8 array (Lanczos, reducing_gap=2)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if im.size != (size, size):
        im = im.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
    return np.array(im, dtype=np.uint8)  # a copy: torch.from_numpy warns on read-only arrays


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linearly map an array's own [min, max] to [0, 255] uint8 (a constant array gives zeros).

    Used for 16-bit / 32-bit / float images; never clips at 255.
    """
    values = np.asarray(values)
    finite = np.isfinite(values) if values.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)) if finite.any() else 0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- decoding


def _decode(path: Path, max_pixels: int, draft_size: int | None) -> tuple[Image.Image | np.ndarray, tuple[int, int]]:
    """Decode to an 8-bit grayscale PIL image (fast path) or uint8 array; also the original (w, h)."""
    if _is_dicom(path):
        array = _read_dicom(path, max_pixels)
        return array, (array.shape[1], array.shape[0])
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; Pillow reads lazily from it
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot open ({_describe(e)})") from e
    with f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f)
        except Image.DecompressionBombError as e:
            raise ImageDecodeError(
                f"{path}: refused, header claims more pixels than the limit of {max_pixels:,} "
                f"(possible decompression bomb; {e})"
            ) from e
        except Exception as e:  # noqa: BLE001
            raise ImageDecodeError(f"{path}: not a readable image ({_describe(e)})") from e
        width, height = im.size
        _check_pixels(path, width, height, max_pixels)
        try:
            if draft_size is not None and im.format == "JPEG" and min(width, height) >= 2 * draft_size:
                im.draft("L", (draft_size, draft_size))
            im.load()
            return _to_gray(im, path), (width, height)
        except ImageDecodeError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated data, bad CRC, zlib errors, ...
            raise ImageDecodeError(f"{path}: corrupt or truncated image data ({_describe(e)})") from e


def _to_gray(im: Image.Image, path: Path) -> Image.Image | np.ndarray:
    mode = im.mode
    if mode == "L":
        return im
    if mode in _EIGHT_BIT_COLOUR:
        return im.convert("L") if mode not in {"PA"} else im.convert("RGBA").convert("L")
    if mode.startswith("I;16") or mode in {"I", "F"}:
        values = np.asarray(im)
        if mode != "F" and values.size and 0 <= values.min() and values.max() <= 255:
            log.warning("%s: intensity range looks wrong: integer image (mode %s) whose values span only %d..%d (an "
                        "8-bit image stored as 16-bit?); scaled by its own min..max", path, mode, values.min(), values.max())
        return scale_to_uint8(values)
    if mode in {"CMYK", "YCbCr", "LAB", "HSV"}:
        if mode != "YCbCr":
            log.warning("%s: %s colour image (unusual for a radiograph); converted to grayscale luminance", path, mode)
        return im.convert("RGB").convert("L")
    raise ImageDecodeError(f"{path}: unsupported image mode {mode!r}")


def warn_if_flat(path: str | Path, gray: np.ndarray) -> str | None:
    """Log (and return) a warning naming ``path`` when a decoded (H, W) uint8 image is nearly constant.

    Nearly constant: 98% of the pixels (1st to 99th percentile) lie within fewer than
    :data:`MIN_GREY_SPREAD` grey levels, e.g. a blank frame, a wrong window, or a
    16-bit image saturated to one value; the model would see the same input for all of them.
    """
    counts = np.bincount(np.asarray(gray, dtype=np.uint8).ravel(), minlength=256)
    total = int(counts.sum())
    if total == 0:
        return None
    cdf = np.cumsum(counts)
    lo, hi = int(np.searchsorted(cdf, 0.01 * total)), int(np.searchsorted(cdf, 0.99 * total))
    if hi - lo + 1 >= MIN_GREY_SPREAD:
        return None
    message = (f"{path}: intensity range looks wrong: nearly constant image (98% of pixels within grey levels "
               f"{lo}..{hi}); check the file, its window or its bit depth")
    log.warning(message)
    return message


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{path}: header claims an empty image ({width}x{height})")
    if min(width, height) < MIN_SIDE:
        raise ImageDecodeError(f"{path}: refused, {width}x{height} pixels is too small to be a radiograph "
                               f"(at least {MIN_SIDE} pixels per side)")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{path}: refused, header claims {width}x{height} = {width * height:,} pixels, more than the "
            f"limit of {max_pixels:,} (possible decompression bomb; raise max_pixels if the file is genuine)"
        )


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------- DICOM


def _dcmread(path: Path, stop_before_pixels: bool = False) -> Any:
    try:
        import pydicom
    except ImportError as e:
        raise ImageDecodeError(f"{path}: a DICOM file, but pydicom is not installed (pip install 'cxrloc[dicom]')") from e
    try:
        return pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(f"{path}: not a readable DICOM file ({_describe(e)})") from e


def _read_dicom(path: Path, max_pixels: int) -> np.ndarray:
    """DICOM -> (H, W) uint8: modality LUT, VOI (window / LUT / min-max), MONOCHROME1 inverted."""
    ds = _dcmread(path)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageDecodeError(f"{path}: DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise ImageDecodeError(f"{path}: DICOM header lacks valid Rows/Columns ({_describe(e)})") from e
    _check_pixels(path, cols, rows, max_pixels)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - missing decoder plugin, corrupt fragments, ...
        meta = getattr(ds, "file_meta", None)
        uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
        syntax = f"{uid.name} ({uid})" if uid is not None else "unknown transfer syntax"
        raise ImageDecodeError(f"{path}: cannot decode DICOM pixel data, transfer syntax {syntax} ({_describe(e)})") from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        log.warning("%s: %d frames, using the first", path, frames)
        pixels = pixels[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:  # colour (pydicom returns RGB for YBR by default): ITU-R 601-2 luminance
        luma = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if pixels.dtype == np.uint8:
            return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
        return scale_to_uint8(luma)
    if pixels.ndim != 2:
        raise ImageDecodeError(f"{path}: DICOM pixel array has shape {pixels.shape}, expected (rows, columns)")
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    gray = _apply_voi(values, ds, apply_voi_lut)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _first(value: Any) -> float:
    try:
        return float(value[0]) if not isinstance(value, str | bytes) and hasattr(value, "__len__") else float(value)
    except (TypeError, ValueError, IndexError):
        return float("nan")


def _apply_voi(values: np.ndarray, ds: Any, apply_voi_lut: Any) -> np.ndarray:
    """VOI transform to uint8 (PS3.3 C.11.2.1.2): window centre/width, else VOI LUT, else min-max."""
    center = _first(getattr(ds, "WindowCenter", None)) if "WindowCenter" in ds else float("nan")
    width = _first(getattr(ds, "WindowWidth", None)) if "WindowWidth" in ds else float("nan")
    function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if np.isfinite(center) and np.isfinite(width) and width > 0:
        if function == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        elif function == "LINEAR_EXACT":
            y = (values - center) / width + 0.5
        else:  # LINEAR: width must be >= 1
            w = max(width, 1.0)
            y = (values - (center - 0.5)) / max(w - 1.0, 1e-12) + 0.5
        return np.clip(np.rint(np.clip(y, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    if "VOILUTSequence" in ds:
        mapped = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0)
        return scale_to_uint8(np.asarray(mapped, dtype=np.float64))
    return scale_to_uint8(values)
