"""`submit stage=sample`: class-conditional samples from the trained priors, decoded, as image shards
that are reproducible however the work is split, restartable, and refused under changed settings."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import webdataset as wds
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import PRIOR_STAGES as STAGES
from conftest import copy_stages, save_changed_model, submit
from pipeline import atomic
from pipeline.config import ConfigError, compose, stage_dir
from pipeline.config_checks import validate
from pipeline.data import shards
from pipeline.launch import records
from pipeline.launch.jobs import StageJob
from pipeline.launch.chain import compose_all
from pipeline.stages import StageContext, sample
from pipeline.tracking import StageRun

ARGS = ["sample.per_class=6", "sample.shard_size=16", "sample.batch_size=16"]


@pytest.fixture
def experiment(priors, tmp_path):
    return copy_stages(priors, tmp_path / "runs", *STAGES)


def _samples(shard_dir):
    urls = shards.shard_urls(shard_dir, "samples")
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_samples_every_class_into_shards_logs_a_grid_and_a_rerun_skips(experiment, tmp_path):
    proc = submit("stage=sample", f"run_root={experiment}", *ARGS, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # evaluate's inputs all exist now; sample.* is this stage's own and is not carried over
    assert proc.stdout.rstrip().endswith(f"next:    submit stage=evaluate run_root={experiment}"), proc.stdout[-500:]
    out = experiment / "digits" / "sample" / "shards"
    manifest = shards.read_manifest(out)
    entry = manifest["splits"]["samples"]
    assert entry["count"] == 60 and len(entry["shards"]) == 4
    assert entry["class_counts"] == {str(c): 6 for c in range(10)}
    assert manifest["resolution"] == 32 and manifest["num_classes"] == 10
    # the models that drew them: evaluate keys its caches by this manifest
    models = {k: atomic.file_digest(experiment / "digits" / k / "model.pt")[:16]
              for k in ("train_vqvae", "train_top_prior", "train_bottom_prior")}
    assert manifest["models"] == models
    drawn = _samples(out)
    assert len(drawn) == 60
    pixels = []
    for s in drawn.values():
        img = Image.open(io.BytesIO(s["png"]))
        assert img.size == (32, 32) and img.mode == "RGB"
        meta = json.loads(s["json"])
        assert meta["class"] == int(s["cls"]) and meta["temperature"] == 0.7 and meta["seed"] == 0
        pixels.append(np.asarray(img, dtype=np.float32))
    assert np.std(np.stack(pixels), axis=0).mean() > 5  # samples differ from each other

    record = json.loads((experiment / "digits" / "sample" / "mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{experiment / 'mlflow.db'}")
    assert "samples_per_class.png" in {a.path for a in client.list_artifacts(record["run_id"])}
    assert client.get_run(record["run_id"]).data.metrics["samples"] == 60
    # what `submit status` counts while it runs: the plan's shards, and their completion markers
    assert records.progress_line(experiment / "digits" / "sample").startswith("shards 4 of 4 (100%)")

    again = submit("stage=sample", f"run_root={experiment}", *ARGS, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "0 of 4 shards of this task to write" in again.stdout

    # a run_root moved elsewhere, its models' mtimes changed by the copy, still counts as finished
    moved = experiment.rename(tmp_path / "moved")
    for stage in ("train_vqvae", "train_top_prior", "train_bottom_prior"):
        (moved / "digits" / stage / "model.pt").touch()
    again = submit("stage=sample", f"run_root={moved}", *ARGS, cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and "0 of 4 shards of this task to write" in again.stdout, again.stderr[-3000:]
    out = moved / "digits" / "sample" / "shards"

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    done = out.parent / "done.json"
    early = submit("stage=sample", f"run_root={moved}", *ARGS, "sample.batch_size=8", cwd=tmp_path)
    assert early.returncode == 2 and "(sample.batch_size=16 there, 8 now)" in early.stderr, early.stderr
    assert done.exists()  # done: refused before the job starts
    done.unlink()  # not marked done (e.g. a rerun stopped early): the job compares the shards' settings
    # refused, naming what differs (a batch size changes the draws too)
    for setting, named in (("sample.temperature=0.5", "sample.temperature 0.7 there, 0.5 now"),
                           ("sample.batch_size=8", "sample.batch_size 16 there, 8 now"),
                           ("sample.per_class=5", "another plan of which samples go where")):
        changed = submit("stage=sample", f"run_root={moved}", *ARGS, setting, cwd=tmp_path)
        assert changed.returncode == 1 and "OutputsMadeOtherwise" in changed.stderr, setting
        assert "other sampling settings" in changed.stderr, setting
        assert named in changed.stderr and changed.stderr.count(" there, ") == named.count(" there, "), changed.stderr
        assert "draw these beside them with sample_set=<name>" in changed.stderr  # without retraining
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    assert records.progress_line(moved / "digits" / "sample").startswith("shards 4 of 4 (100%)")  # nor the total

    # shards of a version that recorded no settings (nor the batch size): refused, saying how to redraw
    stats_file = out / "samples-000000_stats.json"
    stats = json.loads(stats_file.read_text())
    del stats["made_with"]
    stats_file.write_text(json.dumps({**stats, "plan": "0123456789abcdef"}))
    old = submit("stage=sample", f"run_root={moved}", *ARGS, cwd=tmp_path)
    assert old.returncode == 1 and f"move {out.parent} away to draw again" in old.stderr, old.stderr[-2000:]


def test_verify_rereads_the_sample_shards(experiment, tmp_path):
    early = submit("stage=sample", f"run_root={experiment}", *ARGS, "verify=true", cwd=tmp_path)
    assert early.returncode == 1 and "stage=sample has not finished" in early.stderr, early.stderr[-2000:]
    assert submit("stage=sample", f"run_root={experiment}", *ARGS, cwd=tmp_path, timeout=600).returncode == 0
    ok = submit("stage=sample", f"run_root={experiment}", *ARGS, "verify=true", cwd=tmp_path)
    assert ok.returncode == 0 and "verify: 60 samples" in ok.stdout, ok.stderr[-2000:]
    gone = experiment / "digits" / "sample" / "shards" / "samples-000002.tar"
    gone.unlink()
    broken = submit("stage=sample", f"run_root={experiment}", *ARGS, "verify=true", cwd=tmp_path)
    assert broken.returncode == 1, broken.stderr[-2000:]
    assert f"{gone}: missing -- rerun `submit stage=sample` to rewrite it" in broken.stderr


def test_array_tasks_draw_the_same_samples_as_one_job(experiment, priors, tmp_path, stage_jobs_in_this_process):
    args = [*ARGS, "sample.classes=[1,7]", "sample.shard_size=5"]  # 12 samples: shards of 5, 5, 2
    one = submit("stage=sample", f"run_root={experiment}", *args, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    split_root = copy_stages(priors, tmp_path / "split", *STAGES)
    cfg = compose(["stage=sample", f"run_root={split_root}", *args])
    sdir = split_root / "digits" / "sample"
    # the launch layer's two tasks, task 0 (shards 0 and 2) ending first: task 1 completes the stage
    first = StageJob(cfg, "sample", 0, 2)()
    assert not first["complete"] and first["shards_written"] == 2 and first["samples_drawn"] == 7
    second = StageJob(cfg, "sample", 1, 2)()
    assert second["complete"] and second["shards_written"] == 1 and second["samples_drawn"] == 5
    # ... and logs the total and the grid to the run task 0 opened
    client = MlflowClient(f"sqlite:///{split_root / 'mlflow.db'}")
    run = client.get_run(first["run_id"])
    assert run.data.metrics["samples"] == 12 and run.info.status == "FINISHED"
    assert {"dataset.json", "samples_per_class.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    a = _samples(experiment / "digits" / "sample" / "shards")
    b = _samples(sdir / "shards")
    assert a.keys() == b.keys() and {int(s["cls"]) for s in a.values()} == {1, 7}
    assert all(a[k]["png"] == b[k]["png"] for k in a)  # seeded per shard: the split changes nothing


def test_sample_seed_draws_what_the_global_seed_would_and_only_sampling_sees_it(experiment, tmp_path):
    drawn = {}
    for name, overrides in (("a", []), ("b", ["sample.seed=1"]), ("c", ["seed=1"])):
        cfg = compose(["stage=sample", f"run_root={experiment}", *ARGS, "sample.classes=[1,7]", f"sample_set={name}",
                       *overrides])
        sdir = stage_dir(cfg, "sample")
        sdir.mkdir(parents=True)
        sample.run(cfg, StageContext("sample", sdir, StageRun(cfg, "sample", sdir), logging.getLogger("test")))
        drawn[name] = {k: v["png"] for k, v in _samples(sdir / "shards").items()}
        assert shards.read_manifest(sdir / "shards")["sampling"]["seed"] == (1 if overrides else 0)
    assert drawn["b"] == drawn["c"]  # sample.seed=1 draws exactly what seed=1 draws
    assert sum(drawn["a"][k] != drawn["b"][k] for k in drawn["a"]) >= len(drawn["a"]) - 1  # another draw
    # the evaluation's seed (its classifiers, FID features) is not the samples' one
    cfgs = compose_all(["sample.seed=1"])
    assert cfgs["sample"].sample.seed == 1 and cfgs["sample"].seed == cfgs["evaluate"].seed == 0
    with pytest.raises(ConfigError, match="sample.seed=x: must be an integer or null"):
        validate(compose(["stage=sample", "sample.seed=x"]))


def test_a_vqvae_other_than_the_one_the_priors_learned_is_refused(experiment, tmp_path):
    path = experiment / "digits" / "train_vqvae" / "model.pt"
    save_changed_model(path, path)  # a retrained or swapped VQ-VAE: its codes mean something else
    proc = submit("stage=sample", f"run_root={experiment}", *ARGS, cwd=tmp_path)
    assert proc.returncode == 1 and "another VQ-VAE" in proc.stderr, proc.stderr[-3000:]
    assert not list((experiment / "digits" / "sample").glob("shards/*.tar"))
