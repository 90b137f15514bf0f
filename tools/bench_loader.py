#!/usr/bin/env python
"""Loader throughput: decode-only ceiling, per-core transform speed, and the training stream.

    python tools/bench_loader.py                      # synthetic 256x256 JPEG shards
    python tools/bench_loader.py --image-size 500x375 # ImageNet's typical size
    python tools/bench_loader.py --shards runs/inet/prepare/shards   # your own prepared shards

Prints images/s; nothing is asserted (speed is measured here, not in tests).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_shards(out: Path, size: tuple[int, int], images: int, per_shard: int) -> list[str]:
    """JPEGs with photo-like content (smooth colour fields + texture), quality 90."""
    rng = np.random.default_rng(0)
    import webdataset as wds

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    urls = []
    for s in range(0, images, per_shard):
        path = out / f"train-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(s, min(s + per_shard, images)):
                a, b, c = rng.uniform(0, 6, 3)
                base = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy + a)], -1)
                arr = (127 + 80 * base + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"img{i:06d}", "jpg": buf.getvalue(), "cls": i % 1000})
        urls.append(str(path))
    return urls


def read_all(urls: list[str], limit: int) -> list[bytes]:
    import webdataset as wds

    out = []
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out.append(s.get("jpg") or s.get("png"))
        if len(out) == limit:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, help="a prepare output dir (uses its train split)")
    ap.add_argument("--image-size", default="256x256", help="synthetic image size WxH")
    ap.add_argument("--images", type=int, default=2000, help="synthetic images to generate")
    ap.add_argument("--resolution", type=int, default=256, help="crop size of the training stream")
    ap.add_argument("--augment", default="center", choices=["center", "random_resized_crop", "none"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40, help="batches timed per worker setting")
    args = ap.parse_args()

    import torch

    from pipeline.data.shards import shard_urls
    from pipeline.data.streams import TrainLoader
    from pipeline.data.transforms import load_crop

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    if args.shards:
        urls, what = shard_urls(args.shards, "train"), str(args.shards)
    else:
        w, h = map(int, args.image_size.split("x"))
        urls = synthetic_shards(Path(tmp.name), (w, h), args.images, 250)
        what = f"{args.images} synthetic {w}x{h} JPEGs (q90) in {len(urls)} shards"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}; data: {what}")

    raws = read_all(urls, 1000)
    t = time.perf_counter()
    for raw in raws:
        Image.open(io.BytesIO(raw)).convert("RGB").load()
    decode = len(raws) / (time.perf_counter() - t)
    print(f"decode only (PIL, full size, 1 core):                 {decode:8.0f} img/s")

    import random
    rng = random.Random(0)
    t = time.perf_counter()
    for raw in raws:
        torch.from_numpy(np.stack([load_crop(raw, args.resolution, args.augment, True, rng)]))
    per_core = len(raws) / (time.perf_counter() - t)
    print(f"decode + {args.augment} crop {args.resolution} + flip + tensor (1 core): {per_core:8.0f} img/s")

    for workers in (1, 2):
        loader = TrainLoader(urls, batch_size=args.batch_size, steps=args.batches + 3,
                             resolution=args.resolution, augment=args.augment, hflip=True,
                             num_workers=workers, shuffle_buffer=500)
        it = iter(loader)
        for _ in range(3):  # warm-up: worker start and shuffle-buffer fill
            next(it)
        t = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        rate = args.batches * args.batch_size / (time.perf_counter() - t)
        print(f"training stream, {workers} worker(s), batch {args.batch_size}:          {rate:8.0f} img/s")
        for _ in it:
            pass
    tmp.cleanup()


if __name__ == "__main__":
    main()
