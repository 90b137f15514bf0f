"""ImageNet as it is downloaded: the ILSVRC2012 tarballs, read in place, never extracted.

``data.source`` holds ``ILSVRC2012_img_train.tar`` (one ``nXXXXXXXX.tar`` per class inside),
``ILSVRC2012_img_val.tar`` (50,000 flat JPEGs) and the devkit, ``ILSVRC2012_devkit_t12.tar.gz``
(or extracted), whose ``ILSVRC2012_validation_ground_truth.txt`` and ``meta.mat`` label val.
Extracting would write 1.3M files (an hour, and inodes many cluster filesystems ration). Listing
reads only tar headers; a sample's origin records where its bytes sit in the tarball
(``<tar>:<offset>:<size>:<name>``), so any array task or worker reads any image by one seek.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import atomic
from pipeline.data import images
from pipeline.data.imagenet import GROUND_TRUTH, SYNSET, LayoutError, _find, _synsets_from_meta_mat
from pipeline.data.sources import IMAGE_EXTS, SampleRef, safe_key

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
INDEX = "_imagenet_tars_index.json.gz"  # the listing, keyed by the tarballs' sizes and mtimes


def has_tars(source: Path) -> bool:
    return (Path(source).expanduser() / TRAIN_TAR).is_file()


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


@dataclass
class ImageNetTarSource:
    source: Path
    jpeg_quality: int = 95
    max_side: int | None = None
    name: str = "imagenet"
    layout: str = "tars"
    class_ids: list[str] = field(default_factory=list)     # sorted WNIDs
    class_names: list[str] = field(default_factory=list)   # their words, same order
    index_dir: Path | None = None  # where the listing is kept for the next task or rerun (prepare's shards/)

    def __post_init__(self) -> None:
        self.source = Path(self.source).expanduser().resolve()
        for needed in (TRAIN_TAR, VAL_TAR):
            if not (self.source / needed).is_file():
                raise LayoutError(f"data.layout=tars: {self.source / needed} is missing; put the "
                                  f"ILSVRC2012 tarballs ({TRAIN_TAR}, {VAL_TAR}, {DEVKIT_TAR}) there")
        with tarfile.open(self.source / TRAIN_TAR, mode="r:") as outer:
            self.class_ids = sorted(Path(m.name).stem for m in outer if m.isfile()
                                    and m.name.endswith(".tar") and SYNSET.match(Path(m.name).stem))
        if not self.class_ids:
            raise LayoutError(f"{self.source / TRAIN_TAR}: no nXXXXXXXX.tar class archives inside")
        order, words, truth = self._devkit()
        self.class_names = [words.get(w, w) for w in self.class_ids]
        self._val_wnids = [order[i - 1] for i in truth]  # in val file-name order

    def _devkit(self) -> tuple[list[str], dict[str, str], list[int]]:
        """Val labels: WNIDs in ILSVRC2012_ID order, their words, and the ID of each val image."""
        packed = self.source / DEVKIT_TAR
        if packed.is_file():
            with tarfile.open(packed, mode="r:gz") as tar:
                found = {Path(m.name).name: m for m in tar if m.isfile()}
                if GROUND_TRUTH not in found or "meta.mat" not in found:
                    raise LayoutError(f"{packed}: no data/{GROUND_TRUTH} or data/meta.mat inside")
                truth = tar.extractfile(found[GROUND_TRUTH]).read().decode()
                order, words = _synsets_from_meta_mat(io.BytesIO(tar.extractfile(found["meta.mat"]).read()))
        else:
            path = _find(self.source, [GROUND_TRUTH], depth=4)
            if path is None or not (path.parent / "meta.mat").is_file():
                raise LayoutError(f"data.layout=tars: val labels not found: put {DEVKIT_TAR} (or its "
                                  f"extracted data/{GROUND_TRUTH} and meta.mat) in {self.source}")
            truth, (order, words) = path.read_text(), _synsets_from_meta_mat(path.parent / "meta.mat")
        return order, words, [int(x) for x in truth.split()]

    # -- the Source protocol ------------------------------------------------------------------
    def samples(self) -> dict[str, list[SampleRef]]:
        """The listing, kept in ``index_dir``: of array tasks starting together one lists (minutes
        on a network filesystem: a seek per image) and the others wait and read it; a rerun reads it."""
        if self.index_dir is None:
            return self._list()
        path = Path(self.index_dir) / INDEX
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = {n: [(self.source / n).stat().st_size, (self.source / n).stat().st_mtime_ns]
                 for n in (TRAIN_TAR, VAL_TAR)}
        with open(path.parent / f".{INDEX}.lock", "a") as lock:
            with contextlib.suppress(OSError):  # a filesystem without locks: each task lists for itself
                fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                kept = json.loads(gzip.decompress(path.read_bytes()))
                if kept["tarballs"] == stamp:
                    return {split: [SampleRef(*r, split) for r in refs] for split, refs in kept["samples"].items()}
            refs = self._list()
            atomic.write_bytes(path, gzip.compress(json.dumps({
                "tarballs": stamp, "samples": {split: [[r.key, r.label, r.origin] for r in rs]
                                               for split, rs in refs.items()}}).encode()))
            return refs

    def _list(self) -> dict[str, list[SampleRef]]:
        index = {w: i for i, w in enumerate(self.class_ids)}
        train: list[SampleRef] = []
        with tarfile.open(self.source / TRAIN_TAR, mode="r:") as outer:
            for member in outer:
                wnid = Path(member.name).stem
                if not (member.isfile() and member.name.endswith(".tar") and wnid in index):
                    continue
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    train += [self._ref(TRAIN_TAR, member.offset_data + m.offset_data, m, index[wnid], "train")
                              for m in inner if m.isfile() and _is_image(m.name)]
        with tarfile.open(self.source / VAL_TAR, mode="r:") as tar:
            val_members = sorted((m for m in tar if m.isfile() and _is_image(m.name)), key=lambda m: m.name)
        if len(val_members) != len(self._val_wnids):
            raise LayoutError(f"{self.source / VAL_TAR}: {len(val_members)} images but "
                              f"{len(self._val_wnids)} labels in {GROUND_TRUTH}")
        val = []
        for m, wnid in zip(val_members, self._val_wnids):  # ILSVRC2012_val_00000001 ... in label order
            if wnid not in index:
                raise LayoutError(f"{VAL_TAR}/{m.name}: label {wnid} has no {wnid}.tar in {TRAIN_TAR}")
            val.append(self._ref(VAL_TAR, m.offset_data, m, index[wnid], "val"))
        # the plan must not depend on the order inside the tarballs
        return {"train": sorted(train, key=lambda r: r.key), "val": val}

    @staticmethod
    def _ref(tar: str, offset: int, member: tarfile.TarInfo, label: int, split: str) -> SampleRef:
        return SampleRef(safe_key(Path(member.name).stem), label, f"{tar}:{offset}:{member.size}:{member.name}", split)

    def load(self, ref: SampleRef) -> images.EncodedImage:
        tar, offset, size, _ = ref.origin.split(":", 3)
        with open(self.source / tar, "rb") as f:
            f.seek(int(offset))
            data = f.read(int(size))
        return images.encode(data, self.jpeg_quality, self.max_side)
