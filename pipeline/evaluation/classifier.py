"""Classifiers trained by `evaluate` with the shared engine: the real-data classifier (baseline
accuracy, FID features, rejection scores) and the CAS classifier (trained on samples only).
Both are tested on the real val split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from pipeline.data.shard_images import ShardImages
from pipeline.data.streams import TrainLoader, private_generator
from pipeline.models import build, load_exported
from pipeline.progress import progress_bar
from pipeline.stages import StageContext
from pipeline.config import flatten
from pipeline.tracking import PrefixedRun
from pipeline.training import distributed, engine


def manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _images(dataset: ShardImages, batch_size: int, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    labels = torch.from_numpy(dataset.labels)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=0, generator=private_generator())
    # leave=False: during a classifier's training the bar comes and goes under the training's bar
    with progress_bar(total=len(dataset), unit="img", desc=desc, leave=False) as bar:
        for i, x in enumerate(loader):
            yield x.float().div_(127.5).sub_(1.0), labels[i * batch_size:i * batch_size + len(x)]
            bar.update(len(x))


@torch.no_grad()
def accuracy(model: nn.Module, dataset: ShardImages, batch_size: int = 256, *, rank: int = 0,
             world_size: int = 1) -> tuple[float, float]:
    """(top-1, top-5) of ``model`` on every image of ``dataset``. With ``world_size`` > 1 every rank
    calls this: each classifies its contiguous block of the images and the counts are summed."""
    device = next(model.parameters()).device
    hits = torch.zeros(3, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    k = min(5, model.num_classes)
    for x, y in _images(_share(dataset, rank, world_size), batch_size, "accuracy"):
        top = model(x.to(device, next(model.parameters()).dtype)).float().topk(k, dim=1).indices.cpu()
        hits += torch.tensor([(top[:, 0] == y).sum().item(), (top == y[:, None]).any(1).sum().item(), len(y)],
                             dtype=torch.float64)
    hits = distributed.all_sum(hits)
    return float(hits[0] / hits[2]), float(hits[1] / hits[2])


@torch.no_grad()
def confidences(model: nn.Module, dataset: ShardImages, batch_size: int = 256, *, rank: int = 0,
                world_size: int = 1) -> np.ndarray:
    """The classifier's probability of each image's own label (its intended class, for samples). With
    ``world_size`` > 1 every rank calls this, scores its block, and every rank returns all scores."""
    device = next(model.parameters()).device
    out = [torch.zeros(0)]
    for x, y in _images(_share(dataset, rank, world_size), batch_size, "confidences"):
        p = F.softmax(model(x.to(device, next(model.parameters()).dtype)).float(), dim=1).cpu()
        out.append(p.gather(1, y[:, None])[:, 0])
    return distributed.all_concat(torch.cat(out)).numpy()


def _share(dataset: ShardImages, rank: int, world_size: int) -> ShardImages:
    return dataset if world_size == 1 else dataset.subset(distributed.block(len(dataset), rank, world_size))


class ClassifierTask:
    kind = "classifier"

    def __init__(self, cfg: DictConfig, train_urls: list[str], val: ShardImages, num_classes: int,
                 class_names: list[str], trained_on: str):
        self.cfg, self.train_urls, self.val = cfg, train_urls, val
        self.val_subset: ShardImages | None = None
        self.num_classes, self.class_names, self.trained_on = num_classes, class_names, trained_on
        self.dist = distributed.detect()
        # everything that shapes the trained weights besides the data (over-inclusive: a key that does
        # not matter only costs a retraining where a model could have been shared; NOT_RECIPE aside)
        recipe = OmegaConf.to_container(OmegaConf.create({
            "model": cfg.model.classifier, "train": cfg.train, "deepspeed": cfg.deepspeed, "seed": cfg.seed,
            "augment": cfg.eval.classifier_augment, "resolution": cfg.data.resolution,
            "shuffle_buffer": cfg.data.shuffle_buffer, "world_size": self.dist.world_size}), resolve=True)
        self.recipe = manifest_digest(recipe)
        # kept beside the digest in model.pt, so a model of another recipe can be told apart key by key
        self.recipe_settings = flatten(recipe)

    def build_model(self) -> nn.Module:
        return build("classifier", self.cfg.model, num_classes=self.num_classes)

    def batches(self, start_step: int, steps: int, micro_batches_per_step: int) -> TrainLoader:
        d = self.cfg.data
        return TrainLoader(self.train_urls, batch_size=int(self.cfg.deepspeed.micro_batch),
                           steps=steps * micro_batches_per_step, resolution=int(d.resolution),
                           augment=str(self.cfg.eval.classifier_augment), hflip=False, seed=int(self.cfg.seed),
                           rank=self.dist.rank, world_size=self.dist.world_size, start_step=start_step,
                           num_workers=int(d.num_workers), shuffle_buffer=int(d.shuffle_buffer))

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        dtype = next(model.parameters()).dtype
        logits = model(x.to(self.dist.device, dtype, non_blocking=True))
        y = y.to(self.dist.device)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"loss": loss.detach(), "accuracy": (logits.argmax(1) == y).float().mean()}

    def evaluate(self, model: nn.Module, step: int, ctx: StageContext) -> dict[str, float]:
        if self.val_subset is None:  # class-balanced: val shards may be written class by class
            limit = int(self.cfg.train.eval_samples)
            self.val_subset = self.val.balanced(limit)
        top1, top5 = accuracy(model, self.val_subset, rank=self.dist.rank, world_size=self.dist.world_size)
        return {"val_top1": top1, "val_top5": top5}

    def export_meta(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names, "trained_on": self.trained_on,
                "recipe": self.recipe, "recipe_settings": self.recipe_settings}


# Settings of the recipe that leave the trained weights bit-identical (logging, the checks during
# training, checkpoints kept): a classifier that differs only in these is the same classifier (tested).
NOT_RECIPE = frozenset({"train.log_every", "train.eval_every", "train.eval_samples", "train.keep_ckpts"})


def same_classifier(path: Path, task: ClassifierTask, max_steps: int) -> bool:
    """Whether ``path`` is a finished classifier of ``task``: same data, same recipe, all steps."""
    if not path.is_file():
        return False
    _, meta = load_exported(path)
    return ((meta.get("trained_on"), int(meta["step"])) == (task.trained_on, max_steps)
            and meta.get("recipe") is not None and not recipe_changes(meta, task))


def recipe_changes(meta: dict[str, Any], task: ClassifierTask) -> list[str]:
    """How the recipe a classifier was trained with differs from ``task``'s, key by key
    (``train.lr 0.001 there, 0.002 now``); one line when the model predates recorded settings."""
    if meta.get("recipe", task.recipe) == task.recipe:
        return []
    then = meta.get("recipe_settings")
    if then is None:
        return [f"recipe {meta['recipe']} there, {task.recipe} now"]
    now = task.recipe_settings
    return [f"{k} {then.get(k, '(unset)')} there, {now.get(k, '(unset)')} now"
            for k in sorted((set(then) | set(now)) - NOT_RECIPE) if then.get(k) != now.get(k)]


def train_or_reuse(cfg: DictConfig, ctx: StageContext, name: str, task: ClassifierTask,
                   elsewhere: tuple[Path, ...] = ()) -> Path:
    """Train ``task`` in ``<stage dir>/<name>/`` (resuming from its checkpoints), or reuse the
    exported model when it is finished; a model trained on other data is refused, never replaced.
    Where this dir has no model yet, a finished ``<dir>/<name>/model.pt`` of the same data and recipe
    in one of ``elsewhere`` (another sample set's evaluate dir) is used as it is, not trained again."""
    sub_dir = ctx.stage_dir / name
    path = sub_dir / "model.pt"
    if not path.exists():
        for other in (Path(d) / name / "model.pt" for d in elsewhere):
            if same_classifier(other, task, int(cfg.train.max_steps)):
                ctx.log.info("%s: reusing the trained classifier %s (same data and recipe)", name, other)
                return other
    if path.exists():
        _, meta = load_exported(path)
        if meta.get("trained_on") != task.trained_on:
            raise ValueError(f"{path} was trained on other data ({meta.get('trained_on')} != {task.trained_on}): "
                             f"the inputs of evaluate changed; pass another experiment=, or move {sub_dir} away")
        if int(meta["step"]) == int(cfg.train.max_steps):
            ctx.log.info("%s: reusing the trained classifier %s", name, path)
            changes = recipe_changes(meta, task)
            if changes:  # finished work is kept, but the numbers must not pass for the new recipe's silently
                ctx.log.warning("%s: %s was trained with another recipe (%s); evaluate uses it as it is. "
                                "To train one with the current recipe, move %s away", name, path,
                                "; ".join(changes), sub_dir)
            return path
    sub_dir.mkdir(parents=True, exist_ok=True)
    ctx.log.info("%s: training a %s classifier on %d shard(s)", name, cfg.model.classifier.arch, len(task.train_urls))
    engine.train(cfg, StageContext(ctx.stage, sub_dir, PrefixedRun(ctx.run, name), ctx.log, ctx.task, ctx.tasks),
                 task)
    return path
