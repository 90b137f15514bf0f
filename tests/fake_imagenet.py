"""Build small ImageNet-shaped trees in a temp dir, with the bad files real ImageNet has."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SYNSETS = ["n01440764", "n01443537", "n02119789"]  # sorted: the class index order
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n02119789": "kit fox, Vulpes macrotis"}
COLOURS = {"n01440764": (220, 40, 40), "n01443537": (40, 220, 40), "n02119789": (40, 40, 220)}


def jpeg(colour, size=(64, 48), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(sum(colour) + size[0])
    arr = np.clip(np.array(colour) + rng.integers(-15, 15, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def build(root: Path, val_layout: str, train_per_class: int = 4, val_per_class: int = 2) -> dict:
    """val_layout: folders | kaggle | devkit. Returns {val file stem: wnid}."""
    data = root / "ILSVRC" / "Data" / "CLS-LOC" if val_layout == "kaggle" else root
    for w in SYNSETS:
        (data / "train" / w).mkdir(parents=True)
        for i in range(train_per_class):
            (data / "train" / w / f"{w}_{i}.JPEG").write_bytes(jpeg(COLOURS[w]))
    first = data / "train" / SYNSETS[0]
    (first / f"{SYNSETS[0]}_cmyk.JPEG").write_bytes(jpeg(COLOURS[SYNSETS[0]], mode="CMYK"))
    (first / f"{SYNSETS[0]}_png.JPEG").write_bytes(jpeg(COLOURS[SYNSETS[0]], fmt="PNG"))
    (data / "train" / SYNSETS[1] / f"{SYNSETS[1]}_trunc.JPEG").write_bytes(jpeg(COLOURS[SYNSETS[1]])[:200])

    labels: dict[str, str] = {}
    n = 0
    for w in SYNSETS:
        for _ in range(val_per_class):
            n += 1
            labels[f"ILSVRC2012_val_{n:08d}"] = w
    val = data / "val"
    val.mkdir(parents=True)
    for stem, w in labels.items():
        target = val / w if val_layout == "folders" else val
        target.mkdir(exist_ok=True)
        (target / f"{stem}.JPEG").write_bytes(jpeg(COLOURS[w], size=(48, 64)))
    if val_layout == "kaggle":
        (root / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n" + "".join(f"{s},{w} 1 2 30 40 {w} 5 6 7 8\n"
                                                   for s, w in reversed(labels.items())))
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {WORDS[w]}\n" for w in SYNSETS))
    elif val_layout == "devkit":
        from scipy.io import savemat

        # the devkit's ILSVRC2012_IDs are not in WNID order: give them a different order here
        order = [SYNSETS[2], SYNSETS[0], SYNSETS[1]]
        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                 ("num_children", "O")]
        rows = [(i + 1, w, WORDS[w], "", 0) for i, w in enumerate(order)]
        rows.append((1001, "n00001740", "entity", "", 5))  # an inner node, not a class
        devkit = root / "ILSVRC2012_devkit_t12" / "data"
        devkit.mkdir(parents=True)
        savemat(devkit / "meta.mat", {"synsets": np.array(rows, dtype=dtype)})
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{order.index(w) + 1}\n" for w in labels.values()))
    return labels


def build_tars(root: Path) -> dict:
    """ImageNet as downloaded, with the same images as ``build(..., "devkit")``:
    ILSVRC2012_img_train.tar of per-class tars, the flat val tar and the devkit tarball. Members are
    stored in reverse order, so nothing may depend on the order inside a tarball."""
    tree = root.parent / f"{root.name}-extracted"
    labels = build(tree, "devkit")
    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for w in reversed(SYNSETS):
            packed = io.BytesIO()
            with tarfile.open(fileobj=packed, mode="w") as inner:
                for f in sorted((tree / "train" / w).iterdir(), reverse=True):
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{w}.tar")
            info.size = len(packed.getvalue())
            outer.addfile(info, io.BytesIO(packed.getvalue()))
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for f in sorted((tree / "val").iterdir(), reverse=True):
            val.add(f, arcname=f.name)
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as devkit:
        devkit.add(tree / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    shutil.rmtree(tree)
    return labels
