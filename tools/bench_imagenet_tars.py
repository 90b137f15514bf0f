"""How long listing ImageNet's tarballs takes (data.layout=tars): every array task of `prepare`
lists them once. Builds a train tarball of --classes class tars with --per-class small JPEGs each
(ImageNet: 1000 x ~1281) plus a val tarball and devkit, then times ImageNetTarSource's listing and
reading images by offset. Listing cost is per tar header, so it scales with the image count.

    python tools/bench_imagenet_tars.py --classes 10 --per-class 1281 --drop-caches
"""

from __future__ import annotations

import argparse
import io
import random
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build(root: Path, classes: int, per_class: int, val: int, image_kb: int) -> None:
    from scipy.io import savemat

    wnids = [f"n{10000000 + i:08d}" for i in range(classes)]
    # padded after the JPEG's end marker to ImageNet's mean file size: headers lie that far apart
    blobs = [(b := _jpeg(i)) + bytes(max(0, image_kb * 1024 - len(b))) for i in range(64)]
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, w in enumerate(wnids):
            packed = io.BytesIO()
            with tarfile.open(fileobj=packed, mode="w") as inner:
                for j in range(per_class):
                    _add(inner, f"{w}_{j}.JPEG", blobs[(c + j) % len(blobs)])
            _add(outer, f"{w}.tar", packed.getvalue())
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for j in range(val):
            _add(tar, f"ILSVRC2012_val_{j + 1:08d}.JPEG", blobs[j % len(blobs)])
    data = root / "devkit" / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    savemat(data / "meta.mat", {"synsets": np.array([(i + 1, w, w, "", 0) for i, w in enumerate(wnids)],
                                                    dtype=dtype)})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{j % classes + 1}\n" for j in range(val)))
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as devkit:
        devkit.add(root / "devkit" / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=1281)
    p.add_argument("--val", type=int, default=5000)
    p.add_argument("--image-kb", type=int, default=110, help="bytes per image (ImageNet's mean: ~110 KB)")
    p.add_argument("--drop-caches", action="store_true", help="time a cold page cache (root only)")
    p.add_argument("--dir", type=Path, default=None, help="where to build the tarballs (default: a temp dir)")
    args = p.parse_args()
    from pipeline.data.imagenet_tars import ImageNetTarSource

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        build(root, args.classes, args.per_class, args.val, args.image_kb)
        size = (root / "ILSVRC2012_img_train.tar").stat().st_size
        print(f"built {args.classes} x {args.per_class} train + {args.val} val images "
              f"({size / 1e9:.2f} GB train tar) in {time.perf_counter() - t:.1f} s")
        if args.drop_caches:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        t = time.perf_counter()
        source = ImageNetTarSource(root)
        refs = source.samples()
        listed = time.perf_counter() - t
        n = len(refs["train"]) + len(refs["val"])
        print(f"listing: {n} images in {listed:.2f} s = {n / listed:,.0f} headers/s "
              f"-> ImageNet's 1,331,167 in ~{1_331_167 / (n / listed):.0f} s "
              f"(page cache {'cold' if args.drop_caches else 'warm'})")
        picks = random.Random(0).sample(refs["train"], min(2000, len(refs["train"])))
        t = time.perf_counter()
        for ref in picks:
            source.load(ref)
        per = (time.perf_counter() - t) / len(picks)
        print(f"reading by offset + encode check: {1e3 * per:.2f} ms per image (random order, {len(picks)} images)")


if __name__ == "__main__":
    main()
