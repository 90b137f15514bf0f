"""`submit stage=prepare` on the embedded digits: real shards, manifest, restarts, MLflow run."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from conftest import submit


def _read_split(shard_dir, split):
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    urls = [str(shard_dir / s["name"]) for s in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_shards_match_manifest_and_labels_round_trip(digits_run):
    shard_dir = digits_run["stage_dir"] / "shards"
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    assert manifest["num_classes"] == 10 and manifest["resolution"] == 32
    assert manifest["class_names"] == [str(i) for i in range(10)]
    digits = load_digits()
    keys = set()
    for split in ("train", "val"):
        samples = _read_split(shard_dir, split)
        entry = manifest["splits"][split]
        assert len(samples) == entry["count"] == sum(s["count"] for s in entry["shards"])
        assert Counter(str(int(s["cls"])) for s in samples) == Counter(
            {k: v for k, v in entry["class_counts"].items()})
        for s in samples:
            index = int(s["__key__"].split("_")[1])
            assert int(s["cls"]) == digits.target[index]  # label round-trips to sklearn's
            meta = json.loads(s["json"])
            assert meta["source"] == f"load_digits[{index}]"
            img = Image.open(io.BytesIO(s["png"]))
            assert img.mode == "RGB" and img.size == (32, 32)
            keys.add(s["__key__"])
    assert len(keys) == 1797  # every digit exactly once, unique keys
    assert manifest["splits"]["val"]["count"] == 360


def test_split_is_stratified_and_shards_mix_classes(digits_run):
    shard_dir = digits_run["stage_dir"] / "shards"
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    val = manifest["splits"]["val"]["class_counts"]
    train = manifest["splits"]["train"]["class_counts"]
    for c in map(str, range(10)):
        assert abs(val[c] / (val[c] + train[c]) - 0.2) < 0.02
    first = json.loads((shard_dir / "train-000000_stats.json").read_text())
    assert len(first["class_counts"]) == 10  # globally shuffled before sharding


def test_images_are_upsampled_digits(digits_run):
    sample = _read_split(digits_run["stage_dir"] / "shards", "val")[0]
    index = int(sample["__key__"].split("_")[1])
    img = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L"), dtype=np.float32)
    small = np.asarray(Image.fromarray(img).resize((8, 8), Image.BOX), dtype=np.float32)
    original = load_digits().images[index] * 255 / 16
    assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.9


def test_stage_dir_has_config_log_and_markers(digits_run):
    sdir = digits_run["stage_dir"]
    cfg = (sdir / "config.yaml").read_text()
    assert "name: prepare" in cfg and f"run_root: {digits_run['run_root']}" in cfg
    shard_dir = sdir / "shards"
    tars = sorted(p.name for p in shard_dir.glob("*.tar"))
    assert tars == [f"train-{i:06d}.tar" for i in range(6)] + [f"val-{i:06d}.tar" for i in range(2)]
    for t in tars:
        stats = json.loads((shard_dir / t.replace(".tar", "_stats.json")).read_text())
        assert stats["bytes"] == (shard_dir / t).stat().st_size
    assert not list(shard_dir.glob("*.tmp-*"))
    out = digits_run["proc"].stdout
    assert str(sdir) in out and "mlflow ui --backend-store-uri sqlite:///" in out
    # what to run next, in a form that can be pasted (the experiment's overrides carried over)
    assert f"next:    submit stage=train_vqvae run_root={digits_run['run_root']}\n" in out, out
    assert any((sdir / "logs").glob("prepare-*.log"))


def test_mlflow_run_has_params_tags_and_artifacts(digits_run):
    run_root = digits_run["run_root"]
    record = json.loads((digits_run["stage_dir"] / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_root / 'mlflow.db'}")
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "prepare"
    assert run.data.params["data.name"] == "digits"
    assert run.data.params["seed"] == "0"
    assert run.data.params["run_root"] == str(run_root)
    assert run.data.metrics["images"] == 1797
    assert client.get_experiment(run.info.experiment_id).name == "digits"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"dataset.json", "logs"} <= artifacts
    assert any(a.path.startswith("samples") for a in client.list_artifacts(run.info.run_id, "samples"))
    # artifacts sit beside the sqlite store, under run_root
    assert str(run_root / "mlartifacts") in run.info.artifact_uri


def test_an_array_task_that_completes_the_stage_logs_its_totals_to_the_stage_s_run(tmp_path, monkeypatch,
                                                                                   stage_jobs_in_this_process):
    """Only array task 0 opens the stage's MLflow run; when another task ends last and completes the
    shards, the stage's totals, manifest and grid go to that run (they went nowhere: the run showed
    task 0's share as "images", without dataset.json). Two tasks of the launch layer's StageJob, in
    the order SLURM often ends them: task 0 first."""
    from pipeline.config import compose
    from pipeline.launch.jobs import StageJob

    monkeypatch.chdir(tmp_path)
    run_root = tmp_path / "runs"
    cfg = compose(["stage=prepare", f"run_root={run_root}", "data.shard_size=300"])
    first = StageJob(cfg, "prepare", 0, 2)()
    assert not first["complete"] and "images" not in first
    last = StageJob(cfg, "prepare", 1, 2)()
    assert last["complete"] and last["images"] == 1797 and last["run_id"] == first["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_root / 'mlflow.db'}")
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"  # task 0's to set, not reopened
    assert run.data.metrics["images"] == 1797 and run.data.metrics["images_skipped"] == 0
    assert run.data.metrics["images_written"] == first["images_written"]  # task 0's own work stays its
    assert "dataset.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/train_per_class.png"]
    # the progress ends at the end, not where task 0 left it (4 of 7 shards)
    progress = max(client.get_metric_history(run.info.run_id, "progress/fraction"), key=lambda m: m.step)
    assert progress.value == 1.0
    logs = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, "logs")}
    assert {f"{Path(r['log']).name}" for r in (first, last)} <= logs, logs
    done = json.loads((run_root / "digits" / "prepare" / "done.json").read_text())
    assert done["run_id"] == run.info.run_id and done["summary"]["images"] == 1797


def test_rerun_skips_everything_and_resumes_the_same_run(tmp_path):
    run_root = tmp_path / "runs"
    first = submit("stage=prepare", f"run_root={run_root}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    shard_dir = run_root / "digits" / "prepare" / "shards"
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    run_id = json.loads((shard_dir.parent / "mlflow_run.json").read_text())["run_id"]

    second = submit("stage=prepare", f"run_root={run_root}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "already complete: nothing to write" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == mtimes
    assert json.loads((shard_dir.parent / "mlflow_run.json").read_text())["run_id"] == run_id

    # An interrupted write: a marker lost and a temp file left behind. Only that shard is redone.
    (shard_dir / "train-000003_stats.json").unlink()
    (shard_dir / "train-000003.tar.tmp-host-123").write_bytes(b"partial")
    third = submit("stage=prepare", f"run_root={run_root}", "data.val_fraction=0.2", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "1 of 8 shards to write" in third.stdout
    assert not list(shard_dir.glob("*.tmp-*"))
    changed = {n for n, t in mtimes.items() if (shard_dir / n).stat().st_mtime_ns != t}
    # the manifest did not change, so it was not rewritten either
    assert changed == {"train-000003.tar", "train-000003_stats.json"}

    client = MlflowClient(tracking_uri=f"sqlite:///{run_root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # appended to, never duplicated
    history = client.get_metric_history(run_id, "shards_written")
    assert sorted((m.step, m.value) for m in history) == [(0, 8.0), (1, 0.0), (2, 1.0)]
    assert runs[0].data.tags["executions"] == "3"
    # each execution's line: when, and which process (here: a local submit) on which host
    tags = runs[0].data.tags
    assert [k for k in sorted(tags) if k.startswith("execution.")] == ["execution.1", "execution.2", "execution.3"]
    assert " local process " in tags["execution.3"] and tags["execution.3"].endswith(f" on {tags['host']}")
    assert tags["log_file"].startswith(str(run_root / "digits" / "prepare" / "logs"))


def test_changed_plan_is_refused_and_marks_the_run_failed(tmp_path):
    run_root = tmp_path / "runs"
    assert submit("stage=prepare", f"run_root={run_root}", cwd=tmp_path).returncode == 0
    shard_dir = run_root / "digits" / "prepare" / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    done = shard_dir.parent / "done.json"
    proc = submit("stage=prepare", f"run_root={run_root}", "data.shard_size=100", cwd=tmp_path)
    assert proc.returncode == 2 and "(data.shard_size=256 there, 100 now)" in proc.stderr, proc.stderr
    assert done.exists()  # done: refused before the job starts, run and marker as they were
    done.unlink()  # e.g. a rerun stopped before it finished: the job itself refuses the other plan
    proc = submit("stage=prepare", f"run_root={run_root}", "data.shard_size=100", cwd=tmp_path)
    assert proc.returncode == 1
    assert "another shard plan" in proc.stderr and "experiment=" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == before
    run_id = json.loads((shard_dir.parent / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(tracking_uri=f"sqlite:///{run_root / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FAILED"
    assert "PlanMismatch" in run.data.tags["error"]
    assert run.data.params["data.shard_size"] == "256"  # the param was not re-logged...
    assert run.data.tags["changed.data.shard_size"] == "256 -> 100"  # ...the change is a tag


def test_progress_of_the_shards_is_logged_to_mlflow_while_they_are_written(tmp_path):
    run_root = tmp_path / "runs"
    proc = submit("stage=prepare", f"run_root={run_root}", "tracking.progress_every_s=0.05", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = json.loads((run_root / "digits" / "prepare" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_root / 'mlflow.db'}")
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "progress/shards_complete"))
    steps, done = [s for s, _ in history], [v for _, v in history]
    # points while writing, then the last one at the end: every shard of the 8
    assert len(history) >= 2 and done == sorted(done) and done[-1] == 8 and done[0] < 8, history
    assert steps == sorted(set(steps))  # seconds since the run started
    assert client.get_run(run_id).data.metrics["progress/fraction"] == 1.0
    assert client.get_metric_history(run_id, "progress/shards_per_min")
