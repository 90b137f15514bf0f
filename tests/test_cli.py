"""`submit` command line: help, resolved config, and clear exit-2 errors that create nothing."""

from __future__ import annotations

import io
import logging
import os

import pytest
import torch
import yaml

from conftest import submit
from tqdm import tqdm

from pipeline.config import compose
from pipeline.config_checks import validate
from pipeline.launch.jobs import ConsoleHandler
from pipeline.training.engine import deepspeed_config

STAGES = ["prepare", "train_vqvae", "encode", "train_top_prior", "train_bottom_prior", "sample",
          "evaluate", "all"]


def test_help_lists_stages_groups_and_options(tmp_path):
    proc = submit("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for stage in STAGES:
        assert f"\n  {stage} " in proc.stdout
    for group, option in [("data", "digits"), ("data", "folder"), ("model", "tiny_digits"),
                          ("model", "paper_imagenet256"), ("cluster", "local"), ("cluster", "slurm"),
                          ("tracking", "mlflow")]:
        line = next(l for l in proc.stdout.splitlines() if l.strip().startswith(group + " "))
        assert option in line
    assert "not built yet" not in proc.stdout  # every stage is built
    assert list(tmp_path.iterdir()) == []


def test_help_into_a_pipe_whose_reader_left_exits_quietly(tmp_path):
    """`submit --help | head`: the reader may be gone before the help is written."""
    import subprocess

    from conftest import SUBMIT

    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write fails (EPIPE)
    proc = subprocess.run([SUBMIT, "--help"], stdout=write, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                          timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_stage_help_lists_its_keys_with_values_and_meanings(tmp_path):
    proc = submit("stage=train_top_prior", "model=paper_imagenet256", "train.max_steps=7", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("stage=train_top_prior with data=digits, model=paper_imagenet256, cluster=local")
    assert "\n  train.max_steps = 7\n      optimizer steps to train" in out  # the override's value
    assert "\n  model.top_prior.hidden = 512\n      channels of the gated stack" in out  # the preset's
    assert "\n  sample.temperature" not in out  # another stage's key
    assert out.index("\ntrain:") < out.index("\ntop-level:") < out.index("\nmodel:")  # its own keys first
    bad = submit("stage=train_top_prior", "train.max_stepz=7", "--help", cwd=tmp_path)
    assert bad.returncode == 2 and "did you mean train.max_steps" in bad.stderr, bad.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", STAGES)
def test_every_key_of_every_stage_and_group_option_is_commented(stage):
    from pipeline.config import group_options
    from pipeline.config_help import stage_help

    for group in ("data", "model", "cluster"):
        for option in group_options(group):
            overrides = [f"stage={stage}", f"{group}={option}"]
            lines = stage_help(compose(overrides), overrides).splitlines()
            uncommented = [lines[i - 1].strip() for i, line in enumerate(lines) if line.strip() == "(no comment)"]
            assert not uncommented, (overrides, uncommented)


def test_cfg_job_prints_resolved_config_and_runs_nothing(tmp_path):
    proc = submit("stage=prepare", "seed=7", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["stage"]["name"] == "prepare"
    assert cfg["experiment"] == "digits" and cfg["seed"] == 7
    assert cfg["run_root"] == str(tmp_path / "runs")  # resolved against the cwd, absolute
    assert cfg["data"]["name"] == "digits" and cfg["cluster"]["name"] == "local"
    assert list(tmp_path.iterdir()) == []


def test_sbatch_options_of_cluster_extra_are_taken_for_every_stage_or_one(tmp_path):
    """cluster.extra lists no keys: the sbatch options its comment shows were refused as no such key."""
    proc = submit("stage=prepare", "cluster=slurm", "cluster.extra={reservation: mine, mail_type: END}",
                  "cluster.extra.begin=now+60", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["cluster"]["extra"] == {"reservation": "mine", "mail_type": "END",
                                                               "begin": "now+60"}
    proc = submit("stage=all", "cluster=slurm", "prepare:cluster.extra={hold: true}", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    extras = {part.partition("\n")[0]: yaml.safe_load(part.partition("\n")[2])["cluster"]["extra"]
              for part in proc.stdout.split("# --- ")[1:]}
    assert extras["prepare"] == {"hold": True} and len(extras) == 7
    assert not [stage for stage, extra in extras.items() if extra and stage != "prepare"]
    # a whole mapping given again replaces the one before, as for any other key (it was merged into it,
    # so one stage could not be freed of an option every other stage takes)
    proc = submit("stage=all", "cluster=slurm", "cluster.extra={hold: true}", "cluster.extra.begin=now",
                  "encode:cluster.extra={}",
                  "sample:cluster.extra={begin: now}", "sample:cluster.extra.comment=x", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    extras = {part.partition("\n")[0]: yaml.safe_load(part.partition("\n")[2])["cluster"]["extra"]
              for part in proc.stdout.split("# --- ")[1:]}
    assert extras["encode"] == {} and extras["sample"] == {"begin": "now", "comment": "x"}, extras
    assert extras["prepare"] == {"hold": True, "begin": "now"}
    assert list(tmp_path.iterdir()) == []


def test_paths_given_relative_are_pinned_absolute_against_the_cwd(tmp_path):
    """A job may run in another directory, and a done stage's recorded config is compared with later
    commands': every path key is absolute in the composed config."""
    (tmp_path / "flowers").mkdir()
    (tmp_path / "vq.pt").write_bytes(b"")
    proc = submit("stage=prepare", "data=folder", "data.source=flowers", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["data"]["source"] == str(tmp_path / "flowers")
    proc = submit("stage=encode", "encode.vqvae=vq.pt", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["encode"]["vqvae"] == str(tmp_path / "vq.pt")
    proc = submit("stage=evaluate", "eval.cache_root=cache", "run_root=/elsewhere", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["eval"]["cache_root"] == str(tmp_path / "cache")
    proc = submit("stage=evaluate", "run_root=/elsewhere", "--cfg", "job", cwd=tmp_path)  # the default follows run_root
    assert yaml.safe_load(proc.stdout)["eval"]["cache_root"] == "/elsewhere/fidelity_cache"
    missing = submit("stage=evaluate", "eval.features=inception", "eval.inception_weights=w.pth", cwd=tmp_path)
    assert missing.returncode == 2 and f"eval.inception_weights={tmp_path / 'w.pth'}: no such file" in missing.stderr


@pytest.mark.parametrize("args, names", [
    (["stage=nope"], ["stage=nope", "prepare"]),
    (["stage=prepare", "data=nope"], ["data=nope", "digits, folder"]),
    (["stage=prepare", "dta.resolution=3"], ["dta.resolution", "no such config key", "did you mean data.resolution?"]),
    (["stage=prepare", "data.resolutio=3"], ["data.resolutio", "no such config key", "did you mean data.resolution?"]),
    (["stage=evaluate", "sample.temperature=0.5"], ["sample.temperature", "no such config key",
                                                    "it is a setting of stage=sample, not of stage=evaluate"]),
    (["stage=prepare", "zzz.yyy=1"], ["zzz.yyy", "no such config key", "check the spelling"]),
    # the right name under another section, or the name other trainers use
    (["stage=train_top_prior", "train.batch_size=8"], ["train.batch_size", "did you mean deepspeed.micro_batch?"]),
    (["stage=all", "train.batch_size=8"], ["did you mean deepspeed.micro_batch, encode.batch_size, eval.batch_size, "
                                           "sample.batch_size?"]),
    (["stage=train_vqvae", "learning_rate=0.1"], ["learning_rate", "did you mean train.lr?"]),
    (["stage=prepare", "data=folder"], ["data.source", "missing", "data.source=/path/to/the/dataset"]),
    (["stage=prepare", "data=folder", "data.source=/does/not/exist"], ["data.source=/does/not/exist", "does not exist"]),
    (["stage=prepare", "data.source=/tmp"], ["data.source=/tmp", "data=digits"]),
    (["stage=prepare", "experiment=../up"], ["experiment=../up", "not usable as a directory name", "without '/'"]),
    (["stage=all", "experiment=a/b"], ["experiment=a/b", "not usable as a directory name"]),
    (["stage=prepare", "experiment=mlartifacts"], ["experiment=mlartifacts", "holds the run_root's own files"]),
    (["stage=prepare", "cluster=nope"], ["cluster=nope", "local, slurm"]),
    (["stage=prepare", "cluster=slurm", "cluster.setup=module load cuda"], [
        "cluster.setup=module load cuda: expected a list (default []) -- pass 'cluster.setup=[<value>, ...]'"]),
    (["stage=prepare", "cluster=slurm", "cluster.extra=null"], ["cluster.extra=None: expected a mapping"]),
    (["stage=train_vqvae", "train.betas=0.9"], ["train.betas=0.9: expected a list (default [0.9, 0.999])"]),
    (["stage=train_vqvae", "model.vqvae=null"], ["model.vqvae=None: is a config section, not a value -- set its "
                                                 "keys, e.g. model.vqvae.in_channels=<value>"]),
    (["stage=prepare", "cluster.partition=gpu"], ["cluster.partition", "no such config key", "it is a setting of "
                                                  "cluster=slurm, not of cluster=local: pass cluster=slurm"]),
    (["stage=all", "prepare:cluster.extra={hold: true}"], ["cluster.extra", "setting of cluster=slurm"]),
    (["stage=prepare", "data=folder", "data.layout=tars"], ["data.layout", "it is a setting of data=imagenet, not of "
                                                            "data=folder: pass data=imagenet"]),
    (["stage=prepare", "tracking.system_metrics_interval=0"], ["tracking.system_metrics_interval=0", "> 0"]),
    (["stage=prepare", "wait_report_min=-1"], ["wait_report_min=-1", "must be >= 0 minutes", "wait_report_min=10"]),
    (["stage=prepare", "cluster=slurm", "cluster.rank0_grace_s=-5"],
     ["cluster.rank0_grace_s=-5", "must be >= 0 seconds", "cluster.rank0_grace_s=30"]),
    (["stage=evaluate"], ["stage=evaluate", "dataset.json", "submit stage=prepare"]),
    (["stage=evaluate", "eval.features=inception"], ["eval.inception_weights=None", "fetch_inception_weights"]),
    (["stage=evaluate", "eval.accept_rates=[0.5,2]"], ["eval.accept_rates", "(0, 1]"]),
    (["stage=sample"], ["stage=sample", "train_vqvae/model.pt", "submit stage=train_vqvae"]),
    (["stage=sample", "sample.temperature=0"], ["sample.temperature=0", "must be > 0"]),
    (["stage=sample", "sample.top_p=1.5"], ["sample.top_p=1.5", "(0, 1]"]),
    (["stage=sample", "sample_set=a/b"], ["sample_set=a/b", "directory name", "sample_set=t07"]),
    (["stage=sample", "sample_set=0.70"], ["sample_set=0.7", "read as a float value", "sample_set='<name>'"]),
    (["stage=encode"], ["stage=encode", "dataset.json", "missing", "submit stage=prepare"]),
    (["stage=train_top_prior"], ["stage=train_top_prior", "codes.json", "submit stage=encode"]),
    (["stage=all", "encode.vqvae=/no/model.pt"], ["encode.vqvae=/no/model.pt", "no such file"]),
    (["stage=train_vqvae", "deepspeed.zero_stage=x"], ["deepspeed.zero_stage=x", "expected int"]),
    (["stage=all", "train.max_stepz=3"], ["train.max_stepz", "no such config key", "did you mean train.max_steps?"]),
    (["stage=all", "train_top_prior:train.max_stepz=3"], ["train_top_prior:train.max_stepz",
                                                         "did you mean train.max_steps?"]),
    (["stage=all", "train_top_prior:sample.top_p=0.9"], ["train_top_prior:sample.top_p",
                                                        "it is a setting of stage=sample"]),
    (["stage=all", "top_prior:train.lr=0.1"], ["top_prior:train.lr", "'top_prior' is not a stage", "train_top_prior"]),
    (["stage=all", "sample:model=paper_imagenet256"], ["sample:model", "every stage", "model=paper_imagenet256"]),
    (["stage=encode", "train_top_prior:train.lr=0.1"], ["train_top_prior:train.lr", "stage=train_top_prior only",
                                                       "runs stage=encode"]),
    (["stage=train_vqvae", "deepspeed.bf16=1"], ["deepspeed.bf16=1", "must be auto, true or false"]),
    # settings the job would only trip over after it started (VQ-VAE shapes, a division by zero)
    (["stage=train_vqvae", "data.resolution=30"], ["data.resolution=30", "multiple of 8", "data.resolution=24"]),
    (["stage=train_top_prior", "train.ckpt_every=0"], ["train.ckpt_every=0", "integer of at least 1"]),
    (["stage=all", "train_top_prior:train.lr=-1"], ["train.lr=-1", "must be > 0"]),
    (["stage=evaluate", "train.schedule=linear"], ["train.schedule=linear", "cosine, constant"]),
    (["stage=train_vqvae", "deepspeed.zero_stage=3"], ["deepspeed.zero_stage=3", "must be 0, 1 or 2"]),
    (["stage=prepare", "data.val_fraction=1"], ["data.val_fraction=1", "between 0 and 1"]),
    (["stage=train_top_prior", "verify=true"], ["verify=true", "stage=train_top_prior writes no shards",
                                                "stage=prepare, stage=encode or stage=sample"]),
    (["stage=all", "verify=true"], ["verify=true", "writes no shards", "one stage at a time"]),
    (["data=digits"], ["stage", "no stage given"]),
    (["stage=prepare", "oops"], ["oops", "key=value"]),
    (["stage=prepare", "--frobnicate"], ["--frobnicate"]),
    # the other commands refuse the same way
    (["--help", "stage=train_vqvae", "train.max_stepz=3"], ["train.max_stepz", "did you mean train.max_steps?"]),
    (["status", "train.max_stepz=3"], ["train.max_stepz", "did you mean train.max_steps?"]),
    (["cancel", "stage=train_prior"], ["stage=train_prior", "not a stage to cancel", "train_top_prior"]),
])
def test_bad_input_exits_2_naming_the_key_and_creates_nothing(tmp_path, args, names):
    proc = submit(*args, f"run_root={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) <= 2, err  # one clear line (plus usage for bad flags)
    for name in names:
        assert name in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_tqdm_variable_is_named_with_the_fix_before_anything_is_written(tmp_path):
    """tqdm reads TQDM_* when imported and raised a bare ValueError (a traceback naming neither)."""
    proc = submit("stage=prepare", f"run_root={tmp_path / 'runs'}", cwd=tmp_path, env={"TQDM_MININTERVAL": "x"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == ("submit: error: TQDM_MININTERVAL='x': tqdm cannot read it (could not convert string to "
                           "float: 'x') -- unset it, or give a value of the right type, e.g. TQDM_MININTERVAL=5 "
                           "(seconds between redraws)\n"), proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, kept", [("true", True), ("false", False), ("auto", "auto")])
def test_bf16_takes_auto_true_or_false(tmp_path, value, kept):
    cfg = compose(["stage=train_vqvae", f"run_root={tmp_path}", f"deepspeed.bf16={value}"])
    validate(cfg)
    enabled = {"true": True, "false": False, "auto": torch.cuda.is_available()}[value]
    assert cfg.deepspeed.bf16 == kept and deepspeed_config(cfg)["bf16"]["enabled"] is enabled


def test_a_stage_running_in_another_process_is_refused_before_anything_is_written(tmp_path):
    import os

    from pipeline.launch import stage_lock

    sdir = tmp_path / "runs" / "digits" / "prepare"
    with stage_lock.exclusive(sdir, 0, "prepare"):  # this test process is "running" prepare
        chain = submit("stage=all", f"run_root={tmp_path / 'runs'}", cwd=tmp_path)
        single = submit("stage=prepare", f"run_root={tmp_path / 'runs'}", cwd=tmp_path)
        cancel = submit("cancel", f"run_root={tmp_path / 'runs'}", cwd=tmp_path)
    # no SLURM job to cancel here: it names the local process and how to stop it
    assert cancel.returncode == 0 and f"running here in process {os.getpid()} on " in cancel.stdout, cancel.stdout
    assert "Ctrl-C it in its terminal" in cancel.stdout
    for proc in (chain, single):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"stage=prepare: already running in process {os.getpid()} on " in proc.stderr, proc.stderr
    assert sorted(p.name for p in sdir.iterdir()) == [".running-rank0.lock"]  # no shard, no command.json
    assert sorted(p.name for p in sdir.parent.iterdir()) == ["prepare"]  # no other stage started either


def test_an_experiment_deleted_in_the_mlflow_ui_is_named_with_the_fix(tmp_path):
    """MLflow takes no run into a deleted experiment: every stage failed as it started, in MLflow's
    words ("must be in the 'active' state"), which name neither the cause nor the fix."""
    import json
    import sqlite3
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from pipeline.tracking import ExperimentDeleted, StageRun

    runs = tmp_path / "runs"
    first = submit("stage=prepare", f"run_root={runs}", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(uri)
    eid = client.get_experiment_by_name("digits").experiment_id
    client.delete_experiment(eid)  # what the UI's delete does
    # submit and status read the local store directly (importing MLflow cost ~3 s a command): as
    # MLflow reads it
    from pipeline.launch import local_store

    seen = local_store.experiment(uri, "digits")
    assert (seen.experiment_id, seen.name, seen.lifecycle_stage) == (eid, "digits", "deleted")
    assert client.get_experiment(eid).lifecycle_stage == "deleted" and local_store.experiment(uri, "other") is None
    run_id = json.loads((runs / "digits" / "prepare" / "mlflow_run.json").read_text())["run_id"]
    assert local_store.run_status(uri, run_id) == client.get_run(run_id).info.status == "FINISHED"
    assert local_store.run_status(uri, "0" * 32) is None
    other = tmp_path / "not mlflow's.db"  # a file of another schema: MLflow is asked instead
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    assert local_store.experiment(f"sqlite:///{other}", "digits") is False
    assert local_store.run_status(f"sqlite:///{other}", run_id) is False
    assert local_store.run_status("http://127.0.0.1:5000", run_id) is False  # a server: MLflow is asked
    sdir = runs / "digits" / "prepare"
    kept = {p: p.read_bytes() for p in sdir.iterdir() if p.is_file()}
    fix = f"restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {eid}; its runs come back"
    for args in (["stage=prepare"], ["stage=all"]):
        proc = submit(*args, f"run_root={runs}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert (f"submit: error: experiment=digits: the MLflow experiment 'digits' (id {eid}) at {uri} was deleted, "
                f"and MLflow takes no run into it -- {fix}") in proc.stderr, proc.stderr
    assert {p: p.read_bytes() for p in sdir.iterdir() if p.is_file()} == kept  # nothing touched
    # a job that starts after the deletion (queued on SLURM before it) fails saying the same
    cfg = compose(["stage=prepare", f"run_root={runs}"])
    with pytest.raises(ExperimentDeleted, match="was deleted, and MLflow takes no run into it -- restore it"):
        with StageRun(cfg, "prepare", tmp_path / "elsewhere"):
            pass
    # the fix as given: the experiment and its runs come back, the stage goes on in the same run
    cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    restored = subprocess.run([cli, "experiments", "restore", "--experiment-id", eid], capture_output=True,
                              text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, timeout=120)
    assert restored.returncode == 0, restored.stderr
    again = submit("stage=prepare", f"run_root={runs}", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    run_id = json.loads(kept[sdir / "mlflow_run.json"])["run_id"]
    assert json.loads((sdir / "mlflow_run.json").read_text())["run_id"] == run_id
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_unwritable_run_root_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = submit("stage=prepare", f"run_root={blocker / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"run_root={blocker / 'runs'}" in proc.stderr and "not a directory" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("handler", [ConsoleHandler, logging.StreamHandler])
def test_console_log_lines_start_on_their_own_line_under_a_progress_bar(handler):
    out = io.StringIO()  # a terminal: the progress bar and the log lines share it
    log = logging.getLogger(f"test_console_{handler.__name__}")
    log.propagate = False
    log.addHandler(handler(out))
    log.setLevel(logging.INFO)
    with tqdm(total=10, file=out, mininterval=0, desc="steps") as bar:
        bar.update(3)
        log.info("step 3: val 0.5")
        bar.update(3)
    text = out.getvalue()
    before = text[text.index("step 3: val") - 1]
    # the bar's line is cleared (carriage return) first, and redrawn after the log line
    assert (before in "\r\n") == (handler is ConsoleHandler), repr(text)
    assert "steps:  60%" in text[text.index("step 3: val"):]


def test_the_filesystem_under_run_root_is_found_for_the_sqlite_on_network_storage_warning(tmp_path):
    import subprocess

    from pipeline.launch.preflight import filesystem_type

    for path in (tmp_path, tmp_path / "runs" / "not-yet", "/proc/self"):
        found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
                               capture_output=True, text=True).stdout.strip()
        if not found:  # findmnt wants an existing path: the nearest parent is what holds it
            found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp_path)],
                                   capture_output=True, text=True).stdout.strip()
        assert filesystem_type(path) == found
    mounts = ("overlay / overlay rw 0 0\nsrv:/export /shared nfs4 rw,vers=4.2 0 0\n"
              "mds@tcp:/scratch /shared/big\\040disk lustre rw 0 0\n")
    assert filesystem_type("/shared/vqvae2/runs", mounts) == "nfs4"
    assert filesystem_type("/shared/big disk/runs", mounts) == "lustre"
    assert filesystem_type("/sharedx/runs", mounts) == "overlay"  # a prefix of the name is not a parent
