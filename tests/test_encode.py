"""`submit stage=encode`: code shards that match the image shards key for key."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from mlflow.tracking import MlflowClient

from conftest import copy_stages, save_changed_model, submit
from pipeline import atomic
from pipeline.config import compose
from pipeline.data import codes, shards
from pipeline.data.streams import ordered_batches
from pipeline.launch.jobs import StageJob
from pipeline.models import load_exported
from pipeline.stages import missing_inputs, vqvae_model


@pytest.fixture
def experiment(trained, tmp_path):
    return copy_stages(trained, tmp_path / "runs", "prepare", "train_vqvae")


def _samples(urls):
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_every_image_gets_codes_that_decode_to_its_reconstruction(experiment, tmp_path):
    proc = submit("stage=encode", f"run_root={experiment}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    image_dir = experiment / "digits" / "prepare" / "shards"
    code_dir = experiment / "digits" / "encode" / "shards"
    manifest = codes.read_manifest(code_dir)
    assert (manifest["top_size"], manifest["bottom_size"], manifest["codebook_size_top"]) == (4, 8, 32)
    model, _ = load_exported(experiment / "digits" / "train_vqvae" / "model.pt")
    for split in ("train", "val"):
        image_urls = [str(image_dir / s["name"]) for s in json.loads((image_dir / "dataset.json").read_text())
                      ["splits"][split]["shards"]]
        images = _samples(image_urls)
        coded = _samples(codes.shard_urls(code_dir, split))
        assert coded.keys() == images.keys() and manifest["splits"][split]["skipped"] == 0
        assert all(int(coded[k]["cls"]) == int(images[k]["cls"]) for k in coded)
        top = codes.load_npy(next(iter(coded.values()))["top.npy"])
        assert top.dtype == np.uint8 and top.shape == (4, 4)
    # decoding a stored code pair gives the VQ-VAE's eval reconstruction of that image
    batch = next(b for b in ordered_batches(image_urls[:1], batch_size=8, resolution=32, augment="none",
                                            num_workers=0) if "image" in b)
    with torch.no_grad():
        recon, _ = model(batch["image"])
        t = torch.stack([torch.from_numpy(codes.load_npy(coded[k]["top.npy"]).astype(np.int64)) for k in batch["key"]])
        b = torch.stack([torch.from_numpy(codes.load_npy(coded[k]["bottom.npy"]).astype(np.int64)) for k in batch["key"]])
        assert torch.allclose(model.decode_codes(t, b), recon, atol=1e-5)

    again = submit("stage=encode", f"run_root={experiment}", cwd=tmp_path)
    assert again.returncode == 0 and "0 of 8 shards of this task to write" in again.stdout


def test_array_tasks_cover_every_shard_once_and_corrupt_images_are_accounted(experiment, stage_jobs_in_this_process):
    shard = experiment / "digits" / "prepare" / "shards" / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated image shard
    cfg = compose(["stage=encode", f"run_root={experiment}"])
    sdir = experiment / "digits" / "encode"
    # the launch layer's two tasks, task 0 ending first: task 1 completes the stage
    first = StageJob(cfg, "encode", 0, 2)()
    assert not first["complete"] and not (sdir / "shards" / codes.MANIFEST).exists()
    assert first["shards"] == 4 and "codes" not in first
    second = StageJob(cfg, "encode", 1, 2)()
    assert second["complete"] and first["shards_written"] + second["shards_written"] == 8
    manifest = codes.read_manifest(sdir / "shards")
    skipped = manifest["splits"]["train"]["skipped"]
    assert 0 < skipped < 256 and second["skipped"] == skipped
    assert manifest["splits"]["train"]["count"] + skipped == 1437
    # ... and logs the stage's totals and manifest to the run task 0 opened
    client = MlflowClient(f"sqlite:///{experiment / 'mlflow.db'}")
    run = client.get_run(first["run_id"])
    codes_total = manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]
    assert (run.data.metrics["codes"], run.data.metrics["skipped"]) == (codes_total, skipped)
    assert codes.MANIFEST in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert json.loads((sdir / "done.json").read_text())["run_id"] == run.info.run_id == second["run_id"]


def test_a_missing_manifest_names_the_stage_that_writes_it_and_an_unchanged_one_is_not_rewritten(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"codes\.json: no shard manifest; run `submit stage=encode`"):
        codes.shard_urls(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"dataset\.json: no shard manifest; run `submit stage=sample`"):
        shards.read_manifest(tmp_path, made_by="sample")
    with pytest.raises(FileNotFoundError, match=r"run `submit stage=sample`"):  # verify=true on a sample set
        shards.verify(tmp_path, stage="sample")
    manifest = {"splits": {"train": {"shards": [{"name": "train-000000.tar", "count": 3}]}}}
    shards.write_manifest(tmp_path, manifest, codes.MANIFEST)
    assert codes.shard_urls(tmp_path, "train") == [str(tmp_path / "train-000000.tar")]
    with pytest.raises(KeyError, match=r"split 'val' not in .*codes\.json; have \['train'\]"):
        codes.shard_urls(tmp_path, "val")
    # a rerun, or a second array task completing the set, leaves the same manifest as it is ...
    path = tmp_path / codes.MANIFEST
    inode = path.stat().st_ino
    shards.write_manifest(tmp_path, json.loads(path.read_text()), codes.MANIFEST)
    assert path.stat().st_ino == inode
    # ... and replaces a changed one whole (temp + rename)
    manifest["splits"]["val"] = {"shards": []}
    shards.write_manifest(tmp_path, manifest, codes.MANIFEST)
    assert path.stat().st_ino != inode and codes.read_manifest(tmp_path) == manifest


def test_verify_rereads_every_code_shard_and_names_each_bad_one_with_its_fix(experiment, tmp_path):
    assert submit("stage=encode", f"run_root={experiment}", cwd=tmp_path).returncode == 0
    sdir = experiment / "digits" / "encode"
    code_dir = sdir / "shards"
    kept = {name: (sdir / name).read_text() for name in ("done.json", "command.json")}
    ok = submit("stage=encode", f"run_root={experiment}", "verify=true", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "verify: 1797 samples" in ok.stdout and "match the manifest" in ok.stdout, ok.stdout[-2000:]
    # a verify produces nothing: the stage's record of its last run and resume command stay
    assert {name: (sdir / name).read_text() for name in kept} == kept

    names = [s["name"] for s in codes.read_manifest(code_dir)["splits"]["train"]["shards"]]
    bad, truncated = code_dir / names[0], code_dir / names[1]
    samples = list(wds.WebDataset(str(bad), shardshuffle=False, empty_check=False))
    key = samples[3]["__key__"]
    samples[3]["top.npy"] = codes.npy_bytes(np.full((4, 4), 40, np.uint8))  # the top codebook has 32
    with wds.TarWriter(str(bad)) as sink:
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if k != "__url__"})
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    broken = submit("stage=encode", f"run_root={experiment}", "verify=true", cwd=tmp_path)
    out = broken.stdout + broken.stderr
    assert broken.returncode == 1 and "verify found 2 problem(s)" in out, out[-3000:]
    assert (f"{bad}: sample {key}: top.npy holds codes up to 40, the codebook has 32 -- delete it and its "
            "_stats.json, then rerun `submit stage=encode` to rewrite it") in out, out[-3000:]
    assert f"{truncated}: unreadable after" in out
    # array task 1 of 2 reads shards 1, 3, ...: only the truncated one
    total, problems = codes.verify(code_dir, task=1, tasks=2)
    assert len(problems) == 1 and problems[0].startswith(f"{truncated}: unreadable"), problems

    for name in names[:2]:  # the fix it names
        (code_dir / name).unlink()
        (code_dir / name.replace(".tar", "_stats.json")).unlink()
    assert submit("stage=encode", f"run_root={experiment}", cwd=tmp_path).returncode == 0
    assert submit("stage=encode", f"run_root={experiment}", "verify=true", cwd=tmp_path).returncode == 0


def test_hflip_adds_mirrored_train_codes_and_a_changed_setting_is_refused(experiment, tmp_path):
    proc = submit("stage=encode", f"run_root={experiment}", "encode.hflip=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code_dir = experiment / "digits" / "encode" / "shards"
    manifest = codes.read_manifest(code_dir)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["count"] == 2 * train["images"] and train["images"] + val["images"] == 1797
    assert val["count"] == val["images"] and train["hflip"] and not val["hflip"]

    model, _ = load_exported(experiment / "digits" / "train_vqvae" / "model.pt")
    image_url = str(experiment / "digits" / "prepare" / "shards" / manifest["splits"]["train"]["shards"][0]["name"])
    coded = _samples([str(code_dir / manifest["splits"]["train"]["shards"][0]["name"])])
    batch = next(b for b in ordered_batches([image_url], batch_size=4, resolution=32, augment="none",
                                            num_workers=0) if "image" in b)
    with torch.no_grad():
        top, bottom = model.encode(batch["image"].flip(-1))
    for i, key in enumerate(batch["key"]):
        flipped = coded[key + "_flip"]
        assert json.loads(flipped["json"]) == {"source_key": key, "hflip": True}
        assert np.array_equal(codes.load_npy(flipped["top.npy"]), top[i].numpy())
        assert np.array_equal(codes.load_npy(flipped["bottom.npy"]), bottom[i].numpy())

    before = {p.name: p.stat().st_mtime_ns for p in code_dir.iterdir()}
    refused = submit("stage=encode", f"run_root={experiment}", "encode.hflip=false", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr  # done: refused before the job starts
    assert "stage=encode: is done, with other settings (encode.hflip=True there, False now)" in refused.stderr
    (code_dir.parent / "done.json").unlink()  # e.g. a rerun stopped before it finished: the job refuses
    refused = submit("stage=encode", f"run_root={experiment}", "encode.hflip=false", cwd=tmp_path)
    assert refused.returncode == 1 and "OutputsMadeOtherwise: encode.hflip" in refused.stderr
    assert "hflip=True" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in code_dir.iterdir()} == before  # nothing rewritten


def test_a_named_vqvae_is_recorded_and_used_downstream_and_another_is_refused(experiment, tmp_path):
    own = experiment / "digits" / "train_vqvae"
    named = tmp_path / "elsewhere" / "model.pt"  # e.g. a VQ-VAE trained in another experiment
    named.parent.mkdir()
    shutil.move(own / "model.pt", named)
    shutil.rmtree(own)
    proc = submit("stage=encode", f"run_root={experiment}", f"encode.vqvae={named}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code_dir = experiment / "digits" / "encode" / "shards"
    manifest, sha = codes.read_manifest(code_dir), atomic.file_digest(named)
    assert manifest["vqvae_external"] == str(named.resolve()) and manifest["vqvae_sha256"] == sha
    assert all(json.loads(p.read_text())["vqvae_sha256"] == sha for p in code_dir.glob("*_stats.json"))
    # later stages (whose configs have no encode.vqvae) find it through codes.json
    for stage in ("train_top_prior", "sample", "evaluate"):
        assert vqvae_model(compose([f"stage={stage}", f"run_root={experiment}"])) == named.resolve(), stage
    missing = missing_inputs(compose(["stage=sample", f"run_root={experiment}"]), "sample")
    assert [s for s, _ in missing] == ["train_top_prior", "train_bottom_prior"], missing
    status = submit("status", f"run_root={experiment}", cwd=tmp_path)
    assert re.search(r"^train_vqvae\s+not needed", status.stdout, re.M), status.stdout
    # what can run now: both priors (their codes exist), not the VQ-VAE that is not needed; the
    # commands carry encode's experiment-wide overrides (run_root), not its own (encode.vqvae)
    ready = status.stdout.split("can run now")[1].splitlines()[1:]
    assert ready == [f"  submit stage={p} run_root={experiment}" for p in ("train_top_prior", "train_bottom_prior")], \
        status.stdout
    elsewhere = submit("status", f"run_root={experiment}", cwd=experiment)  # run_root could be relative there
    assert f"  cd {tmp_path} && submit stage=train_top_prior run_root={experiment}\n" in elsewhere.stdout, elsewhere.stdout

    other = save_changed_model(named, tmp_path / "other.pt")
    before = {p.name: p.stat().st_mtime_ns for p in code_dir.iterdir()}
    refused = submit("stage=encode", f"run_root={experiment}", f"encode.vqvae={other}", cwd=tmp_path)
    assert refused.returncode == 2 and f"(encode.vqvae={named} there, {other} now)" in refused.stderr, refused.stderr
    (code_dir.parent / "done.json").unlink()  # not marked done (a rerun stopped): the job compares the models
    refused = submit("stage=encode", f"run_root={experiment}", f"encode.vqvae={other}", cwd=tmp_path)
    assert refused.returncode == 1 and "OutputsMadeOtherwise: encode.vqvae" in refused.stderr
    assert "another VQ-VAE" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in code_dir.iterdir()} == before  # nothing rewritten
