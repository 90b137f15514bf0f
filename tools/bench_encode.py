#!/usr/bin/env python
"""Encode throughput against VQ-VAE training throughput on the same device (images/s).

    python tools/bench_encode.py                         # tiny_digits preset at 32^2
    python tools/bench_encode.py --preset paper_imagenet256 --resolution 256 --batch 32

Encode is measured through the stage's own path (``pipeline.stages.encode.encode_shards``: the
ordered stream decoding JPEGs from real tar shards in loader processes, eval mode, no grad, channels_last on CPU, bf16
autocast on CUDA) and as the model alone. Training is one fp32 AdamW step fed from memory, the
same as ``bench_train.py``'s fp32 line. The issue's target: encode >= 3x training.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench_train import make_model, step_fn, synthetic_shards
from pipeline.models import parameter_count
from pipeline.stages.encode import encode_shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny_digits", help="tiny_digits, paper_imagenet256 or reference")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="training batch")
    ap.add_argument("--encode-batch", type=int, default=256, help="encode batch (configs: encode.batch_size)")
    ap.add_argument("--images", type=int, default=2048, help="images in the synthetic shards")
    ap.add_argument("--shards", type=int, default=4, help="synthetic shards the images are split into")
    ap.add_argument("--workers", type=int, default=2, help="loader processes (configs: encode.workers)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, device {device}; "
          f"torch {torch.__version__}")
    torch.manual_seed(0)
    model = make_model(args.preset).to(device)
    print(f"model: {args.preset} ({parameter_count(model):,} parameters), {args.resolution}^2")

    step = step_fn(model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4), "fp32")
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    for _ in range(3):
        step(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(x)
    sync()
    train = args.steps * args.batch / (time.perf_counter() - t0)
    print(f"  {f'train step (fp32, batch {args.batch})':<40}{train:9.1f} img/s")

    model.eval()
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    xe = torch.rand(args.encode_batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        model.encode(xe.contiguous(memory_format=torch.channels_last))
        sync()
        t0 = time.perf_counter()
        reps = max(1, args.images // args.encode_batch)
        for _ in range(reps):
            model.encode(xe.contiguous(memory_format=torch.channels_last))
        sync()
    alone = reps * args.encode_batch / (time.perf_counter() - t0)
    print(f"  {f'encode, model alone (batch {args.encode_batch})':<40}{alone:9.1f} img/s  {alone / train:6.1f}x training")

    with tempfile.TemporaryDirectory() as tmp:
        urls = []
        for i in range(args.shards):
            (Path(tmp) / str(i)).mkdir()
            urls += synthetic_shards(Path(tmp) / str(i), args.resolution, args.images // args.shards)
        t0 = time.perf_counter()
        done = sum(len(rows) for _, rows in encode_shards(
            model, urls, [False] * len(urls), batch_size=args.encode_batch, resolution=args.resolution,
            crop="center", device=device, workers=args.workers))
        sync()
        staged = done / (time.perf_counter() - t0)
    label = f"encode, stage path ({args.workers} workers)"
    print(f"  {label:<40}{staged:9.1f} img/s  {staged / train:6.1f}x training")
    verdict = "meets" if staged >= 3 * train else "misses"
    print(f"encode through the stage path {verdict} the >= 3x target ({staged / train:.1f}x)")


if __name__ == "__main__":
    main()
