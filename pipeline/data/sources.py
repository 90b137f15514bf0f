"""Where images come from: the embedded digits, or a class-folder tree.

A source lists its samples (cheap, picklable records) and loads one sample's image bytes on
demand, so the shard writer can run in parallel workers and restart anywhere.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from pipeline.data import images
from pipeline.wording import first_few

IMAGE_EXTS = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}  # PIL decodes them all
log = logging.getLogger("pipeline.prepare")

# other names trees use for the held-out split (torchvision's ImageFolder datasets, Kaggle): read as val
VAL_ALIASES = ("val", "valid", "validation")


def is_image(path: Path) -> bool:
    """An image of the dataset, by its name. Hidden files are not: macOS leaves a ``._<name>.jpg``
    (no image) beside every file it copies to some disks, and ``.DS_Store`` in every folder."""
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def subfolders(folder: Path) -> list[Path]:
    """Sorted subfolders, without hidden ones (``.ipynb_checkpoints``, ``.git``), which are no class."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class SampleRef:
    key: str          # unique, stable WebDataset key (no dots)
    label: int        # class index
    origin: str       # where it came from (file path or digits index), for the json metadata
    split: str


class Source(Protocol):
    name: str
    class_names: list[str]
    layout: str

    def samples(self) -> dict[str, list[SampleRef]]: ...

    def load(self, ref: SampleRef) -> images.EncodedImage: ...


def safe_key(text: str) -> str:
    """WebDataset splits keys at the first dot; slashes would create folders: replace both."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text.replace("/", "__"))


@dataclass
class DigitsSource:
    """sklearn's 8x8 handwritten digits as ``resolution``² RGB PNGs (white strokes on black).

    Resampling: the 0..16 intensities are scaled to 0..255 and the 8x8 grey image is resized
    with PIL's bicubic filter (clipped to 0..255) then replicated to three channels.
    """

    resolution: int
    val_fraction: float
    seed: int
    name: str = "digits"
    layout: str = "sklearn.datasets.load_digits"
    class_names: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])

    def __post_init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self._images = digits.images  # (1797, 8, 8) floats in 0..16
        self._labels = digits.target

    def samples(self) -> dict[str, list[SampleRef]]:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(self._labels))
        train, val = train_test_split(idx, test_size=self.val_fraction, random_state=self.seed,
                                      stratify=self._labels)
        return {split: [SampleRef(f"digits_{i:05d}", int(self._labels[i]), f"load_digits[{i}]", split)
                        for i in sorted(ids)]
                for split, ids in (("train", train), ("val", val))}

    def load(self, ref: SampleRef) -> images.EncodedImage:
        i = int(ref.key.split("_")[1])
        grey = Image.fromarray((self._images[i] * (255.0 / 16.0)).round().astype(np.uint8), "L")
        big = grey.resize((self.resolution, self.resolution), Image.BICUBIC).convert("RGB")
        return images.EncodedImage(images.png_bytes(big), "png", self.resolution, self.resolution,
                                   "digits 8x8 -> bicubic")


@dataclass
class FolderSource:
    """``root/<split>/<class>/<image>`` or ``root/<class>/<image>`` (then split here, stratified)."""

    root: Path
    val_fraction: float
    seed: int
    jpeg_quality: int = 95
    max_side: int | None = None
    name: str = "folder"
    layout: str = ""
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()
        subdirs = subfolders(self.root)
        named = [p for p in subdirs if p.name == "train" or p.name in VAL_ALIASES]
        # a folder named train/ or val/ holding images itself is a class (CIFAR-100 has "train")
        split_dirs = [p for p in named if not _holds_images_only(p)]
        if named and not split_dirs and len(named) == len(subdirs):
            raise ValueError(f"{self.root}: {'/, '.join(p.name for p in named)}/ hold images but no class "
                             "folders, and the labels come from those: put the images in <split>/<class>/")
        if split_dirs:
            self.layout = "split/class/image"
            self._splits = self._split_folders(split_dirs, [p.name for p in subdirs if p not in split_dirs])
            classes = {c.name for p in split_dirs for c in subfolders(p)}
        else:
            self.layout = "class/image (val split made here)"
            self._splits = {}
            classes = {p.name for p in subdirs}
        self.class_names = sorted(classes)
        if not self.class_names:
            raise ValueError(f"{self.root}: no class folders found; expected "
                             "<split>/<class>/<image> or <class>/<image>")

    def _split_folders(self, split_dirs: list[Path], others: list[str]) -> dict[str, Path]:
        """train/ and one held-out folder; without both, later stages would find no train or no val
        shards, so the tree is refused here, naming what it has."""
        names = [p.name for p in split_dirs]
        held_out = [p for p in split_dirs if p.name in VAL_ALIASES]
        listed = first_few([f"{o}/" for o in others], limit=5)
        besides = f" (besides: {listed})" if others else ""
        if "train" not in names:
            raise ValueError(f"{self.root}: has {names[0]}/ but no train/{besides}: put the training images in "
                             "train/<class>/, or point data.source at a <class>/<image> tree to split here")
        if len(held_out) != 1:
            fix = ("rename the folder to hold out to val/" if not held_out else
                   f"keep one of {'/, '.join(p.name for p in held_out)}/")
            raise ValueError(f"{self.root}: has train/ and {len(held_out)} held-out folders named "
                             f"{'/, '.join(VAL_ALIASES)}/{besides}; prepare needs exactly one: {fix}, or point "
                             "data.source at a <class>/<image> tree to split here")
        if others:  # e.g. test/: prepare writes train and val shards only
            log.warning("%s: reading train/ and %s/ only, not %s", self.root, held_out[0].name, listed)
        return {"train": split_dirs[names.index("train")], "val": held_out[0]}

    def _files(self, class_root: Path) -> list[tuple[Path, int]]:
        index = {c: i for i, c in enumerate(self.class_names)}
        files, unread = [], []
        for c in subfolders(class_root):
            for f in sorted(c.iterdir()):
                if is_image(f):
                    files.append((f, index[c.name]))
                elif not f.name.startswith("."):
                    unread.append(f)
        if unread:  # .heic from phones, .svg, a folder one level too deep: said, not silently dropped
            kinds = Counter("folders" if f.is_dir() else f.suffix.lower() or "no extension" for f in unread)
            log.warning("%s: %d entries in class folders are not read as images: %s (e.g. %s); images need one "
                        "of %s", class_root, len(unread), ", ".join(f"{k} ({n})" for k, n in kinds.most_common(6)),
                        unread[0].relative_to(class_root), ", ".join(sorted(IMAGE_EXTS)))
        return files

    def _ref(self, path: Path, label: int, split: str) -> SampleRef:
        rel = path.relative_to(self.root).as_posix()
        return SampleRef(safe_key(rel), label, rel, split)

    def samples(self) -> dict[str, list[SampleRef]]:
        if self._splits:
            splits = {s: [self._ref(f, y, s) for f, y in self._files(d)] for s, d in self._splits.items()}
            self._check_classes(splits)
            return splits
        from sklearn.model_selection import train_test_split

        files = self._files(self.root)
        labels = [y for _, y in files]
        n_val = round(len(files) * self.val_fraction)
        if not len(self.class_names) <= n_val <= len(files) - len(self.class_names):
            raise ValueError(f"data.val_fraction={self.val_fraction} of {len(files)} images gives {n_val} val "
                             f"images; a split stratified over {len(self.class_names)} classes needs at least one "
                             "per class on each side: change data.val_fraction or add <split>/ folders")
        counts = np.bincount(labels, minlength=len(self.class_names))
        few = [f"{self.class_names[c]!r} ({counts[c]})" for c in np.flatnonzero(counts < 2)]
        if few:  # sklearn would only say "the least populated class in y has 1 member"
            exts = ", ".join(sorted(IMAGE_EXTS))
            raise ValueError(f"{self.root}: class folders with fewer than 2 images ({exts}): {first_few(few)}; a val "
                             "split stratified over the classes needs at least one image per class on each side: "
                             "add images, remove those folders, or give the split yourself as <split>/<class>/ "
                             "folders")
        train, val = train_test_split(files, test_size=self.val_fraction, random_state=self.seed,
                                      stratify=labels)
        return {"train": [self._ref(f, y, "train") for f, y in sorted(train)],
                "val": [self._ref(f, y, "val") for f, y in sorted(val)]}

    def _check_classes(self, splits: dict[str, list[SampleRef]]) -> None:
        """A class with no training image (its folder only in the held-out split, or its images one
        folder too deep) would still be a class of every model, learned from nothing."""
        def without(split: str) -> list[str]:
            have = {r.label for r in splits[split]}
            return [c for i, c in enumerate(self.class_names) if i not in have]

        where = f"directly in the class folder, one of {', '.join(sorted(IMAGE_EXTS))}"
        untrained = without("train")
        if untrained:
            raise ValueError(f"{self.root}: classes with no image in train/ ({where}): {first_few(untrained)}; put "
                             "their training images in train/<class>/, or remove their folders")
        unseen = without("val")
        if unseen:
            log.warning("%s: classes with no image in %s/ (%s): %s; evaluate has no real val image of them",
                        self.root, self._splits["val"].name, where, first_few(unseen))

    def load(self, ref: SampleRef) -> images.EncodedImage:
        return images.encode((self.root / ref.origin).read_bytes(), self.jpeg_quality, self.max_side)


def _holds_images_only(folder: Path) -> bool:
    return not subfolders(folder) and any(is_image(p) for p in folder.iterdir())


def open_source(data: DictConfig, seed: int, index_dir: Path | None = None) -> Source:
    """``index_dir``: where a source whose listing is slow (ImageNet's tarballs) keeps it."""
    if data.name == "digits":
        return DigitsSource(int(data.resolution), float(data.val_fraction), seed)
    max_side = int(data.max_side) if data.get("max_side") else None
    if data.name == "folder":
        return FolderSource(Path(str(data.source)), float(data.val_fraction), seed,
                            int(data.jpeg_quality), max_side)
    if data.name == "imagenet":
        from pipeline.data.imagenet import ImageNetSource
        from pipeline.data.imagenet_tars import ImageNetTarSource, has_tars

        source, layout = Path(str(data.source)), str(data.layout)
        if layout == "tars" or (layout == "auto" and has_tars(source) and not (source / "train").is_dir()):
            return ImageNetTarSource(source, int(data.jpeg_quality), max_side, index_dir=index_dir)
        return ImageNetSource(source, layout, int(data.jpeg_quality), max_side)
    raise ValueError(f"data={data.name}: no source implementation; choose data=digits, folder or imagenet")


def write_options(data: DictConfig) -> str:
    """What, besides the sample list, decides a shard's bytes (part of the shard plan's digest)."""
    return f"max_side={data.get('max_side')};jpeg_quality={data.get('jpeg_quality')}"
