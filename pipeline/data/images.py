"""Image bytes for shards: validate, normalise to RGB, keep original bytes when they are fine."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}


class BadImage(Exception):
    """The file cannot be decoded as an image (truncated, not an image, ...)."""


@dataclass
class EncodedImage:
    data: bytes
    ext: str            # "jpg" or "png": the WebDataset entry name
    width: int          # original size, before any resize
    height: int
    converted: str      # "" when the original bytes were kept, else what was done


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode(raw: bytes, jpeg_quality: int = 95, max_side: int | None = None) -> EncodedImage:
    """Decode ``raw`` fully (catching truncation) and return shard-ready bytes.

    RGB JPEG/PNG within ``max_side`` keep their bytes. Anything else is converted to RGB: JPEGs
    (CMYK, greyscale, or resized) are re-encoded as JPEG at ``jpeg_quality``, everything else as
    PNG, so no file is rejected for its mode or for a misleading extension (the format is
    detected from the content). ``max_side`` caps the longer side (aspect kept, Lanczos filter).
    """
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt, mode = im.format, im.mode
            im.load()
            rgb = im.convert("RGB") if mode != "RGB" else im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from None
    w, h = rgb.size
    notes = [] if mode == "RGB" else [f"{fmt}/{mode}->RGB"]
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        notes.append(f"resized {w}x{h}->{rgb.width}x{rgb.height}")
    if not notes and fmt in KEEP_FORMATS:
        return EncodedImage(raw, KEEP_FORMATS[fmt], w, h, "")
    buf = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(buf, format="JPEG", quality=jpeg_quality)
        return EncodedImage(buf.getvalue(), "jpg", w, h, "; ".join(notes + ["JPEG"]))
    return EncodedImage(png_bytes(rgb), "png", w, h, "; ".join(notes + [f"{fmt}->PNG"]))
