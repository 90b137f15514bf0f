"""The README's first command in miniature: `submit stage=all` on the local executor runs every
stage of the embedded default, ends with the summary table, and a second call redoes nothing."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import yaml
from conftest import submit
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.launch import chain
from pipeline.stages import BUILT

# the default chain, only shorter: every stage runs, on the same data and presets
SMALL = ["train.max_steps=40", "train.warmup_steps=5", "train.eval_every=40", "train.ckpt_every=40",
         "train.log_every=10", "train.eval_samples=64", "deepspeed.micro_batch=32", "sample.per_class=6",
         "sample.batch_size=60"]


def test_stage_all_runs_the_embedded_default_and_ends_with_a_summary(tmp_path):
    proc = submit("stage=all", *SMALL, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "runs" / "digits"
    out = proc.stdout[proc.stdout.index("stage=all finished"):]

    # every stage: a summary row with its wall time, key metric and outputs, and a done.json
    metric = {
        "prepare": r"1797 images, 0 skipped",
        "train_vqvae": r"val PSNR \d+\.\d dB",
        "encode": r"1797 code maps",
        "train_top_prior": r"val \d\.\d{3} bits/code",
        "train_bottom_prior": r"val \d\.\d{3} bits/code",
        "sample": r"60 samples",
        "evaluate": r"FID [\d.e+-]+ \(\d+\.\d\dx real\), CAS 0\.\d{3} \(\d+\.\d\dx real\)",
    }
    assert set(metric) == set(BUILT)
    for stage, pattern in metric.items():
        assert re.search(rf"^\s+{stage}\s+(\d+ min )?\d+ s\s+{pattern}\s+{re.escape(str(exp / stage))}$", out, re.M), out
        assert (exp / stage / "done.json").exists() and (exp / stage / "config.yaml").exists()
    assert re.search(r"^\s+total\s+(\d+ min )?\d+ s$", out, re.M), out
    assert f"report:  {exp / 'evaluate' / 'report.md'}" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" in out

    # each stage's outputs and its MLflow run with the metrics the README names
    for stage in ("train_vqvae", "train_top_prior", "train_bottom_prior"):
        assert (exp / stage / "model.pt").stat().st_size > 0
    assert json.loads((exp / "encode" / "shards" / "codes.json").read_text())["splits"]["train"]["count"] > 1000
    results = json.loads((exp / "evaluate" / "results.json").read_text())["results"]
    for key in ("recon/psnr", "recon/usage_top", "recon/usage_bottom", "fid", "real_train/fid", "fid/vs_real_train",
                "cas/top1", "real/top1", "cas/vs_real"):
        assert key in results and results[key] == results[key], key  # present and not NaN
    assert 0 < results["recon/usage_top"] <= 1 and 0 < results["recon/usage_bottom"] <= 1
    assert abs(results["fid/vs_real_train"] - results["fid"] / results["real_train/fid"]) < 1e-9
    db = sqlite3.connect(tmp_path / "runs" / "mlflow.db")
    runs = dict(db.execute("select name, status from runs").fetchall())
    assert {runs[s] for s in BUILT} == {"FINISHED"}, runs
    logged = {k for (k,) in db.execute("select distinct key from metrics")}
    assert {"val_psnr", "val_bits_per_code", "fid", "cas/top1", "recon/usage_bottom"} <= logged, logged
    db.close()

    # again: nothing is redone, the table reads the stages' recorded metrics
    again = submit("stage=all", *SMALL, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for stage, pattern in metric.items():
        assert re.search(rf"^\s+{stage}\s+done before\s+{pattern}\s", again.stdout, re.M), again.stdout
    db = sqlite3.connect(tmp_path / "runs" / "mlflow.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == len(runs)
    db.close()
    assert "with other settings" not in again.stderr
    # other settings for done stages: not run again, and said so (they would go unused without a word),
    # each at the stage whose outputs depend on it
    other = submit("stage=all", *SMALL, "sample.temperature=0.9", "model.top_prior.layers=7", cwd=tmp_path,
                   timeout=300)
    assert other.returncode == 0, other.stderr[-2000:]
    assert all(re.search(rf"^\s+{stage}\s+done before\s", other.stdout, re.M) for stage in metric), other.stdout
    warning = other.stderr[other.stderr.index("warning: stages done before with other settings"):].splitlines()
    assert warning[1:4] == ["  train_top_prior: model.top_prior.layers=6 there, 7 now",
                            "  sample: sample.temperature=0.7 there, 0.9 now",
                            "  to run them with these settings: experiment=<a new name>, or sample_set=<a name> for "
                            "sample and evaluate settings"], other.stderr
    # the done sample alone, with another temperature: refused before anything is touched (the job used
    # to un-mark it done, mark its MLflow run failed, then fail on its own shards); the same settings
    # and a sampler giving identical samples are not other settings
    kept = {p: p.read_bytes() for p in (exp / "sample").iterdir() if p.is_file()}
    alone = submit("stage=sample", *[o for o in SMALL if o.startswith("sample.")], "sample.temperature=0.9",
                   "sample.method=naive", cwd=tmp_path)
    assert alone.returncode == 2, alone.stdout[-2000:] + alone.stderr[-2000:]
    assert ("submit: error: stage=sample: is done, with other settings (sample.temperature=0.7 there, 0.9 now), "
            "and finished outputs are never overwritten -- pass the values it ran with, or sample_set=<name> to "
            "draw another set beside it") in alone.stderr, alone.stderr
    assert {p: p.read_bytes() for p in (exp / "sample").iterdir() if p.is_file()} == kept

    # another set of samples from the same priors: only sample and evaluate run, into their own dirs
    before = {p: p.stat().st_mtime_ns for p in (exp / "sample" / "shards").iterdir()}
    # another temperature and another draw (sample.seed): the evaluation keeps the global seed
    hot = submit("stage=all", *SMALL, "sample_set=hot", "sample.temperature=1.0", "sample.seed=1", cwd=tmp_path,
                 timeout=600)
    assert hot.returncode == 0, hot.stdout[-3000:] + hot.stderr[-3000:]
    assert "with other settings" not in hot.stderr  # the sample settings are the new set's own
    for stage in ("prepare", "train_vqvae", "encode", "train_top_prior", "train_bottom_prior"):
        assert re.search(rf"^\s+{stage}\s+done before\s+{metric[stage]}\s+{re.escape(str(exp / stage))}$",
                         hot.stdout, re.M), hot.stdout
    for stage in ("sample", "evaluate"):
        assert re.search(rf"^\s+{stage}-hot\s+(\d+ min )?\d+ s\s+{metric[stage]}\s+{re.escape(str(exp / stage))}-hot$",
                         hot.stdout, re.M), hot.stdout
    assert {p: p.stat().st_mtime_ns for p in (exp / "sample" / "shards").iterdir()} == before
    assert f"report:  {exp / 'evaluate-hot' / 'report.md'}" in hot.stdout
    assert json.loads((exp / "sample-hot" / "shards" / "dataset.json").read_text())["sampling"]["temperature"] == 1.0
    assert "Samples evaluated: sample-hot/ (temperature 1.0, top-k off, top-p off, seed 1)." in \
        (exp / "evaluate-hot" / "report.md").read_text()
    assert "Samples evaluated: sample/ (temperature 0.7," in (exp / "evaluate" / "report.md").read_text()
    hot_results = json.loads((exp / "evaluate-hot" / "results.json").read_text())["results"]
    # the real-data classifier does not depend on the samples: the first set's is used, not retrained
    first = exp / "evaluate" / "classifier_real" / "model.pt"
    assert f"classifier_real: reusing the trained classifier {first} (same data and recipe)" in hot.stdout + hot.stderr
    assert not (exp / "evaluate-hot" / "classifier_real").exists() and (exp / "evaluate-hot" / "classifier_samples").is_dir()
    assert hot_results["real/top1"] == results["real/top1"]
    assert "reconstructed" not in hot.stdout + hot.stderr and not (exp / "evaluate-hot" / "reconstructions").exists()
    assert hot_results["recon/psnr"] == results["recon/psnr"]
    db = sqlite3.connect(tmp_path / "runs" / "mlflow.db")
    named = dict(db.execute("select r.name, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                            "where t.key = 'sample_set' and r.status = 'FINISHED'").fetchall())
    db.close()
    assert named == {"sample-hot": "hot", "evaluate-hot": "hot"}
    db = sqlite3.connect(tmp_path / "runs" / "mlflow.db")
    drawn = dict(db.execute("select r.name, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                            "where t.key = 'sampling.temperature'").fetchall())
    db.close()
    assert drawn == {"evaluate": "0.7", "evaluate-hot": "1.0"}  # the UI can set the sets side by side

    # `submit status` sets the two side by side; a set not drawn yet is named in the refusal's fix
    status = submit("status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "can run now" not in status.stdout  # every stage done: nothing to run
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[-2:]}
    assert rows["(default)"][1:5] == ["0.7", "0", "1.0", "0"] and rows["hot"][1:5] == ["1.0", "0", "1.0", "1"]
    assert rows["hot"][8:10] == [f"{hot_results['precision']:.3f}", f"{hot_results['recall']:.3f}"], status.stdout
    hot_status = submit("status", "sample_set=hot", cwd=tmp_path).stdout
    assert re.search(r"^sample-hot\s+done\s", hot_status, re.M) and re.search(r"^evaluate-hot\s+done\s", hot_status, re.M)
    cold = submit("stage=evaluate", "sample_set=cold", cwd=tmp_path)
    assert cold.returncode == 2 and str(exp / "sample-cold" / "shards" / "dataset.json") in cold.stderr
    assert "`submit stage=sample sample_set=cold` first" in cold.stderr, cold.stderr
    # the global seed does not reach a set drawn with its own sample.seed: not another setting of it
    # (it was: "seed=0 there, 5 now"); without sample.seed it does
    drawn_hot = {p: p.stat().st_mtime_ns for p in (exp / "sample-hot" / "shards").iterdir()}
    own = [o for o in SMALL if o.startswith("sample.")] + ["sample_set=hot", "sample.temperature=1.0"]
    reseeded = submit("stage=sample", *own, "sample.seed=1", "seed=5", cwd=tmp_path)
    assert reseeded.returncode == 0, reseeded.stdout[-2000:] + reseeded.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (exp / "sample-hot" / "shards").iterdir()} == drawn_hot
    unseeded = submit("stage=sample", *own, "seed=5", cwd=tmp_path)
    assert unseeded.returncode == 2 and "(sample.seed=1 there, None now)" in unseeded.stderr, unseeded.stderr


def test_a_named_vqvae_makes_train_vqvae_not_needed(tmp_path):
    named = tmp_path / "vqvae.pt"
    named.write_bytes(b"")  # only its existence is checked before the chain starts
    cfgs = chain.compose_all([f"run_root={tmp_path / 'runs'}", f"encode.vqvae={named}"])
    todo, done, skip = chain.stages_to_run(cfgs)
    assert skip == ["train_vqvae"] and done == [] and todo[:2] == ["prepare", "encode"], todo
    assert "train_vqvae" in chain.stages_to_run(chain.compose_all([f"run_root={tmp_path / 'runs'}"]))[0]


def test_done_stages_are_compared_by_the_settings_their_outputs_depend_on(tmp_path):
    """What stage=all says of done stages a command asks other settings of (the run above shows it
    end to end): DeepSpeed and loader settings are the trainings', not prepare's; where and how a
    stage ran is not compared, nor a key the stage did not record (one added since)."""
    from pipeline.config import stage_dir, to_yaml

    run_root = f"run_root={tmp_path / 'runs'}"
    then = chain.compose_all([run_root, "deepspeed.micro_batch=8", "data.num_workers=2", "seed=3",
                              "tracking.system_metrics=false", "model.classifier.blocks=2"])
    for stage in ("prepare", "train_vqvae"):
        sdir = stage_dir(then[stage], stage)
        sdir.mkdir(parents=True)
        recorded = to_yaml(then[stage]).replace("\n    usage_decay: 0.95\n", "\n")  # as before the key existed
        (sdir / "config.yaml").write_text(recorded)
        (sdir / "done.json").write_text("{}")
    now = chain.compose_all([run_root, "model.vqvae.usage_decay=0.5"])
    todo, done, _ = chain.stages_to_run(now)
    assert done == ["prepare", "train_vqvae"] and todo[0] == "encode"
    assert chain.done_with_other_settings(now, done) == [
        "prepare: seed=3 there, 0 now",
        "train_vqvae: data.num_workers=2 there, 0 now; deepspeed.micro_batch=8 there, 64 now; seed=3 there, 0 now"]


def test_a_tree_named_by_a_relative_path_is_the_same_tree_named_absolute(tmp_path, monkeypatch):
    """Prepared with data.source=tree from its parent folder, a chain named with the absolute path (or
    from elsewhere) is not told that prepare ran with another data.source."""
    from pipeline.config import stage_dir, to_yaml

    (tmp_path / "tree" / "a").mkdir(parents=True)
    run_root = f"run_root={tmp_path / 'runs'}"
    monkeypatch.chdir(tmp_path)
    then = chain.compose_all([run_root, "data=folder", "data.source=tree"])
    sdir = stage_dir(then["prepare"], "prepare")
    sdir.mkdir(parents=True)
    (sdir / "config.yaml").write_text(to_yaml(then["prepare"]))
    (sdir / "done.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "tree")
    for source in (tmp_path / "tree", "."):
        now = chain.compose_all([run_root, "data=folder", f"data.source={source}"])
        assert chain.done_with_other_settings(now, ["prepare"]) == []
    now = chain.compose_all([run_root, "data=folder", "data.source=a"])
    assert chain.done_with_other_settings(now, ["prepare"]) == [
        f"prepare: data.source={tmp_path / 'tree'} there, {tmp_path / 'tree' / 'a'} now"]


def test_data_settings_only_prepare_reads_are_prepare_s_alone(tmp_path):
    """data.source, data.shard_size, ... decide prepare's shards; later stages build on those shards as
    they are. Compared as every stage's own, a changed data.shard_size listed all seven done stages and
    told a done sample to draw another sample_set, which would not prepare anything anew."""
    from pipeline.config import stage_dir, to_yaml
    from pipeline.launch import preflight, records

    run_root = f"run_root={tmp_path / 'runs'}"
    then = chain.compose_all([run_root])
    for stage, cfg in then.items():
        sdir = stage_dir(cfg, stage)
        sdir.mkdir(parents=True)
        (sdir / "config.yaml").write_text(to_yaml(cfg))
    now = chain.compose_all([run_root, "data.shard_size=100", "data.val_fraction=0.3"])
    changed = "data.shard_size=256 there, 100 now; data.val_fraction=0.2 there, 0.3 now"
    assert chain.done_with_other_settings(now, list(now)) == [f"prepare: {changed}"]
    assert records.settings_changed(now["sample"], "sample") == ""
    assert preflight.prepared_otherwise(now["sample"], "sample") == (
        f"prepare ran with other data settings ({changed}), and sample builds on its shards as they are -- pass "
        "experiment=<a new name> to prepare the data with these settings")
    assert preflight.prepared_otherwise(now["prepare"], "prepare") == ""  # prepare's own refusal says it
    assert preflight.prepared_otherwise(then["encode"], "encode") == ""
    # a key later stages read themselves is still theirs too
    resized = chain.compose_all([run_root, "data.resolution=64"])
    assert chain.done_with_other_settings(resized, ["prepare", "train_vqvae", "sample"]) == [
        f"{s}: data.resolution=32 there, 64 now" for s in ("prepare", "train_vqvae", "sample")]


def test_a_failed_chain_says_how_to_go_on(tmp_path):
    src = tmp_path / "tiny"  # a class-folder tree prepare cannot use: no decodable image
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        (src / cls / "not_an_image.png").write_text("text")
    proc = submit("stage=all", "data=folder", f"data.source={src}", f"run_root={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "submit: stage=all stopped:" in proc.stderr and "rerun the same command" in proc.stderr
    assert f"status:  submit status experiment=digits run_root={tmp_path / 'runs'}" in proc.stderr
    # the failing stage's log is named, and holds the traceback (the terminal gets one line)
    log = Path(re.search(r"^  log:     (\S+)$", proc.stderr, re.M).group(1))
    assert log.parent == tmp_path / "runs" / "digits" / "prepare" / "logs", proc.stderr
    assert "ERROR pipeline: stage prepare failed\nTraceback (most recent call last):" in log.read_text()
    assert "Traceback" not in proc.stderr
    status = submit("status", f"run_root={tmp_path / 'runs'}", cwd=tmp_path)
    assert re.search(r"^prepare\s+failed", status.stdout, re.M), status.stdout
    # status says why, and where the log is
    why = status.stdout.split("\nfailures:\n")[1].splitlines()
    assert re.fullmatch(r"  prepare: ValueError: data.val_fraction=0.1 of 2 images gives 0 val images; .* "
                        r"\(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", why[0]), status.stdout
    assert why[1] == f"    log:  {log}", status.stdout
    # and the MLflow UI: the FAILED run carries the error of the execution that failed
    run_id = json.loads((tmp_path / "runs" / "digits" / "prepare" / "mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["execution.1.error"] == why[0].split(": ", 1)[1].rsplit(" (", 1)[0]
    assert f"  submit stage=all data=folder data.source={src} run_root={tmp_path / 'runs'}\n" in status.stdout


def test_a_stage_scoped_override_sets_that_stage_alone(tmp_path, capsys):
    cfgs = chain.compose_all([f"run_root={tmp_path}", "train.max_steps=50", "train_bottom_prior:train.max_steps=80",
                              "train_bottom_prior:train.lr=1e-4"])
    steps = {s: c.train.max_steps for s, c in cfgs.items() if "train" in c}
    # the plain override reaches every stage with the key (the evaluate classifiers too); the scoped one wins
    assert steps == {"train_vqvae": 50, "train_top_prior": 50, "train_bottom_prior": 80, "evaluate": 50}, steps
    assert cfgs["train_bottom_prior"].train.lr == 1e-4 and cfgs["train_top_prior"].train.lr != 1e-4
    # a single stage takes an override scoped to it as a plain one
    assert main(["stage=train_top_prior", "train_top_prior:train.max_steps=80", f"run_root={tmp_path}", "--cfg",
                 "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] == 80


def test_summary_table_columns_stay_aligned_whatever_the_wall_time_reads():
    rows = [{"stage": "prepare", "status": "already done", "seconds": None, "metric": "1797 images", "outputs": "/a"},
            {"stage": "train_vqvae", "status": "not needed", "seconds": None, "metric": "-", "outputs": "/b"},
            {"stage": "encode", "status": "done", "seconds": 3.2, "metric": "1797 code maps", "outputs": "/c"},
            {"stage": "train_top_prior", "status": "done", "seconds": 3725.0, "metric": "val 0.5 bits/code",
             "outputs": "/d"}]
    rows = [{**r, "name": r["stage"]} for r in rows]
    lines = chain.summary_table(rows, 3728.2).splitlines()
    assert "done before" in lines[1] and "not needed" in lines[2] and "62 min 05 s" in lines[4]
    # the wall-time column ends, and the metric column starts, at the same place on every line
    starts = {line.index(word) for line, word in zip(lines, ["key metric", "1797 images", "-", "1797 code", "val 0.5"])}
    assert len(starts) == 1, lines
    ends = {line.index(w) + len(w) for line, w in zip(lines, ["wall time", "done before", "not needed", "3 s",
                                                              "62 min 05 s", "62 min 08 s"])}
    assert len(ends) == 1, lines


def test_the_global_seed_reaches_sample_only_without_its_own_seed():
    from pipeline.stages import depends_on

    assert not depends_on("sample", "seed", {"seed": "0", "sample.seed": "1"})
    assert depends_on("sample", "seed", {"seed": "0", "sample.seed": "None"})
    assert depends_on("sample", "sample.seed", {"seed": "0", "sample.seed": "1"})
    assert depends_on("train_top_prior", "seed", {"seed": "0", "sample.seed": "1"})
