"""Image bytes for shards: validate, normalise to RGB, keep original bytes when they are fine."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}
EXIF_ORIENTATION = 0x0112
JPEG_MAGIC = b"\xff\xd8\xff"
# A JPEG shrunk to data.max_side is decoded at 1/2 to 1/8 of its size (DCT scaling, ``draft``): up to
# 64 times PIL's decompression-bomb limit then takes the memory that limit allows (a 300-megapixel
# photo was skipped as a bomb although it would be written at 1024 pixels)
DRAFT_PIXELS = 64
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT = 258, 339  # SampleFormat 1: unsigned, 2: signed integer


class BadImage(Exception):
    """The file cannot be decoded as an image (truncated, not an image, ...)."""


@dataclass
class EncodedImage:
    data: bytes
    ext: str            # "jpg" or "png": the WebDataset entry name
    width: int          # original size, upright, before any resize
    height: int
    converted: str      # "" when the original bytes were kept, else what was done


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _upright(im: Image.Image) -> tuple[Image.Image, str]:
    """Phone and camera JPEGs are often stored sideways with an EXIF tag saying how to turn them;
    the loaders decode pixels as stored, so the turn is applied here, once."""
    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block loses the turn, not the image
        return im, ""
    if orientation not in range(2, 9):
        return im, ""
    return ImageOps.exif_transpose(im), f"EXIF orientation {orientation} applied"


def _grey_rgb(values: np.ndarray) -> Image.Image:
    """Greyscale values already scaled to 0..255 -> the RGB image."""
    return Image.fromarray(np.round(values).astype(np.uint8), "L").convert("RGB")


def _integer_range(im: Image.Image) -> tuple[np.ndarray, float]:
    """Wide greyscale pixels and the value a viewer shows as white. PIL keeps a TIFF's integers as
    stored, in mode "I" or "I;16" whatever their depth: the file's tags say it (BitsPerSample,
    SampleFormat: 32-bit integers were clipped to 16 bits, all but the darkest white; unsigned
    32-bit values over 2**31 come out of PIL negative; 12-bit ones were near black). PNG and PGM/PPM
    over 8 bits reach here scaled by PIL to 16 bits. Signed values below zero show black. (PIL
    turns a TIFF upright itself, keeping its tags: :func:`_upright` never copies one.)"""
    wide = np.asarray(im)
    tags = getattr(im, "tag_v2", None) if im.format == "TIFF" else None
    if tags is None:
        return wide.astype(np.float64), 65535.0
    bits = int(tags.get(TIFF_BITS_PER_SAMPLE, (16,))[0])
    signed = int(tags.get(TIFF_SAMPLE_FORMAT, (1,))[0]) == 2
    if bits == 32 and not signed:
        wide = wide.view(np.uint32)  # PIL's int32, the same bits
    return wide.astype(np.float64), float(2 ** (bits - 1 if signed else bits) - 1)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB as the image looks in a viewer: transparency over white (dropping alpha would show the
    colour hidden under it, often black), 12- to 32-bit greyscale scaled to 8 bits (PIL clips it:
    white; :func:`_integer_range`), float greyscale (TIFF) read as 0..1 or 0..255 by its range (PIL
    clips 0..1 to black), refused when its range is neither."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide, white = _integer_range(im)
        return _grey_rgb(np.clip(wide, 0, white) * (255 / white))
    if im.mode == "F":
        real = np.asarray(im).astype(np.float64)
        if not np.isfinite(real).all():
            raise ValueError("float pixels include NaN or infinity: convert the file to 8 or 16 bits")
        low, high = float(real.min()), float(real.max())
        if low < 0 or high > 255:
            raise ValueError(f"float pixels span [{low:g}, {high:g}], neither 0..1 nor 0..255: "
                             "convert the file to 8 or 16 bits, scaled as it should look")
        scale = 255 if high <= 1 else 1
        return _grey_rgb(real * scale)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


@contextmanager
def _pixel_limit(factor: int) -> Iterator[None]:
    """PIL's decompression-bomb limit times ``factor`` while an image is opened (the check reads the
    module's value as it opens; a prepare worker opens one image at a time)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = before * factor if before and factor > 1 else before
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def encode(raw: bytes, jpeg_quality: int = 95, max_side: int | None = None) -> EncodedImage:
    """Decode ``raw`` fully (catching truncation) and return shard-ready bytes.

    Upright RGB JPEG/PNG within ``max_side`` keep their bytes. Anything else is converted to RGB
    (:func:`_to_rgb`) and turned upright: JPEGs (CMYK, greyscale, turned, or resized) are re-encoded
    as JPEG at ``jpeg_quality``, everything else as PNG, so no file is rejected for its mode or for
    a misleading extension (the format is detected from the content). ``max_side`` caps the longer
    side (aspect kept, Lanczos filter; a JPEG is first decoded at the smallest DCT scale, 1/2 to 1/8,
    still at least that size: several times faster, and far less memory for a large photo).
    """
    drafted = bool(max_side) and raw[:3] == JPEG_MAGIC
    try:
        with _pixel_limit(DRAFT_PIXELS if drafted else 1), Image.open(io.BytesIO(raw)) as im:
            fmt, mode, stored = im.format, im.mode, im.size
            if drafted and max(stored) > max_side:
                im.draft(mode, _fit(stored, max_side))
            im.load()
            turned, turn = _upright(im)
            plain = mode == "RGB" and "transparency" not in im.info
            rgb = turned.copy() if plain else _to_rgb(turned)
            w, h = stored if turned.size == im.size else stored[::-1]  # upright, before any resize
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from None
    notes = ([] if plain else [f"{fmt}/{mode}->RGB"]) + ([turn] if turn else [])
    if max_side and max(w, h) > max_side:
        rgb = rgb.resize(_fit((w, h), max_side), Image.LANCZOS)
        notes.append(f"resized {w}x{h}->{rgb.width}x{rgb.height}")
    if not notes and fmt in KEEP_FORMATS:
        return EncodedImage(raw, KEEP_FORMATS[fmt], w, h, "")
    buf = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(buf, format="JPEG", quality=jpeg_quality)
        return EncodedImage(buf.getvalue(), "jpg", w, h, "; ".join(notes + ["JPEG"]))
    return EncodedImage(png_bytes(rgb), "png", w, h, "; ".join(notes + [f"{fmt}->PNG"]))
