"""ImageNet (ILSVRC2012) in the layouts people actually have on disk.

Train is always synset folders ``train/nXXXXXXXX/*.JPEG``. Val comes as one of:
  ``folders``  ``val/nXXXXXXXX/*.JPEG`` (already sorted into synset folders);
  ``kaggle``   flat ``val/*.JPEG`` + ``LOC_val_solution.csv`` (Kaggle's ImageNet Object
               Localization Challenge; the tree is ``ILSVRC/Data/CLS-LOC/{train,val}``);
  ``devkit``   flat ``val/*.JPEG`` + the devkit's ``ILSVRC2012_validation_ground_truth.txt`` with
               ``meta.mat`` (or a synset list: one WNID per line in ILSVRC2012_ID order).
Or, not extracted at all, the downloaded tarballs (``tars``: ``pipeline.data.imagenet_tars``).
Class index = position in the sorted synset ids (torchvision's ``ImageFolder`` order).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pipeline.data import images
from pipeline.data.sources import SampleRef, is_image, safe_key

LAYOUTS = ("auto", "folders", "kaggle", "devkit", "tars")  # tars: pipeline.data.imagenet_tars
SYNSET = re.compile(r"^n\d{8}$")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


class LayoutError(ValueError):
    """The tree does not look like any ImageNet layout we know; the message says what was missing."""


def _find(root: Path, names: list[str], depth: int = 3) -> Path | None:
    """First file with one of ``names`` at most ``depth`` folders below ``root`` (not in train/val)."""
    frontier = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in frontier:
            for n in names:
                if (d / n).is_file():
                    return d / n
            nxt += [c for c in sorted(d.iterdir()) if c.is_dir() and c.name not in ("train", "val", "test")
                    and not SYNSET.match(c.name)]
        frontier = nxt
    return None


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if is_image(f) and f.is_file())


def _synsets_from_meta_mat(path: Path | BinaryIO) -> tuple[list[str], dict[str, str]]:
    """WNIDs in ILSVRC2012_ID order (the 1000 leaves) and their words, from the devkit's meta.mat
    (a path, or the file read out of the devkit's tarball)."""
    from scipy.io import loadmat

    rows = loadmat(path if hasattr(path, "read") else str(path), squeeze_me=True)["synsets"]
    leaves = sorted((int(r["ILSVRC2012_ID"]), str(r["WNID"]), str(r["words"]))
                    for r in rows if int(r["num_children"]) == 0)
    return [w for _, w, _ in leaves], {w: words for _, w, words in leaves}


@dataclass
class ImageNetSource:
    source: Path
    layout: str = "auto"
    jpeg_quality: int = 95
    max_side: int | None = None
    name: str = "imagenet"
    class_ids: list[str] = field(default_factory=list)     # sorted WNIDs
    class_names: list[str] = field(default_factory=list)   # human-readable, same order
    root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.source = Path(self.source).expanduser().resolve()
        if self.layout not in LAYOUTS:
            raise LayoutError(f"data.layout={self.layout}: choose one of {', '.join(LAYOUTS)}")
        kaggle = self.source / "ILSVRC" / "Data" / "CLS-LOC"
        self.root = kaggle if (kaggle / "train").is_dir() else self.source
        train = self.root / "train"
        if not train.is_dir():
            raise LayoutError(f"{self.source}: no train/ folder (nor ILSVRC/Data/CLS-LOC/train, nor "
                              "ILSVRC2012_img_train.tar); pass data.source=<the folder that holds train/ "
                              "and val/, or the ILSVRC2012 tarballs>")
        self.class_ids = sorted(d.name for d in train.iterdir() if d.is_dir() and SYNSET.match(d.name))
        if not self.class_ids:
            raise LayoutError(f"{train}: no synset folders nXXXXXXXX/; is this ImageNet? "
                              "For other class folders use data=folder")
        self._val_labels: dict[str, str] = {}  # val file name -> WNID (flat layouts)
        self.layout = self._detect_val_layout()
        self.class_names = [self._words.get(w, w) for w in self.class_ids]

    # -- layout detection --------------------------------------------------------------------
    def _detect_val_layout(self) -> str:
        self._words: dict[str, str] = {}
        mapping = _find(self.source, ["LOC_synset_mapping.txt"])
        if mapping:
            for line in mapping.read_text().splitlines():
                wnid, _, words = line.partition(" ")
                self._words[wnid] = words.strip()
        val = self.root / "val"
        if not val.is_dir():
            raise LayoutError(f"{self.root}: no val/ folder")
        has_folders = any(d.is_dir() and SYNSET.match(d.name) for d in val.iterdir())
        wanted = self.layout
        if wanted == "folders" or (wanted == "auto" and has_folders):
            if not has_folders:
                raise LayoutError(f"data.layout=folders but {val} has no synset folders; try data.layout=auto")
            return "folders"
        csv_path = _find(self.source, ["LOC_val_solution.csv"])
        if wanted == "kaggle" or (wanted == "auto" and csv_path):
            if not csv_path:
                raise LayoutError(f"data.layout=kaggle but no LOC_val_solution.csv under {self.source}")
            with open(csv_path, newline="") as f:
                for row in csv.DictReader(f):
                    self._val_labels[row["ImageId"]] = row["PredictionString"].split()[0]
            return "kaggle"
        truth = _find(self.source, [GROUND_TRUTH], depth=4)
        if truth is None:
            raise LayoutError(
                f"{val}: flat val images but no labels found: put LOC_val_solution.csv (Kaggle) or the "
                f"devkit ({GROUND_TRUTH} + meta.mat) under {self.source}, or sort val into synset folders")
        meta = truth.parent / "meta.mat"
        synset_list = _find(self.source, ["synsets.txt", "LOC_synset_mapping.txt"])
        if meta.is_file():
            order, words = _synsets_from_meta_mat(meta)
            self._words = {**words, **self._words}
        elif synset_list:
            order = [line.split()[0] for line in synset_list.read_text().splitlines() if line.strip()]
        else:
            raise LayoutError(f"{truth}: found, but neither meta.mat beside it nor a synset list "
                              "(synsets.txt: one WNID per line in ILSVRC2012_ID order)")
        ids = [int(x) for x in truth.read_text().split()]
        files = _image_files(val)  # ILSVRC2012_val_00000001.JPEG ... in ground-truth order
        if len(files) != len(ids):
            raise LayoutError(f"{val}: {len(files)} images but {len(ids)} labels in {truth}")
        self._val_labels = {f.stem: order[i - 1] for f, i in zip(files, ids)}
        return "devkit"

    # -- the Source protocol ------------------------------------------------------------------
    def samples(self) -> dict[str, list[SampleRef]]:
        index = {w: i for i, w in enumerate(self.class_ids)}
        out: dict[str, list[SampleRef]] = {"train": [], "val": []}
        train = self.root / "train"
        for wnid in self.class_ids:
            out["train"] += [self._ref(f, index[wnid], "train") for f in _image_files(train / wnid)]
        val = self.root / "val"
        if self.layout == "folders":
            for wnid in self.class_ids:
                if (val / wnid).is_dir():
                    out["val"] += [self._ref(f, index[wnid], "val") for f in _image_files(val / wnid)]
            return out
        for f in _image_files(val):
            wnid = self._val_labels.get(f.stem)
            if wnid is None:
                raise LayoutError(f"{f}: no label in the {self.layout} label file")
            if wnid not in index:
                raise LayoutError(f"{f}: label {wnid} has no train/{wnid} folder")
            out["val"].append(self._ref(f, index[wnid], "val"))
        return out

    def _ref(self, path: Path, label: int, split: str) -> SampleRef:
        rel = path.relative_to(self.root).as_posix()
        return SampleRef(safe_key(path.stem), label, rel, split)

    def load(self, ref: SampleRef) -> images.EncodedImage:
        return images.encode((self.root / ref.origin).read_bytes(), self.jpeg_quality, self.max_side)
