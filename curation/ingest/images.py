"""The one image-opening function of the platform: :func:`open_image`.

Every stage that turns encoded bytes into pixels (ingest validation, the embed stage's
DataLoader workers) goes through :func:`open_image`, so they agree on what an image is:

* **Format allowlist by content.** The format is sniffed from the magic bytes (PNG, JPEG,
  WebP, GIF) and must agree with the member's declared extension (``.jpg``/``.jpeg`` ->
  JPEG, ``.png`` -> PNG incl. APNG, ``.webp`` -> WebP, ``.gif`` -> GIF). Anything else (BMP,
  TIFF, ICO, EPS/PostScript, ...) is ``unsupported_format``; an allowed format under the
  wrong extension is ``format_mismatch``. Pillow is also told to try only the allowed
  decoders (``Image.open(formats=...)``), so EPS is never handed to Ghostscript.
* **Size bounds from the header, before decoding.** ``width * height`` above ``max_pixels``
  is ``decompression_bomb``; ``max(w, h) / min(w, h)`` above ``max_aspect_ratio`` is
  ``extreme_aspect_ratio`` (a 30000x1 image passes any pixel limit but explodes when the
  shorter side is resized to 224).
* **EXIF orientation applied.** A JPEG with an Orientation tag is transposed
  (:func:`PIL.ImageOps.exif_transpose`); the reported width/height are the upright ones.
* **High bit depth converted right.** 16-bit (``I;16*``, ``I``) images are scaled to 8 bits
  (``v * 255 / 65535``, rounded) instead of saturating to white as ``convert("L")`` does.
* **Animation policy: first frame.** Animated GIF/APNG/WebP are accepted; the first frame is
  the image (``OpenedImage.frames`` reports the frame count, the ingest metadata counts them).
* **Reproducible errors.** Failure details never carry object addresses
  (:func:`describe_error`), so the same bytes give the same quarantine rows.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

#: declared extension -> the format the bytes must have
EXT_FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF"}
#: extensions the platform treats as images (tar members ``KEY.<ext>``)
IMAGE_EXTS: tuple[str, ...] = tuple(EXT_FORMATS)
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_ASPECT_RATIO = 20.0

#: reason codes :class:`ImageRejected` carries
REASONS = ("unsupported_format", "format_mismatch", "decompression_bomb", "extreme_aspect_ratio", "corrupt_image")

_ORIENT_SWAPS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageRejected(Exception):
    """Bytes that are not an acceptable image: ``reason`` (one of :data:`REASONS`) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class OpenedImage:
    """A decoded image.

    Attributes:
        image: upright, fully loaded PIL image in an 8-bit mode (``RGB``, ``RGBA``, ``L``,
            ``LA``, ``P``, ...; never ``I;16``/``I``/``F``).
        width, height: upright size in pixels.
        format: lower-case format (``png``, ``jpeg``, ``webp``, ``gif``).
        frames: number of frames (1 for still images; the first frame was taken).
        transposed: whether an EXIF orientation was applied.
    """

    image: Image.Image
    width: int
    height: int
    format: str
    frames: int = 1
    transposed: bool = False


def describe_error(e: BaseException) -> str:
    """``"Type: message"`` without object addresses (``<... at 0x7f...>``), so it is reproducible."""
    msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<object>", str(e))
    msg = re.sub(r"0x[0-9a-fA-F]{6,}", "0x?", msg)
    return f"{type(e).__name__}: {msg}"


def sniff_format(data: bytes) -> str | None:
    """The allowed format the magic bytes announce (``"PNG"``, ``"JPEG"``, ``"WEBP"``, ``"GIF"``), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _describe_magic(data: bytes) -> str:
    head = data[:16]
    known = {
        b"BM": "BMP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"\x00\x00\x01\x00": "ICO",
        b"%!PS": "PostScript/EPS",
        b"\xc5\xd0\xd3\xc6": "EPS (binary)",
        b"%PDF": "PDF",
        b"<svg": "SVG",
        b"<?xml": "XML/SVG",
    }
    for magic, name in known.items():
        if head.startswith(magic):
            return f"{name} ({head[:8]!r})"
    return f"unknown ({head[:8]!r})"


def to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth modes -> 8 bit, scaling the range instead of clipping it.

    ``I;16``/``I;16B``/``I;16L``/``I`` (16-bit PNG greyscale: values 0..65535) -> ``L`` with
    ``round(v * 255 / 65535)``; ``F`` (float in 0..1) -> ``L``. Other modes are returned as they are.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        out = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(out, mode="L")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        out = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(out, mode="L")
    return img


def open_image(
    data: bytes,
    ext: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
    decode: bool = True,
) -> OpenedImage:
    """Open encoded image bytes under the platform's rules (module docstring).

    Args:
        data: the encoded bytes (a tar member).
        ext: the declared extension (``"jpg"``, ``"png"``, ...; case-insensitive, leading
            dot allowed); ``None`` skips the extension check (format still allowlisted).
        max_pixels: largest ``width * height`` accepted (checked from the header).
        max_aspect_ratio: largest ``max(w, h) / min(w, h)`` accepted (from the header).
        decode: ``False`` stops after the header checks (``image`` is then not loaded and
            not transposed; width/height are still the upright ones).

    Returns:
        :class:`OpenedImage`.

    Raises:
        ImageRejected: with a reason of :data:`REASONS` and a reproducible detail.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(
            "unsupported_format", f"content is {_describe_magic(data)}; expected one of {list(ALLOWED_FORMATS)}"
        )
    if ext is not None:
        e = ext.lower().lstrip(".")
        want = EXT_FORMATS.get(e)
        if want is None:
            raise ImageRejected("unsupported_format", f"extension .{e}; expected one of {list(IMAGE_EXTS)}")
        if want != fmt:
            raise ImageRejected("format_mismatch", f"declared .{e} ({want}) but the content is {fmt}")
    saved = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # our own limits below, checked before decoding
            img = Image.open(io.BytesIO(data), formats=[fmt])
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageRejected("corrupt_image", f"invalid size {w}x{h}")
        if w * h > max_pixels:
            raise ImageRejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
        aspect = max(w, h) / min(w, h)
        if aspect > max_aspect_ratio:
            raise ImageRejected(
                "extreme_aspect_ratio", f"{w}x{h}: aspect ratio {aspect:.4g} > max_aspect_ratio {max_aspect_ratio:g}"
            )
        frames = int(getattr(img, "n_frames", 1) or 1)
        orientation = 1
        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is treated as no orientation
            orientation = 1
        uw, uh = (h, w) if orientation in _ORIENT_SWAPS else (w, h)
        if not decode:
            return OpenedImage(img, uw, uh, fmt.lower(), frames, orientation != 1)
        if frames > 1:
            img.seek(0)
        img.load()
        out = img
        if orientation != 1:
            out = ImageOps.exif_transpose(img)
        out = to_8bit(out)
        return OpenedImage(out, out.size[0], out.size[1], fmt.lower(), frames, orientation != 1)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected("decompression_bomb", describe_error(e)) from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad bytes
        raise ImageRejected("corrupt_image", describe_error(e)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
