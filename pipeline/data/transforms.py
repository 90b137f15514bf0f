"""Decode and crop shard images into fixed-size uint8 arrays (HWC), fast enough for ImageNet.

Crops (``data.augment``):
  ``center``               resize the shorter side to ``resolution`` and take the centre square
                           (the VQ-VAE-2 paper's 256x256 ImageNet crops);
  ``random_resized_crop``  a random box of 35-100% of the area and aspect 3/4..4/3, resized;
                           milder than classification's 8% so samples keep whole objects;
  ``none``                 the image as stored (resized only if it is not ``resolution``²).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image

CROP_AREA = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _center_box(w: int, h: int) -> tuple[int, int, int, int]:
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def _random_box(w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
    for _ in range(10):
        area = w * h * rng.uniform(*CROP_AREA)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return left, top, left + cw, top + ch
    return _center_box(w, h)


def load_crop(raw: bytes, resolution: int, augment: str, hflip: bool,
              rng: random.Random | None = None) -> np.ndarray:
    """JPEG/PNG bytes -> ``resolution``² RGB uint8 array (H, W, 3)."""
    rng = rng or random.Random(0)
    im = Image.open(io.BytesIO(raw))
    if augment == "center" and im.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop still gets >= resolution pixels.
        im.draft("RGB", (resolution, resolution))
    im = im.convert("RGB")
    w, h = im.size
    if augment == "center":
        box = _center_box(w, h)
    elif augment == "random_resized_crop":
        box = _random_box(w, h, rng)
    elif augment == "none":
        box = (0, 0, w, h)
    else:
        raise ValueError(f"data.augment={augment}: choose center, random_resized_crop or none")
    if box != (0, 0, resolution, resolution) or (w, h) != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.BILINEAR, box=box, reducing_gap=2.0)
    if hflip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im)
