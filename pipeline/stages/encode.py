"""`encode`: the frozen VQ-VAE turns every image shard into a code shard (same name, same keys).

Array task i of n takes image shards i, i+n, ...; a shard is written atomically with a completion
marker, so a rerun or a requeued task skips it. The task that finds every shard complete writes
``codes.json`` and checks it against the image manifest: codes = images - skipped, per shard.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig

from pipeline import atomic
from pipeline.config import stage_dir
from pipeline.data import codes, shards
from pipeline.data.streams import ordered_batches
from pipeline.models import load_exported_digest
from pipeline.progress import progress_bar
from pipeline.stages import (StageContext, completed_the_stage, logging_progress, record_shard_total, verify_outputs,
                             vqvae_model)
from pipeline.training.distributed import detect


def run(cfg: DictConfig, ctx: StageContext) -> dict[str, Any]:
    start = time.time()
    out_dir = ctx.stage_dir / "shards"
    if cfg.verify:
        return verify_outputs(ctx, out_dir, codes.verify)
    image_dir = stage_dir(cfg, "prepare") / "shards"
    images = shards.read_manifest(image_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = detect().device
    vqvae_path = vqvae_model(cfg)
    if not vqvae_path.exists():
        raise FileNotFoundError(f"{vqvae_path}: no VQ-VAE model; run `submit stage=train_vqvae` first "
                                "or pass encode.vqvae=/path/to/model.pt")
    model, meta, vqvae_sha256 = load_exported_digest(vqvae_path, device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    vq = meta["model_config"]["vqvae"]
    k_top, k_bottom = int(vq["codebook_size_top"]), int(vq["codebook_size_bottom"])

    work = [(split, s) for split, entry in images["splits"].items() for s in entry["shards"]]
    mine = work[ctx.task::ctx.tasks]
    flips = {split: bool(cfg.encode.hflip) and split == "train" for split in images["splits"]}
    _check_settings(out_dir, mine, flips, vqvae_path, vqvae_sha256)
    todo = [(split, s) for split, s in mine if not _complete(out_dir, s["name"])]
    record_shard_total(ctx.stage_dir, len(work))  # once the settings are known to match
    ctx.log.info("encode with %s (K top %d, bottom %d) on %s: %d of %d shards of this task to write",
                 vqvae_path, k_top, k_bottom, device, len(todo), len(mine))
    encoded = 0
    resolution = int(meta["resolution"])
    crop = "none" if cfg.data.augment == "none" else "center"
    t0 = time.time()
    with progress_bar(total=sum(s["count"] for _, s in todo), unit="img", desc="encode",
                      disable=not todo) as bar, logging_progress(ctx, float(cfg.tracking.progress_every_s)):
        for i, rows in encode_shards(model, [str(image_dir / s["name"]) for _, s in todo],
                                     [flips[split] for split, _ in todo], batch_size=int(cfg.encode.batch_size),
                                     resolution=resolution, crop=crop, device=device,
                                     workers=int(cfg.encode.workers)):
            split, s = todo[i]
            encoded += sum(1 for r in rows if not r[4])
            _write_shard(out_dir, s["name"], split, rows, s["count"], k_top, k_bottom, flips[split], vqvae_sha256)
            bar.update(s["count"])
    seconds = time.time() - t0
    ips = encoded / seconds if todo else 0.0
    complete = all(_complete(out_dir, s["name"]) for _, s in work)
    summary: dict[str, Any] = {"shards": len(mine), "shards_written": len(todo), "images_encoded": encoded,
                               "images_per_s": round(ips, 1), "seconds": round(time.time() - start, 2)}
    ctx.run.log_metrics(summary, step=ctx.run.attempt)  # this task's work
    if complete:
        external = vqvae_path if vqvae_path != stage_dir(cfg, "train_vqvae") / "model.pt" else None
        manifest = _manifest(out_dir, images, meta, vqvae_path, vqvae_sha256, external, work)
        shards.write_manifest(out_dir, manifest, codes.MANIFEST)
        totals = {"skipped": sum(e["skipped"] for e in manifest["splits"].values()),
                  "codes": sum(e["count"] for e in manifest["splits"].values())}
        summary.update(totals)
        completed_the_stage(ctx)  # an array task completing the set logs to the stage's run
        ctx.run.log_metrics(totals, step=ctx.run.attempt)
        ctx.run.log_artifact(out_dir / codes.MANIFEST)
    ctx.log.info("encode: %s", ", ".join(f"{k} {v}" for k, v in summary.items()))
    return {**summary, "outputs": str(out_dir), "complete": complete}


def _complete(out_dir: Path, name: str) -> bool:
    return (out_dir / name).exists() and (out_dir / name.replace(".tar", "_stats.json")).exists()


Row = tuple[str, int, np.ndarray, np.ndarray, bool]  # key, label, top codes, bottom codes, flipped


def _check_settings(out_dir: Path, mine: list, flips: dict[str, bool], vqvae_path: Path, vqvae_sha256: str) -> None:
    """Completed shards are reused, never rewritten: refuse to mix them with codes of another VQ-VAE
    or a different encode.hflip."""
    import json

    for split, s in mine:
        if _complete(out_dir, s["name"]):
            stats = json.loads((out_dir / s["name"].replace(".tar", "_stats.json")).read_text())
            if stats.get("vqvae_sha256", vqvae_sha256) != vqvae_sha256:  # shards before 2026-11-25 lack it
                raise shards.OutputsMadeOtherwise(
                    f"encode.vqvae: {out_dir / s['name']} holds codes of another VQ-VAE (sha256 "
                    f"{stats['vqvae_sha256'][:16]}) than {vqvae_path} ({vqvae_sha256[:16]}) -- pass the same "
                    "encode.vqvae, or use another experiment= (finished shards are never overwritten)")
            done = stats["hflip"]
            if done != flips[split]:
                raise shards.OutputsMadeOtherwise(
                    f"encode.hflip: {out_dir / s['name']} was written with hflip={done}, this run asks for "
                    f"{flips[split]} -- keep encode.hflip={str(done).lower()}, or use another experiment= "
                    "(finished shards are never overwritten)")


@torch.no_grad()
def encode_shards(model: torch.nn.Module, urls: list[str], flips: list[bool], *, batch_size: int, resolution: int,
                  crop: str, device: torch.device, workers: int) -> Iterator[tuple[int, list[Row]]]:
    """Image shards -> (index into urls, rows (key, label, top, bottom, flipped) in the shard's order)
    as each shard finishes. ``workers`` loader processes decode JPEGs while the model runs (decoding,
    not the model, is the bottleneck of small models). The model should be in eval mode
    (channels_last on CPU); bf16 autocast is used on CUDA."""
    rows: dict[int, list[Row]] = {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch in ordered_batches(urls, batch_size=batch_size, resolution=resolution, augment=crop,
                                 num_workers=min(workers, len(urls))):
        if "shard_done" in batch:
            yield batch["shard_done"], rows.pop(batch["shard_done"], [])
            continue
        x = batch["image"].to(device, non_blocking=True)
        variants = [(x, False)] + ([(x.flip(-1), True)] if flips[batch["shard"]] else [])
        out = rows.setdefault(batch["shard"], [])
        for xv, flipped in variants:
            with autocast:
                top, bottom = model.encode(xv.contiguous(memory_format=torch.channels_last))
            for key, label, t, b in zip(batch["key"], batch["label"].tolist(), top.cpu().numpy(),
                                        bottom.cpu().numpy()):
                out.append((key, label, t, b, flipped))


def _write_shard(out_dir: Path, name: str, split: str, rows: list, expected: int, k_top: int, k_bottom: int,
                 hflip: bool, vqvae_sha256: str) -> None:
    tar = out_dir / name
    atomic.remove_stale_temps(tar)
    tmp = atomic.temp_name(tar)
    with open(tmp, "wb") as stream:
        sink = wds.TarWriter(stream)
        for key, label, top, bottom, flipped in rows:
            sink.write({"__key__": key + ("_flip" if flipped else ""),
                        "top.npy": codes.npy_bytes(top.astype(codes.code_dtype(k_top))),
                        "bottom.npy": codes.npy_bytes(bottom.astype(codes.code_dtype(k_bottom))),
                        "cls": label, "json": {"source_key": key, "hflip": flipped}})
        sink.close()
    atomic.commit(tmp, tar)
    originals = sum(1 for r in rows if not r[4])
    if originals > expected:
        raise RuntimeError(f"{name}: encoded {originals} images but the image manifest lists {expected}")
    atomic.write_json(out_dir / name.replace(".tar", "_stats.json"), {
        "name": name, "split": split, "count": len(rows), "images": originals, "skipped": expected - originals,
        "hflip": hflip, "vqvae_sha256": vqvae_sha256, "bytes": tar.stat().st_size})


def _manifest(out_dir: Path, images: dict, meta: dict, vqvae_path: Path, vqvae_sha256: str, external: Path | None,
              work: list) -> dict[str, Any]:
    import json

    splits: dict[str, Any] = {}
    for split, s in work:
        st = json.loads((out_dir / s["name"].replace(".tar", "_stats.json")).read_text())
        if st["images"] + st["skipped"] != s["count"]:  # the promise: nothing lost silently
            raise RuntimeError(f"{s['name']}: {st['images']} encoded + {st['skipped']} skipped != "
                               f"{s['count']} images in the image manifest")
        entry = splits.setdefault(split, {"count": 0, "images": 0, "skipped": 0, "hflip": st["hflip"],
                                          "shards": []})
        entry["count"] += st["count"]
        entry["images"] += st["images"]
        entry["skipped"] += st["skipped"]
        entry["shards"].append({"name": s["name"], "count": st["count"]})
    vq = meta["model_config"]["vqvae"]
    res = int(meta["resolution"])
    return {"format": codes.FORMAT, "vqvae": str(vqvae_path), "vqvae_sha256": vqvae_sha256,
            "vqvae_external": str(external) if external else None, "resolution": res,
            "top_size": res // 8, "bottom_size": res // 4,
            "codebook_size_top": int(vq["codebook_size_top"]), "codebook_size_bottom": int(vq["codebook_size_bottom"]),
            "num_classes": images["num_classes"], "class_names": images["class_names"], "splits": splits}
