"""`submit stage=prepare data=folder` on real image trees, including the bad files users have."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import SUBMIT, exif_turned_jpeg, submit

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def _image(colour, size=(40, 30), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(sum(colour))
    arr = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _read(shard_dir: Path, split: str) -> list[dict]:
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    urls = [str(shard_dir / s["name"]) for s in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_split_class_tree_with_bad_files(tmp_path):
    src = tmp_path / "flowers"
    for split, n in (("train", 6), ("val", 2)):
        for cls, colour in COLOURS.items():
            d = src / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"img{i}.jpg").write_bytes(_image(colour))
    (src / "train" / "cat" / "cmyk.jpeg").write_bytes(_image(COLOURS["cat"], mode="CMYK"))
    (src / "train" / "dog" / "grey.JPG").write_bytes(_image(COLOURS["dog"], mode="L"))
    (src / "train" / "emu" / "really_png.jpg").write_bytes(_image(COLOURS["emu"], fmt="PNG"))
    (src / "train" / "emu" / "truncated.jpg").write_bytes(_image(COLOURS["emu"])[:300])
    (src / "train" / "cat" / "notes.txt").write_text("not an image, not listed")

    run_root = tmp_path / "runs"
    proc = submit("stage=prepare", "data=folder", f"data.source={src}", "data.shard_size=5",
                  f"run_root={run_root}", "experiment=flowers", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "split/class/image" in proc.stdout
    assert "truncated.jpg" in proc.stdout  # the skipped file is named in the log

    shard_dir = run_root / "flowers" / "prepare" / "shards"
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    assert manifest["class_names"] == ["cat", "dog", "emu"]
    train = _read(shard_dir, "train")
    # nothing lost silently: 22 files in = 21 written + 1 skipped
    assert len(train) == manifest["splits"]["train"]["count"] == 21
    assert manifest["splits"]["train"]["skipped"] == 1
    assert len(_read(shard_dir, "val")) == 6
    for s in train:
        name = s["__key__"].split("__")[-1]
        img = Image.open(io.BytesIO(s.get("jpg") or s.get("png")))
        assert img.mode == "RGB"
        cls = manifest["class_names"][int(s["cls"])]
        assert s["__key__"].startswith(f"train__{cls}__")  # label matches the folder
        centre = np.asarray(img)[15, 20].astype(int)
        if name == "grey_JPG":  # greyscale -> RGB: three equal channels
            assert centre[0] == centre[1] == centre[2]
        else:
            assert np.abs(centre - COLOURS[cls]).max() < 60, (name, centre)
    by_name = {s["__key__"]: s for s in train}
    assert "jpg" in by_name["train__cat__cmyk_jpeg"]        # CMYK JPEG -> RGB JPEG
    assert "png" in by_name["train__emu__really_png_jpg"]   # format from content, not extension
    stats = [json.loads(p.read_text()) for p in shard_dir.glob("train-*_stats.json")]
    skipped = [s for st in stats for s in st["skipped"]]
    assert [s["origin"] for s in skipped] == ["train/emu/truncated.jpg"]

    run_id = json.loads((shard_dir.parent / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}").get_run(run_id)
    assert run.data.metrics["images_skipped"] == 1 and run.data.metrics["images"] == 27
    assert run.data.params["data.source"] == str(src)


def test_class_tree_without_splits_is_split_here(tmp_path):
    src = tmp_path / "pets"
    for cls, colour in COLOURS.items():
        (src / cls).mkdir(parents=True)
        for i in range(10):
            (src / cls / f"{i}.png").write_bytes(_image(colour, fmt="PNG"))
    run_root = tmp_path / "runs"
    proc = submit("stage=prepare", "data=folder", f"data.source={src}", "data.val_fraction=0.2",
                  f"run_root={run_root}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    shard_dir = run_root / "digits" / "prepare" / "shards"
    val = _read(shard_dir, "val")
    assert Counter(int(s["cls"]) for s in val) == {0: 2, 1: 2, 2: 2}  # stratified
    train_keys = {s["__key__"] for s in _read(shard_dir, "train")}
    assert len(train_keys) == 24 and not train_keys & {s["__key__"] for s in val}
    # run again with another split: refused before anything is touched (the job used to un-mark the
    # stage done, mark its MLflow run failed, then fail on the shards of the first split); settings
    # that do not change the shards run it again
    sdir = run_root / "digits" / "prepare"
    kept = {p: p.read_bytes() for p in sdir.iterdir() if p.is_file()}
    other = submit("stage=prepare", "data=folder", f"data.source={src}", "data.val_fraction=0.3",
                   f"run_root={run_root}", cwd=tmp_path)
    assert other.returncode == 2, other.stderr + other.stdout
    assert ("stage=prepare: is done, with other settings (data.val_fraction=0.2 there, 0.3 now), and finished "
            "outputs are never overwritten -- pass the values it ran with, or experiment=<a new name> to make "
            "them anew") in other.stderr
    assert {p: p.read_bytes() for p in sdir.iterdir() if p.is_file()} == kept
    same = submit("stage=prepare", "data=folder", f"data.source={src}", "data.val_fraction=0.2", "prepare.workers=2",
                  f"run_root={run_root}", cwd=tmp_path)
    assert same.returncode == 0 and "all 2 shards of this task in" in same.stdout + same.stderr, same.stderr
    assert (sdir / "done.json").exists()
    # an image added to the tree since: the same command is refused by the job (the listing tells), which
    # leaves the stage done and its MLflow run FINISHED instead of a done prepare turned failed for good
    kept = {name: (sdir / name).read_bytes() for name in ("done.json", "config.yaml")}
    (src / "cat" / "10.png").write_bytes(_image(COLOURS["cat"], fmt="PNG"))
    grown = submit("stage=prepare", "data=folder", f"data.source={src}", "data.val_fraction=0.2", "prepare.workers=3",
                   f"run_root={run_root}", cwd=tmp_path)
    assert grown.returncode == 1, grown.stderr + grown.stdout
    assert "failed: PlanMismatch: " in grown.stderr and "images were added to or removed from" in grown.stderr
    assert "stage prepare: its finished outputs were not touched and it is still done" in grown.stdout + grown.stderr
    assert {name: (sdir / name).read_bytes() for name in kept} == kept and not (sdir / "failed.json").exists()
    run_id = json.loads(kept["done.json"])["run_id"]
    run = MlflowClient(tracking_uri=f"sqlite:///{run_root / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and "PlanMismatch" in run.data.tags["execution.3.error"], run.data.tags
    assert re.search(r"^prepare\s+done\s", submit("status", f"run_root={run_root}", cwd=tmp_path).stdout, re.M)


def test_a_class_too_small_to_split_is_named_with_the_fix(tmp_path):
    """sklearn's own error names neither the folder nor what to do about it."""
    src = tmp_path / "pets"
    for cls, n in (("cat", 10), ("dog", 1), ("newt", 0)):
        (src / cls).mkdir(parents=True)
        for i in range(n):
            (src / cls / f"{i}.png").write_bytes(_image((9, 9, 9), fmt="PNG"))
    (src / "newt" / "notes.txt").write_text("not an image")
    run_root = tmp_path / "runs"
    proc = submit("stage=prepare", "data=folder", f"data.source={src}", "data.val_fraction=0.3",
                  f"run_root={run_root}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert (f"failed: ValueError: {src}: class folders with fewer than 2 images (.bmp, .gif, .jpeg, .jpg, .png, "
            ".tif, .tiff, .webp): 'dog' (1), 'newt' (0); ") in proc.stderr, proc.stderr
    assert "give the split yourself as <split>/<class>/ folders" in proc.stderr
    assert not list((run_root / "digits" / "prepare").glob("shards/*.tar"))


def test_a_held_out_folder_named_valid_is_val_and_a_tree_without_one_is_refused(tmp_path, caplog):
    """Trees from torchvision/Kaggle name the held-out split valid/ or validation/, often beside a
    test/; a train/ with no held-out folder at all used to give train shards only, and later stages
    no val split."""
    from pipeline.data.sources import FolderSource

    src = tmp_path / "flowers"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (src / split / cls).mkdir(parents=True)
            (src / split / cls / "0.png").write_bytes(_image(COLOURS[cls], fmt="PNG"))
    with pytest.raises(ValueError, match=r"has train/ and 0 held-out folders named val/, valid/, validation/ "
                                         r"\(besides: test/\); prepare needs exactly one: rename the folder to "
                                         r"hold out to val/"):
        FolderSource(src, 0.1, 0)
    (src / "valid" / "dog").mkdir(parents=True)
    (src / "valid" / "dog" / "1.png").write_bytes(_image(COLOURS["dog"], fmt="PNG"))
    splits = FolderSource(src, 0.1, 0).samples()
    assert {s: [(r.origin, r.label) for r in refs] for s, refs in splits.items()} == {
        "train": [("train/cat/0.png", 0), ("train/dog/0.png", 1)], "val": [("valid/dog/1.png", 1)]}
    assert f"{src}: reading train/ and valid/ only, not test/" in caplog.text
    (src / "validation").mkdir()
    with pytest.raises(ValueError, match="has train/ and 2 held-out folders .* keep one of valid/, validation/"):
        FolderSource(src, 0.1, 0)
    (src / "train").rename(src / "training")
    with pytest.raises(ValueError, match=r"has valid/ but no train/ \(besides: test/, training/\): put the "):
        FolderSource(src, 0.1, 0)
    for i in range(5):  # a long list of other folders is cut short, counting the rest
        (src / f"set{i}").mkdir()
    with pytest.raises(ValueError, match=r"no train/ \(besides: set0/, set1/, set2/, set3/, set4/ and 2 more\): "):
        FolderSource(src, 0.1, 0)


def test_a_class_folder_named_train_is_a_class(tmp_path):
    """CIFAR-100 has a class "train": a folder of that name holding images is a class, not the split;
    a tree of split folders holding images but no class folders has no labels and is refused."""
    from pipeline.data.sources import FolderSource

    src = tmp_path / "cifar"
    for cls in ("cat", "train", "val"):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            (src / cls / f"{i}.png").write_bytes(_image((9, 9, 9), fmt="PNG"))
    source = FolderSource(src, 0.5, 0)
    assert source.layout.startswith("class/image") and source.class_names == ["cat", "train", "val"]
    splits = source.samples()
    assert sorted(r.label for r in splits["val"]) == [0, 1, 2] and len(splits["train"]) == 3
    (src / "cat").rename(tmp_path / "cat")
    with pytest.raises(ValueError, match=r"cifar: train/, val/ hold images but no class folders, and the "
                                         r"labels come from those: put the images in <split>/<class>/"):
        FolderSource(src, 0.5, 0)


def test_a_class_without_training_images_is_refused_and_one_without_val_images_named(tmp_path, caplog):
    """A class folder only in val/, or one whose images sit a folder too deep, used to become a class
    of every model with no training image."""
    from pipeline.data.sources import FolderSource

    src = tmp_path / "pets"
    for path in ("train/cat/0.png", "train/dog/sub/0.png", "val/cat/1.png", "val/dog/1.png", "val/emu/1.png"):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(_image(COLOURS["cat"], fmt="PNG"))
    with pytest.raises(ValueError, match=r"pets: classes with no image in train/ \(directly in the class folder, "
                                         r"one of .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp\): dog, emu; "
                                         r"put their training images in train/<class>/, or remove their folders"):
        FolderSource(src, 0.1, 0).samples()
    (src / "train" / "dog" / "sub" / "0.png").rename(src / "train" / "dog" / "0.png")
    (src / "val" / "emu" / "1.png").rename(src / "train" / "cat" / "2.png")
    (src / "val" / "emu").rmdir()
    (src / "val" / "dog" / "1.png").unlink()
    splits = FolderSource(src, 0.1, 0).samples()
    assert sorted(r.label for r in splits["train"]) == [0, 0, 1] and [r.label for r in splits["val"]] == [0]
    assert f"{src}: classes with no image in val/ (directly in the class folder" in caplog.text
    assert "): dog; evaluate has no real val image of them" in caplog.text


def test_a_tree_as_users_have_it(tmp_path):
    """Hidden files and folders are not the dataset (Jupyter's .ipynb_checkpoints used to be a class,
    macOS' ._<name>.jpg a skipped image); BMP, TIFF and GIF are read; what is not read is said."""
    src = tmp_path / "pets"
    for cls, colour in COLOURS.items():
        (src / cls / ".ipynb_checkpoints").mkdir(parents=True)
        for i in range(4):
            (src / cls / f"{i}.png").write_bytes(_image(colour, fmt="PNG"))
        (src / cls / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
        (src / cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (src / ".ipynb_checkpoints").mkdir()
    (src / ".DS_Store").write_bytes(b"Bud1")
    for fmt, ext in (("BMP", "bmp"), ("TIFF", "tif"), ("GIF", "gif")):
        (src / "emu" / f"more.{ext}").write_bytes(_image(COLOURS["emu"], fmt=fmt))
    stored = np.zeros((30, 40, 3), np.uint8) + np.array(COLOURS["dog"], np.uint8)
    (src / "dog" / "phone.jpg").write_bytes(exif_turned_jpeg(stored, 8))
    (src / "dog" / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (src / "cat" / "deeper").mkdir()
    (src / "cat" / "deeper" / "9.png").write_bytes(_image(COLOURS["cat"], fmt="PNG"))
    run_root = tmp_path / "runs"
    proc = submit("stage=prepare", "data=folder", f"data.source={src}", "data.val_fraction=0.2",
                  f"run_root={run_root}", "experiment=pets", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert (f"{src}: 2 entries in class folders are not read as images: folders (1), .heic (1) (e.g. cat/deeper); "
            "images need one of .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp") in proc.stdout + proc.stderr

    shard_dir = run_root / "pets" / "prepare" / "shards"
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    assert manifest["class_names"] == ["cat", "dog", "emu"]
    samples = {s["__key__"]: s for split in ("train", "val") for s in _read(shard_dir, split)}
    assert set(samples) == {f"{cls}__{i}_png" for cls in COLOURS for i in range(4)} | {
        "emu__more_bmp", "emu__more_tif", "emu__more_gif", "dog__phone_jpg"}
    assert sum(s["skipped"] for s in manifest["splits"].values()) == 0
    for key, s in samples.items():
        img = Image.open(io.BytesIO(s.get("jpg") or s.get("png")))
        cls = manifest["class_names"][int(s["cls"])]
        assert np.abs(np.asarray(img.convert("RGB"))[5, 5].astype(int) - COLOURS[cls]).max() < 60, key
    assert Image.open(io.BytesIO(samples["dog__phone_jpg"]["jpg"])).size == (30, 40)  # upright: 30 wide, 40 high


def test_sigterm_marks_the_run_killed(tmp_path):
    src = tmp_path / "stuck"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir(parents=True)
    for cls in ("a", "b"):
        for i in range(3):
            (src / cls / f"{i}.png").write_bytes(_image((9, 9, 9), fmt="PNG"))
    os.mkfifo(src / "a" / "x.png")  # reading it blocks forever: a hung network filesystem
    run_root = tmp_path / "runs"
    proc = subprocess.Popen([SUBMIT, "stage=prepare", "data=folder", f"data.source={src}",
                             "data.val_fraction=0.4", f"run_root={run_root}"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    record = run_root / "digits" / "prepare" / "mlflow_run.json"
    deadline = time.time() + 120
    while not record.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert record.exists(), proc.communicate()
    time.sleep(3)  # let it reach the blocking read
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    run_id = json.loads(record.read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED"
    assert not list((run_root / "digits" / "prepare" / "shards").glob("*.tar"))
