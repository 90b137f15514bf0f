"""The image shard format shared by every stage that reads images.

Layout of a shard directory:
  ``{split}-{index:06d}.tar``        WebDataset tar; per sample ``jpg|png`` bytes, ``cls`` (int
                                     label) and ``json`` (source id, original size, conversions)
  ``{split}-{index:06d}_stats.json`` completion marker, written after the tar is renamed into place
  ``dataset.json``                   manifest: splits, shards, counts, class names, resolution

Which sample goes to which shard (the plan) depends only on the sample list, the seed and the
shard size, so independent workers or array tasks agree without talking, and a restart can tell
a finished shard from one written under a different plan.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline import atomic
from pipeline.data.images import BadImage
from pipeline.data.sources import SampleRef, Source

FORMAT = "vqvae2-pipeline/image-shards-v1"
MANIFEST = "dataset.json"


class OutputsMadeOtherwise(Exception):
    """A stage's completed shards were made with other settings or inputs than this run's: it writes
    nothing (finished shards are never overwritten), and a stage that was done stays done."""


class PlanMismatch(OutputsMadeOtherwise):
    """A completed shard on disk was written under another plan (other data, seed or size)."""


@dataclass
class ShardPlan:
    split: str
    index: int
    refs: list[SampleRef]
    options: str = ""   # write options that change the bytes (resize, JPEG quality)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def digest(self) -> str:
        h = hashlib.sha256(self.options.encode())
        for r in self.refs:
            h.update(f"{r.key}\t{r.label}\t{r.origin}\n".encode())
        return h.hexdigest()[:16]


def plan_shards(samples: dict[str, list[SampleRef]], shard_size: int, seed: int,
                options: str = "") -> list[ShardPlan]:
    """Shuffle each split globally with the seed, then cut it into shards of ``shard_size``."""
    plans: list[ShardPlan] = []
    for split in sorted(samples):
        refs = sorted(samples[split], key=lambda r: r.key)
        random.Random(f"{seed}:{split}").shuffle(refs)
        for i in range(0, len(refs), shard_size):
            plans.append(ShardPlan(split, i // shard_size, refs[i:i + shard_size], options))
    return plans


def assigned(plans: list[ShardPlan], task: int, tasks: int) -> list[ShardPlan]:
    """The shards task ``task`` of ``tasks`` writes: i, i+n, ... (every task computes the same plan)."""
    return plans[task::tasks]


def tar_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.tar"


def stats_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}_stats.json"


def completed_stats(out_dir: Path, plan: ShardPlan) -> dict | None:
    """The shard's stats if it is complete on disk; None if it still has to be written."""
    sp, tp = stats_path(out_dir, plan.name), tar_path(out_dir, plan.name)
    if not sp.exists() or not tp.exists():
        return None
    stats = json.loads(sp.read_text())
    if stats.get("plan") != plan.digest:
        raise PlanMismatch(
            f"{sp}: written under another shard plan (data, seed, data.shard_size, data.max_side "
            f"or data.jpeg_quality changed, or images were added to or removed from the dataset); "
            f"use a new experiment=... or run_root=..., or move {Path(out_dir)} away")
    if tp.stat().st_size != stats["bytes"]:
        return None  # tar replaced or damaged after completion: write it again
    return stats


def write_shard(out_dir: Path, plan: ShardPlan, source: Source,
                on_sample: Callable[[], None] = lambda: None) -> dict:
    """Write one shard atomically (temp tar, rename, then the stats marker); return its stats."""
    import webdataset as wds

    start = time.time()
    tar = tar_path(out_dir, plan.name)
    atomic.remove_stale_temps(tar)
    tmp = atomic.temp_name(tar)
    skipped, classes, converted = [], Counter(), 0
    with open(tmp, "wb") as stream:
        sink = wds.TarWriter(stream)
        for ref in plan.refs:
            try:
                img = source.load(ref)
            except (BadImage, OSError) as e:
                skipped.append({"key": ref.key, "origin": ref.origin, "error": str(e)})
            else:
                converted += bool(img.converted)
                classes[ref.label] += 1
                sink.write({"__key__": ref.key, img.ext: img.data, "cls": ref.label,
                            "json": {"source": ref.origin, "width": img.width,
                                     "height": img.height, "converted": img.converted}})
            on_sample()
        sink.close()
    atomic.commit(tmp, tar)
    stats = {"name": plan.name, "tar": tar.name, "split": plan.split, "plan": plan.digest,
             "count": sum(classes.values()), "skipped": skipped, "converted": converted,
             "class_counts": {str(k): v for k, v in sorted(classes.items())},
             "bytes": tar.stat().st_size, "seconds": round(time.time() - start, 3)}
    atomic.write_json(stats_path(out_dir, plan.name), stats)
    return stats


def build_manifest(plans: list[ShardPlan], stats: dict[str, dict], source: Source,
                   resolution: int, seed: int, shard_size: int) -> dict:
    splits: dict[str, dict] = {}
    for p in plans:
        s = stats[p.name]
        entry = splits.setdefault(p.split, {"count": 0, "skipped": 0, "shards": [],
                                            "class_counts": Counter()})
        entry["count"] += s["count"]
        entry["skipped"] += len(s["skipped"])
        entry["class_counts"].update({int(k): v for k, v in s["class_counts"].items()})
        entry["shards"].append({"name": s["tar"], "count": s["count"]})
    for entry in splits.values():
        entry["class_counts"] = {str(k): v for k, v in sorted(entry["class_counts"].items())}
    return {"format": FORMAT, "dataset": source.name, "layout": source.layout,
            "class_names": list(source.class_names), "num_classes": len(source.class_names),
            "class_ids": list(getattr(source, "class_ids", source.class_names)),
            "resolution": resolution, "seed": seed, "shard_size": shard_size, "splits": splits}


def read_manifest(shard_dir: Path, name: str = MANIFEST, made_by: str = "prepare") -> dict:
    """A shard directory's manifest ``name`` (image shards' by default; code shards keep theirs in
    ``codes.json``), which the stage ``made_by`` writes once its set is complete."""
    path = Path(shard_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no shard manifest; run `submit stage={made_by}` first")
    return json.loads(path.read_text())


def shard_urls(shard_dir: Path, split: str, name: str = MANIFEST, made_by: str = "prepare") -> list[str]:
    """Paths of a split's shards, in manifest order (what webdataset takes as its url list)."""
    manifest = read_manifest(shard_dir, name, made_by)
    if split not in manifest["splits"]:
        raise KeyError(f"split '{split}' not in {Path(shard_dir) / name}; have {sorted(manifest['splits'])}")
    return [str(Path(shard_dir) / s["name"]) for s in manifest["splits"][split]["shards"]]


def write_manifest(shard_dir: Path, manifest: dict, name: str = MANIFEST) -> None:
    """Write a complete set's manifest; one already there with the same content is left as it is
    (a rerun, or another array task that completed the set too)."""
    path = Path(shard_dir) / name
    if not path.exists() or json.loads(path.read_text()) != manifest:
        atomic.write_json(path, manifest)


def verify(shard_dir: Path, task: int = 0, tasks: int = 1, stage: str = "prepare") -> tuple[int, list[str]]:
    """Re-read the image shards of the manifest (array task ``task`` of ``tasks``: shards
    task, task+tasks, ...); return (samples read, problems found). ``stage`` wrote them."""
    manifest = read_manifest(shard_dir, made_by=stage)

    def check(key: str, ext: str, data: bytes) -> None:
        if ext == "cls":
            label = int(data)
            if not 0 <= label < manifest["num_classes"]:
                raise ValueError(f"sample {key}: label {label}, the manifest has {manifest['num_classes']} classes")

    return verify_tars(shard_dir, manifest, check, lambda exts: "cls" in exts and bool(exts & {"jpg", "png"}),
                       stage, task, tasks)


def verify_tars(shard_dir: Path, manifest: dict, check: Callable[[str, str, bytes], None],
                complete: Callable[[set[str]], bool], stage: str, task: int = 0,
                tasks: int = 1) -> tuple[int, list[str]]:
    """Re-read this task's share of a manifest's shards: every member through ``check(key, ext,
    data)`` (a ValueError names bad content), the samples whose extensions are ``complete``
    counted against the manifest. Return (samples read, problems, each with its fix)."""
    import tarfile

    entries = [shard for entry in manifest["splits"].values() for shard in entry["shards"]][task::tasks]
    fix = f"rerun `submit stage={stage}` to rewrite it"
    total, problems = 0, []
    for shard in entries:
        tar = Path(shard_dir) / shard["name"]
        if not tar.exists():
            problems.append(f"{tar}: missing -- {fix}")
            continue
        keys: dict[str, set[str]] = {}
        bad = None  # the first member that reads but holds a wrong value
        try:
            with tarfile.open(tar) as tf:
                for member in tf:
                    key, _, ext = member.name.partition(".")
                    data = tf.extractfile(member).read()
                    keys.setdefault(key, set()).add(ext)
                    try:
                        check(key, ext, data)
                    except ValueError as e:
                        bad = str(e)
                        break
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            problems.append(f"{tar}: unreadable after {len(keys)} samples ({type(e).__name__}: {e}) "
                            f"-- delete it and its _stats.json, then {fix}")
            continue
        if bad is not None:
            problems.append(f"{tar}: {bad} -- delete it and its _stats.json, then {fix}")
            continue
        count = sum(1 for exts in keys.values() if complete(exts))
        total += count
        if count != shard["count"]:
            problems.append(f"{tar}: {count} complete samples, manifest says {shard['count']} "
                            f"-- delete it and its _stats.json, then {fix}")
    return total, problems
