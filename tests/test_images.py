"""`pipeline.data.images.encode`: what `prepare` writes for each image file, as a viewer shows it."""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import exif_turned_jpeg


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_images_are_written_as_a_viewer_shows_them():
    """PIL decodes pixels as stored: a phone photo came out sideways, a transparent background as the
    colour hidden under it (black here), a 16-bit greyscale PNG white, a 0..1 float TIFF black."""
    from pipeline.data.images import BadImage, encode

    def pixels(raw: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(encode(raw).data))
        assert img.mode == "RGB"
        return np.asarray(img).astype(int)

    red, blue = (220, 20, 20), (20, 20, 220)
    stored = np.zeros((20, 40, 3), np.uint8)   # 40 wide: red left half, blue right half
    stored[:, :20], stored[:, 20:] = red, blue
    turned = encode(exif_turned_jpeg(stored, 6))   # 6: turn 90 degrees clockwise to view
    assert (turned.width, turned.height) == (20, 40) and "EXIF orientation 6 applied" in turned.converted
    upright = pixels(exif_turned_jpeg(stored, 6))
    assert upright.shape == (40, 20, 3)
    assert np.abs(upright[5, 10] - red).max() < 30 and np.abs(upright[34, 10] - blue).max() < 30
    upside_down = pixels(exif_turned_jpeg(stored, 3))  # 3: turn 180 degrees
    assert upside_down.shape == (20, 40, 3) and np.abs(upside_down[10, 5] - blue).max() < 30
    plain = exif_turned_jpeg(stored, 1)
    assert encode(plain).data == plain and encode(plain).converted == ""  # upright: its bytes are kept

    rgba = np.zeros((8, 8, 4), np.uint8)      # left half transparent (black under it), right opaque green
    rgba[:, 4:] = (0, 200, 0, 255)
    got = pixels(_png(Image.fromarray(rgba, "RGBA")))
    assert (got[:, :4] == 255).all() and (got[:, 4:] == (0, 200, 0)).all()
    paletted = Image.new("P", (8, 8), 0)
    paletted.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    paletted.paste(1, (4, 0, 8, 8))
    got = pixels(_png(paletted, transparency=0))
    assert (got[:, :4] == 255).all() and (got[:, 4:] == (0, 200, 0)).all()

    wide = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    raw16 = _png(Image.fromarray(wide))
    assert Image.open(io.BytesIO(raw16)).mode == "I;16"
    got = pixels(raw16)
    assert (got[..., 0] == got[..., 2]).all() and np.abs(got[..., 0] - wide / 257).max() <= 0.5
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)  # float TIFF, 0..1: was all black
    for scale in (1, 255):
        buf = io.BytesIO()
        Image.fromarray(ramp * scale, "F").save(buf, format="TIFF")
        assert Image.open(io.BytesIO(buf.getvalue())).mode == "F"
        got = pixels(buf.getvalue())
        assert (got[..., 0] == got[..., 2]).all() and np.abs(got[..., 0] - ramp * 255).max() <= 0.5
    for pixel, says in ((-0.5, "span [-0.5, 1]"), (np.nan, "NaN")):  # no scale to guess: refused, named
        unknown = ramp.copy()
        unknown[0, 0] = pixel
        buf = io.BytesIO()
        Image.fromarray(unknown, "F").save(buf, format="TIFF")
        with pytest.raises(BadImage, match=re.escape(says)):
            encode(buf.getvalue())
    for fmt in ("BMP", "TIFF", "GIF"):
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, format=fmt)
        written = encode(buf.getvalue())
        assert written.ext == "png" and written.converted.endswith(f"{fmt}->PNG")
        assert np.abs(pixels(buf.getvalue())[10, 5] - red).max() < 30


def _tiff(pixels: np.ndarray, sample_format: int | None = None, orientation: int = 1) -> bytes:
    """A greyscale integer TIFF, 32-bit (int32 pixels) or 16-bit (uint16 pixels). PIL writes only
    signed 32-bit and unsigned 16-bit integers: ``sample_format`` rewrites the file's SampleFormat
    entry (tag 339; 1 unsigned, 2 signed), as a scanner or microscope writing uint32 or int16 does."""
    buf = io.BytesIO()  # 339 given: PIL writes that entry for 16 bits only when asked
    Image.fromarray(pixels).save(buf, format="TIFF", tiffinfo={274: orientation, 339: 1})
    raw = bytearray(buf.getvalue())
    assert raw[:4] == b"II*\x00"
    ifd = int.from_bytes(raw[4:8], "little")
    for entry in range(int.from_bytes(raw[ifd:ifd + 2], "little")):
        at = ifd + 2 + 12 * entry
        if sample_format and int.from_bytes(raw[at:at + 2], "little") == 339:
            raw[at + 8:at + 10] = sample_format.to_bytes(2, "little")
    return bytes(raw)


def _tiff12(pixels: np.ndarray) -> bytes:
    """A 12-bit greyscale TIFF, two pixels packed in three bytes, as some scientific and medical
    cameras write them (PIL writes none): one uncompressed strip, the tags a reader needs."""
    h, w = pixels.shape
    a, b = pixels.astype(np.uint32).reshape(-1, 2).T  # w even: rows pack without padding
    data = np.stack([a >> 4, (a & 0xF) << 4 | b >> 8, b & 0xFF], 1).astype(np.uint8).tobytes()
    tags = {256: w, 257: h, 258: 12, 259: 1, 262: 1, 273: 0, 277: 1, 278: h, 279: len(data)}
    tags[273] = 8 + 2 + 12 * len(tags) + 4  # the strip follows the one IFD
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags.items())  # 4: LONG
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + struct.pack("<I", 0) + data


def test_wide_integer_tiffs_are_scaled_by_their_own_depth():
    """PIL opens 16-bit signed and 32-bit TIFFs in one mode ("I"), 12-bit ones as 16-bit; read as
    16-bit, a 32-bit scan came out white but for its darkest pixels, a 12-bit one near black, and
    PIL hands unsigned values over 2**31 back negative (black). Each depth now fills 0..255 as a
    viewer shows it; negatives are black."""
    from pipeline.data.images import encode

    def grey(raw: bytes, mode: str = "I") -> np.ndarray:
        img = Image.open(io.BytesIO(raw))
        assert img.mode == mode  # "I": 32-bit and signed 16-bit; "I;16": unsigned 16 and 12-bit
        got = np.asarray(Image.open(io.BytesIO(encode(raw).data))).astype(int)  # written as RGB
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
        return got[..., 0]

    ramp = np.linspace(0, 1, 32 * 48).reshape(32, 48)
    signed32 = np.round(ramp * (2**31 - 1)).astype(np.int32)
    assert np.abs(grey(_tiff(signed32)) - ramp * 255).max() <= 0.5
    unsigned32 = np.round(ramp * (2**32 - 1)).astype(np.uint32)
    assert np.abs(grey(_tiff(unsigned32.view(np.int32), sample_format=1)) - ramp * 255).max() <= 0.5
    signed16 = np.round(ramp * 65535 - 32768).astype(np.int32)  # -32768..32767: the lower half black
    got = grey(_tiff(signed16.astype(np.int16).view(np.uint16), sample_format=2))
    assert np.abs(got - np.clip(signed16, 0, None) / 32767 * 255).max() <= 0.5
    turned = _tiff(signed32, orientation=6)  # PIL turns a TIFF upright as it loads: the depth still read
    written = encode(turned)
    assert (written.width, written.height) == (32, 48)
    assert np.abs(grey(turned) - np.rot90(ramp, -1) * 255).max() <= 0.5
    unsigned16 = np.round(ramp * 65535).astype(np.uint16)
    assert np.abs(grey(_tiff(unsigned16), mode="I;16") - ramp * 255).max() <= 0.5
    twelve = np.round(ramp * 4095).astype(np.uint16)  # was 0..16 of 255: near black
    assert np.abs(grey(_tiff12(twelve), mode="I;16") - ramp * 255).max() <= 0.5
    pgm = b"P5\n48 32\n1000\n" + np.round(ramp * 1000).astype(">u2").tobytes()  # PIL scales to 16 bits
    assert np.abs(grey(pgm) - ramp * 255).max() <= 1


def test_a_large_jpeg_shrunk_on_write_is_decoded_small_and_not_refused_as_a_bomb(monkeypatch):
    """With data.max_side a JPEG is decoded at the smallest DCT scale still at least that size, then
    resized: what a full decode and resize gives, within JPEG noise. A photo over PIL's decompression
    bomb limit was skipped although it would be written small; a PNG, decoded whole, still is."""
    from pipeline.data.images import BadImage, encode

    yy, xx = np.mgrid[0:300, 0:400]  # smooth gradients: what resizing keeps
    stored = np.stack([xx * 255 // 400, yy * 255 // 300, (xx + yy) * 255 // 700], -1).astype(np.uint8)
    raw = exif_turned_jpeg(stored, 1)
    small = encode(raw, max_side=100)
    assert (small.width, small.height) == (400, 300) and "resized 400x300->100x75" in small.converted
    full = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB").resize((100, 75), Image.LANCZOS)).astype(int)
    got = np.asarray(Image.open(io.BytesIO(small.data))).astype(int)
    assert got.shape == (75, 100, 3) and np.abs(got - full).mean() < 2.5, np.abs(got - full).mean()
    turned = encode(exif_turned_jpeg(stored, 6), max_side=100)  # upright: 300 wide, 400 high
    assert (turned.width, turned.height) == (300, 400) and Image.open(io.BytesIO(turned.data)).size == (75, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 400x300 is now over twice the limit: a "bomb"
    with pytest.raises(BadImage, match="DecompressionBombError"):
        encode(raw)
    assert encode(raw, max_side=100).data == small.data and Image.MAX_IMAGE_PIXELS == 50_000
    with pytest.raises(BadImage, match="DecompressionBombError"):
        encode(_png(Image.fromarray(stored)), max_side=100)
