"""`submit stage=prepare data=imagenet` on fake ImageNet trees in each layout people have."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from mlflow.tracking import MlflowClient
from PIL import Image

import fake_imagenet as fake
from conftest import submit
from pipeline.data.imagenet import ImageNetSource, LayoutError


def _read(shard_dir, split):
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    return list(wds.WebDataset([str(shard_dir / s["name"]) for s in manifest["splits"][split]["shards"]],
                               shardshuffle=False, empty_check=False))


@pytest.mark.parametrize("layout", ["folders", "kaggle", "devkit"])
def test_layouts_are_detected_and_labelled(tmp_path, layout):
    labels = fake.build(tmp_path / "in", layout)
    root = tmp_path / "in" / ("ILSVRC/Data/CLS-LOC" if layout == "kaggle" else "")
    for folder in (root / "train" / fake.SYNSETS[0], root / "val"):  # as copied by a Mac: no images, not listed
        (folder / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    source = ImageNetSource(tmp_path / "in")
    assert source.layout == layout
    assert source.class_ids == fake.SYNSETS
    if layout != "folders":
        assert source.class_names == [fake.WORDS[w] for w in fake.SYNSETS]
    samples = source.samples()
    assert len(samples["train"]) == 3 * 4 + 3
    got = {r.key: fake.SYNSETS[r.label] for r in samples["val"]}
    assert got == labels


def test_wrong_layout_is_a_clear_error(tmp_path):
    fake.build(tmp_path / "in", "folders")
    with pytest.raises(LayoutError, match="kaggle but no LOC_val_solution.csv"):
        ImageNetSource(tmp_path / "in", layout="kaggle")
    (tmp_path / "bad" / "train" / "cats").mkdir(parents=True)
    with pytest.raises(LayoutError, match="no synset folders"):
        ImageNetSource(tmp_path / "bad")


def test_prepare_kaggle_tree_rerun_and_verify(tmp_path):
    src = tmp_path / "imagenet"
    labels = fake.build(src, "kaggle")
    run_root = tmp_path / "runs"
    args = ["stage=prepare", "data=imagenet", f"data.source={src}", "data.shard_size=4",
            f"run_root={run_root}", "experiment=inet"]
    proc = submit(*args, "prepare.workers=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "layout kaggle" in proc.stdout
    shard_dir = run_root / "inet" / "prepare" / "shards"
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    assert manifest["class_ids"] == fake.SYNSETS
    assert manifest["class_names"][2] == "kit fox, Vulpes macrotis"
    # 15 train files in = 14 written + 1 skipped (the truncated one), listed and logged
    assert manifest["splits"]["train"]["count"] == 14 and manifest["splits"]["train"]["skipped"] == 1
    skipped = json.loads((shard_dir / "skipped.json").read_text())
    assert [s["key"] for s in skipped] == ["n01443537_trunc"]
    train, val = _read(shard_dir, "train"), _read(shard_dir, "val")
    assert len(train) == 14 and len(val) == 6
    assert {s["__key__"]: fake.SYNSETS[int(s["cls"])] for s in val} == labels
    for s in train:
        wnid = s["__key__"].split("_")[0]
        assert fake.SYNSETS[int(s["cls"])] == wnid
        img = Image.open(io.BytesIO(s.get("jpg") or s.get("png")))
        assert img.mode == "RGB"
        assert np.abs(np.asarray(img)[20, 30].astype(int) - fake.COLOURS[wnid]).max() < 50
    by_key = {s["__key__"]: s for s in train}
    assert "jpg" in by_key["n01440764_cmyk"] and "png" in by_key["n01440764_png"]
    assert Counter(int(s["cls"]) for s in train) == {0: 6, 1: 4, 2: 4}

    run = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}").get_run(
        json.loads((shard_dir.parent / "mlflow_run.json").read_text())["run_id"])
    assert run.data.metrics["images_skipped"] == 1 and run.data.metrics["images_converted"] == 1  # CMYK; the PNG keeps its bytes
    assert run.data.tags["data.layout_found"] == "kaggle"
    assert "skipped.json" in {a.path for a in MlflowClient(
        f"sqlite:///{run_root / 'mlflow.db'}").list_artifacts(run.info.run_id)}

    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    again = submit(*args, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to write" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == mtimes

    ok = submit(*args, "verify=true", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "verify: 20 samples" in ok.stdout and "match the manifest" in ok.stdout

    victim = shard_dir / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    bad = submit(*args, "verify=true", cwd=tmp_path)
    assert bad.returncode == 1
    assert "train-000001.tar" in bad.stderr and "rerun `submit stage=prepare`" in bad.stderr
    # ... and the rerun it suggests repairs exactly that shard
    fixed = submit(*args, cwd=tmp_path)
    assert fixed.returncode == 0 and "1 of 6 shards to write" in fixed.stdout
    assert submit(*args, "verify=true", cwd=tmp_path).returncode == 0


def test_resize_on_write(tmp_path):
    src = tmp_path / "imagenet"
    fake.build(src, "folders")
    run_root = tmp_path / "runs"
    proc = submit("stage=prepare", "data=imagenet", f"data.source={src}", "data.max_side=32",
                  "data.jpeg_quality=80", f"run_root={run_root}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for s in _read(run_root / "digits" / "prepare" / "shards", "val"):
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (24, 32)  # 48x64 with the longer side capped at 32, aspect kept
        meta = json.loads(s["json"])
        assert (meta["width"], meta["height"]) == (48, 64) and "resized" in meta["converted"]


def test_the_downloaded_tarballs_are_read_in_place_like_the_extracted_tree(tmp_path):
    from pipeline.data.imagenet_tars import ImageNetTarSource

    labels = fake.build_tars(tmp_path / "tars")
    fake.build(tmp_path / "tree", "devkit")  # the same images, extracted
    packed, extracted = ImageNetTarSource(tmp_path / "tars"), ImageNetSource(tmp_path / "tree")
    assert packed.class_ids == extracted.class_ids == fake.SYNSETS
    assert packed.class_names == [fake.WORDS[w] for w in fake.SYNSETS]
    refs, tree_refs = packed.samples(), extracted.samples()
    for split in ("train", "val"):
        assert [(r.key, r.label) for r in refs[split]] == sorted((r.key, r.label) for r in tree_refs[split])
        by_key = {r.key: r for r in tree_refs[split]}
        for ref in refs[split]:  # every image read by its offset is the extracted file's bytes
            assert ref.origin.split(":")[0] == f"ILSVRC2012_img_{split}.tar"
            assert (tmp_path / "tree" / by_key[ref.key].origin).read_bytes() == _raw(packed, ref)
    assert {r.key: fake.SYNSETS[r.label] for r in refs["val"]} == labels

    (tmp_path / "tars" / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    with pytest.raises(LayoutError, match="val labels not found: put ILSVRC2012_devkit_t12.tar.gz"):
        ImageNetTarSource(tmp_path / "tars")
    (tmp_path / "tars" / "ILSVRC2012_img_val.tar").unlink()
    with pytest.raises(LayoutError, match="ILSVRC2012_img_val.tar is missing"):
        ImageNetTarSource(tmp_path / "tars")


def _raw(source, ref) -> bytes:
    tar, offset, size, _ = ref.origin.split(":", 3)
    with open(source.source / tar, "rb") as f:
        f.seek(int(offset))
        return f.read(int(size))


def test_prepare_from_the_tarballs_writes_what_the_extracted_tree_gives(tmp_path):
    fake.build_tars(tmp_path / "tars")
    fake.build(tmp_path / "tree", "devkit")
    shards, out = {}, {}
    for name in ("tars", "tree"):
        proc = submit("stage=prepare", "data=imagenet", f"data.source={tmp_path / name}", "data.shard_size=4",
                      "prepare.workers=2", f"run_root={tmp_path / 'runs'}", f"experiment={name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        shards[name], out[name] = tmp_path / "runs" / name / "prepare" / "shards", proc.stdout
    assert "layout tars" in out["tars"] and "layout devkit" in out["tree"]
    manifest = json.loads((shards["tars"] / "dataset.json").read_text())
    assert manifest["class_names"] == [fake.WORDS[w] for w in fake.SYNSETS]
    assert manifest["splits"]["train"]["count"] == 14 and manifest["splits"]["train"]["skipped"] == 1
    for split in ("train", "val"):
        packed = {s["__key__"]: (int(s["cls"]), s.get("jpg") or s.get("png")) for s in _read(shards["tars"], split)}
        extracted = {s["__key__"]: (int(s["cls"]), s.get("jpg") or s.get("png")) for s in _read(shards["tree"], split)}
        assert packed == extracted and len(packed) == {"train": 14, "val": 6}[split]


def test_the_tarball_listing_is_kept_for_the_next_task_and_redone_when_a_tarball_changes(tmp_path, monkeypatch):
    import os

    from pipeline.data.imagenet_tars import INDEX, ImageNetTarSource

    fake.build_tars(tmp_path / "tars")
    first = ImageNetTarSource(tmp_path / "tars", index_dir=tmp_path / "shards").samples()
    assert (tmp_path / "shards" / INDEX).exists()
    listings = []
    real_list = ImageNetTarSource._list
    monkeypatch.setattr(ImageNetTarSource, "_list", lambda self: listings.append(1) or real_list(self))
    assert ImageNetTarSource(tmp_path / "tars", index_dir=tmp_path / "shards").samples() == first
    assert listings == []  # read from the index, not listed again
    train_tar = tmp_path / "tars" / "ILSVRC2012_img_train.tar"
    os.utime(train_tar, ns=(train_tar.stat().st_atime_ns, train_tar.stat().st_mtime_ns + 10**9))
    assert ImageNetTarSource(tmp_path / "tars", index_dir=tmp_path / "shards").samples() == first
    assert listings == [1]  # a changed tarball is listed again
