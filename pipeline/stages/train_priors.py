"""`train_top_prior` and `train_bottom_prior`: the two PixelCNN priors on the code shards, with the
shared engine. Loss: cross-entropy over the K codes (logged as bits per code) and token accuracy.

Every eval: val bits/code and accuracy on the val code shards, and a grid of decoded samples.
Top prior: top codes sampled per class, decoded with bottom codes sampled by this experiment's
bottom prior if it has been exported, else with the real bottom codes whose top codes are nearest
(the grid's name says which). Bottom prior: real val top codes + sampled bottom codes, under the
decoded originals.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pipeline.config import stage_dir
from pipeline.data import codes, grids
from pipeline.data.streams import TrainLoader
from pipeline.models import build, load_exported
from pipeline.models.sampling import sample_bottom, sample_top
from pipeline.stages import StageContext, vqvae_model
from pipeline.training import distributed, engine


class PriorTask:
    def __init__(self, cfg: DictConfig, kind: str):
        self.cfg, self.kind = cfg, kind
        self.dist = distributed.detect()
        self.device = self.dist.device
        self.code_dir = stage_dir(cfg, "encode") / "shards"
        self.manifest = codes.read_manifest(self.code_dir)
        self.num_classes = int(self.manifest["num_classes"])
        self.val: codes.CodeMaps | None = None
        for key in ("codebook_size_top", "codebook_size_bottom"):
            if int(self.manifest[key]) != int(cfg.model.vqvae[key]):  # the codes come from encode's VQ-VAE
                raise ValueError(f"model.vqvae.{key}={cfg.model.vqvae[key]}, but the codes in {self.code_dir} "
                                 f"come from a VQ-VAE with {key}={self.manifest[key]} -- pass "
                                 f"model.vqvae.{key}={self.manifest[key]} (or the model preset it was trained with)")

    def build_model(self) -> nn.Module:
        return build(self.kind, self.cfg.model, num_classes=self.num_classes)

    def batches(self, start_step: int, steps: int, micro_batches_per_step: int) -> TrainLoader:
        d = self.cfg.data
        return TrainLoader(codes.shard_urls(self.code_dir, "train"), batch_size=int(self.cfg.deepspeed.micro_batch),
                           steps=steps * micro_batches_per_step, seed=int(self.cfg.seed), rank=self.dist.rank,
                           world_size=self.dist.world_size, start_step=start_step, num_workers=int(d.num_workers),
                           shuffle_buffer=int(d.shuffle_buffer), sample=codes.CodeSample())

    def _logits(self, model: nn.Module, top: torch.Tensor, bottom: torch.Tensor, cls: torch.Tensor):
        if self.kind == "top_prior":
            return model(top, cls), top
        return model(bottom, top, cls), bottom

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        top, bottom, cls = (t.to(self.device, non_blocking=True) for t in batch)
        logits, target = self._logits(model, top, bottom, cls)
        nll = F.cross_entropy(logits.float(), target)
        accuracy = (logits.argmax(1) == target).float().mean()
        return nll, {"loss": nll, "bits_per_code": nll / math.log(2), "accuracy": accuracy}

    def evaluate(self, model: nn.Module, step: int, ctx: StageContext) -> dict[str, float]:
        sums = torch.zeros(3, dtype=torch.float64)  # nll nats, correct, codes
        first = None
        if self.val is None:  # the same class-balanced val subset at every eval, split over the ranks
            val_urls = codes.shard_urls(self.code_dir, "val")
            self.val = codes.CodeMaps(val_urls, int(self.cfg.train.eval_samples)).readable()
        for top, bottom, cls in self.val.batches_for_rank(int(self.cfg.deepspeed.micro_batch), self.dist.rank,
                                                          self.dist.world_size):
            logits, target = self._logits(model, top.to(self.device), bottom.to(self.device), cls.to(self.device))
            logits = logits.float()
            sums += torch.tensor([F.cross_entropy(logits, target, reduction="sum").item(),
                                  (logits.argmax(1) == target).sum().item(), target.numel()], dtype=torch.float64)
            first = first or (top[:10], bottom[:10], cls[:10])
        if dist.is_initialized() and dist.get_world_size() > 1:
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        if self.dist.rank == 0 and first is not None and bool(self.cfg.train.sample_grid):
            self._log_grid(model, first, step, ctx)
        return {"val_bits_per_code": float(sums[0] / sums[2]) / math.log(2), "val_accuracy": float(sums[1] / sums[2])}

    def _log_grid(self, model: nn.Module, real: tuple, step: int, ctx: StageContext) -> None:
        vqvae_path = vqvae_model(self.cfg)
        if not vqvae_path.exists():
            return
        vqvae, _ = load_exported(vqvae_path, self.device)
        top, bottom, cls = (t.to(self.device) for t in real)
        g = torch.Generator(device=self.device).manual_seed(step)
        t_size, b_size = tuple(top.shape[-2:]), tuple(bottom.shape[-2:])
        if self.kind == "top_prior":
            classes = torch.arange(min(self.num_classes, 10), device=self.device)
            sampled_top = sample_top(model, classes, t_size, generator=g)
            other = stage_dir(self.cfg, "train_bottom_prior") / "model.pt"
            if other.exists():
                bottom_prior, _ = load_exported(other, self.device)
                sampled_bottom = sample_bottom(bottom_prior, sampled_top, classes, b_size, generator=g)
                name = "samples_top_prior_with_bottom_prior"
            else:  # the real bottom codes whose top codes are nearest (Hamming) to each sample
                nearest = (sampled_top[:, None] != top[None]).flatten(2).sum(-1).argmin(1)
                sampled_bottom = bottom[nearest]
                name = "samples_top_prior_with_nearest_real_bottom"
            rows = [vqvae.decode_codes(sampled_top, sampled_bottom)]
        else:
            sampled_bottom = sample_bottom(model, top, cls, b_size, generator=g)
            rows = [vqvae.decode_codes(top, bottom), vqvae.decode_codes(top, sampled_bottom)]
            name = "samples_bottom_prior_real_top_originals_above"
        scale = max(1, 128 // (b_size[0] * 4))
        ctx.run.log_image(grids.grid([r.float().cpu() for r in rows], scale), name, step=step)

    def export_meta(self) -> dict[str, Any]:
        m = self.manifest
        return {"num_classes": self.num_classes, "class_names": list(m["class_names"]),
                "num_codes": int(m["codebook_size_top" if self.kind == "top_prior" else "codebook_size_bottom"]),
                "top_size": int(m["top_size"]), "bottom_size": int(m["bottom_size"]),
                "vqvae_sha256": m.get("vqvae_sha256")}  # sample checks its decoder is this VQ-VAE


def run_top(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    return engine.train(cfg, ctx, PriorTask(cfg, "top_prior"))


def run_bottom(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    return engine.train(cfg, ctx, PriorTask(cfg, "bottom_prior"))

