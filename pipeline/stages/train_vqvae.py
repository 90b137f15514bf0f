"""`train_vqvae`: the hierarchical VQ-VAE-2 on the image shards, with the shared engine.

Loss = MSE reconstruction + commitment (+ codebook loss in learned mode). Every eval: val MSE and
PSNR on ``train.eval_samples`` val images (class-balanced, the same every time), and a grid of
originals over reconstructions.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from pipeline.config import stage_dir
from pipeline.data import grids, shards
from pipeline.data.shard_images import ShardImages
from pipeline.data.streams import TrainLoader
from pipeline.models import build
from pipeline.stages import StageContext
from pipeline.training import distributed, engine


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


class VQVAETask:
    kind = "vqvae"

    def __init__(self, cfg: DictConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.dist = distributed.detect()
        self.shard_dir = stage_dir(cfg, "prepare") / "shards"
        self.manifest = shards.read_manifest(self.shard_dir)
        self.train_urls = shards.shard_urls(self.shard_dir, "train")
        self.val_urls = shards.shard_urls(self.shard_dir, "val")
        self.val: ShardImages | None = None
        self.device = self.dist.device

    def build_model(self) -> nn.Module:
        return build("vqvae", self.cfg.model)

    def batches(self, start_step: int, steps: int, micro_batches_per_step: int) -> TrainLoader:
        d = self.cfg.data
        return TrainLoader(self.train_urls, batch_size=int(self.cfg.deepspeed.micro_batch),
                           steps=steps * micro_batches_per_step, resolution=int(d.resolution),
                           augment=str(d.augment), hflip=bool(d.hflip), seed=int(self.cfg.seed),
                           rank=self.dist.rank, world_size=self.dist.world_size, start_step=start_step,
                           num_workers=int(d.num_workers), shuffle_buffer=int(d.shuffle_buffer))

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch[0].to(self.device, _model_dtype(model), non_blocking=True)
        _, terms = model(x)
        return terms["loss"], terms

    def _val_batches(self) -> Iterator[torch.Tensor]:
        if self.val is None:  # the same class-balanced val subset at every eval, split over the ranks
            d = self.cfg.data
            self.val = ShardImages(self.val_urls, int(d.resolution), "none" if d.augment == "none" else "center",
                                   limit=int(self.cfg.train.eval_samples)).readable()
        for x in self.val.batches_for_rank(int(self.cfg.deepspeed.micro_batch), self.dist.rank, self.dist.world_size):
            yield x.float().div_(127.5).sub_(1.0)

    def evaluate(self, model: nn.Module, step: int, ctx: StageContext) -> dict[str, float]:
        sq_err = torch.zeros(2, dtype=torch.float64)  # (sum of squared errors, pixel values)
        first: tuple[torch.Tensor, torch.Tensor] | None = None
        for x in self._val_batches():
            recon, _ = model(x.to(self.device, _model_dtype(model)))
            recon = recon.float().cpu().clamp(-1, 1)
            sq_err += torch.tensor([((recon - x) ** 2).sum().item(), x.numel()], dtype=torch.float64)
            if first is None:
                first = (x[:8], recon[:8])
        if dist.is_initialized() and dist.get_world_size() > 1:
            sq_err = sq_err.to(self.device)
            dist.all_reduce(sq_err)
            sq_err = sq_err.cpu()
        mse = float(sq_err[0] / sq_err[1])  # in [-1, 1] units
        psnr = 10 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak range is 2
        if first is not None:
            scale = max(1, 128 // int(self.cfg.data.resolution))
            ctx.run.log_image(grids.grid(list(first), scale), "val_reconstructions", step=step)
        return {"val_mse": mse, "val_psnr": psnr}

    def export_meta(self) -> dict[str, Any]:
        return {"num_classes": int(self.manifest["num_classes"]),
                "class_names": list(self.manifest["class_names"])}


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    return engine.train(cfg, ctx, VQVAETask(cfg, ctx))
