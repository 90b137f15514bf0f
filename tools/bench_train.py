#!/usr/bin/env python
"""VQ-VAE training throughput (images/s): model step alone and fed by the training stream.

    python tools/bench_train.py                                  # tiny_digits preset at 32^2
    python tools/bench_train.py --preset reference --resolution 64 --batch 16
    python tools/bench_train.py --variants fp32,channels_last,bf16,compile

``--preset reference`` builds the reference port's default sizes (rosinality/vq-vae-2-pytorch:
128 hidden, 2 residual blocks of 32 channels, 64-dim codes, 512 codes per level) so the numbers
can be set beside it. Nothing is asserted: speed is measured here, not in tests.
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
import torch
from omegaconf import OmegaConf

from pipeline.config import config_dir
from pipeline.models import VQVAE2, build, parameter_count

REFERENCE = dict(hidden_channels=128, res_channels=32, res_blocks=2, codebook_size_top=512,
                 codebook_size_bottom=512, code_dim_top=64, code_dim_bottom=64)


def make_model(preset: str) -> VQVAE2:
    if preset == "reference":
        return VQVAE2(**REFERENCE)
    return build("vqvae", OmegaConf.load(config_dir() / "model" / f"{preset}.yaml"))


def step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, variant: str):
    bf16 = variant == "bf16"
    forward = torch.compile(model) if variant == "compile" else model

    def step(x: torch.Tensor) -> float:
        with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                            enabled=bf16):
            _, terms = forward(x)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        return float(terms["loss"].detach())
    return step


def synthetic_shards(out: Path, resolution: int, images: int) -> list[str]:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    path = out / "train-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(images):
            arr = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"k{i:06d}", "jpg": buf.getvalue(), "cls": i % 10})
    return [str(path)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny_digits", help="tiny_digits, paper_imagenet256 or reference")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--variants", default="fp32,channels_last,bf16,compile")
    ap.add_argument("--loader-workers", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, device {device}; "
          f"torch {torch.__version__}")
    probe = make_model(args.preset)
    print(f"model: {args.preset} ({parameter_count(probe):,} parameters), {args.resolution}^2, batch {args.batch}")
    x = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    best = ("fp32", 0.0)
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        model = make_model(args.preset).to(device).train()
        xv = x
        if variant == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            xv = x.contiguous(memory_format=torch.channels_last)
        step = step_fn(model, torch.optim.AdamW(model.parameters(), lr=1e-4), variant)
        t0 = time.perf_counter()
        for _ in range(3):
            step(xv)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(xv)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = args.steps * args.batch / (time.perf_counter() - t0)
        print(f"  {variant:<14} {rate:9.1f} img/s   (warm-up {warm:.1f} s)")
        if rate > best[1]:
            best = (variant, rate)

    from pipeline.data.streams import TrainLoader

    with tempfile.TemporaryDirectory() as tmp:
        urls = synthetic_shards(Path(tmp), args.resolution, max(512, 4 * args.batch))
        torch.manual_seed(0)
        model = make_model(args.preset).to(device).train()
        step = step_fn(model, torch.optim.AdamW(model.parameters(), lr=1e-4), "fp32")
        loader = TrainLoader(urls, batch_size=args.batch, steps=args.steps + 3, resolution=args.resolution,
                             augment="center", num_workers=args.loader_workers, shuffle_buffer=256)
        it = iter(loader)
        for _ in range(3):
            step(next(it)[0].to(device))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(next(it)[0].to(device))
        rate = args.steps * args.batch / (time.perf_counter() - t0)
        print(f"  fp32 + loader ({args.loader_workers} worker) {rate:6.1f} img/s")
    print(f"fastest model step: {best[0]} ({best[1]:.1f} img/s)")


if __name__ == "__main__":
    main()
