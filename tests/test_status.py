"""`submit status`: what it reads from a stage's records (shard progress, the cause of a multi-rank
failure) and how it closes an MLflow run whose process is gone, with a real sqlite store."""

from __future__ import annotations

import json
import re

from conftest import submit
from mlflow.tracking import MlflowClient


def test_shard_progress_counts_completion_markers_and_rates_those_since_the_last_start(tmp_path):
    import os

    from pipeline.launch import records
    from pipeline.stages import record_shard_total

    sdir = tmp_path / "sample"
    (sdir / "shards").mkdir(parents=True)
    record_shard_total(sdir, 10)
    started = json.loads((sdir / "progress.json").read_text())["time"]
    for i, t in enumerate([started - 500, started - 400, started + 60, started + 90]):  # 2 before this start
        marker = sdir / "shards" / f"samples-{i:06d}_stats.json"
        marker.write_text("{}")
        os.utime(marker, (t, t))
    (sdir / "shards" / "samples-000009.tar").write_text("")  # not a marker
    line = records.progress_line(sdir, now=started + 120)
    # 2 shards in the 120 s since the start: 1 per minute, 6 to go
    assert line == "shards 4 of 10 (40%), 1 shards/min, ETA 6 min 00 s; last shard 30 s ago", line
    (sdir / "progress.json").write_text('{"step": 5}')  # from something else: status goes on without it
    assert records.progress_line(sdir) == ""


def test_wait_says_the_watched_stage_s_progress_only_when_it_moved(tmp_path):
    """wait=true's progress lines: what a stage dir shows when the wait starts watching it is not
    news (a progress file left from before a requeue); a step or a shard more is, once; a stage the
    wait is done with says nothing more. Then the same through the thread a wait runs it in."""
    import time

    from pipeline import atomic
    from pipeline.launch.waiting import SayProgress
    from pipeline.stages import record_shard_total

    def trained_to(sdir, step):  # what the training engine writes every train.log_every steps
        atomic.write_json(sdir / "progress.json", {"step": step, "max_steps": 1000, "steps_per_s": 2.0,
                                                   "time": time.time()})

    train, sample = tmp_path / "train_vqvae", tmp_path / "sample"
    train.mkdir()
    (sample / "shards").mkdir(parents=True)
    trained_to(train, 100)
    said: list[str] = []
    progress = SayProgress(0, said.append)
    progress.watch("train_vqvae", "18", train)
    progress.look()
    trained_to(train, 100)  # rewritten by a requeued job that resumed at step 100: no step more yet
    progress.look()
    assert said == []
    trained_to(train, 200)
    progress.look()
    progress.look()
    assert len(said) == 1 and re.fullmatch(r"  running: train_vqvae \(job 18\): step 200 of 1000 \(20%\), 2 steps/s, "
                                           r"ETA 6 min [34]\d s; updated \d s ago", said[0]), said
    progress.forget()
    trained_to(train, 300)
    progress.look()
    progress.watch("sample", "19", sample)  # not started: nothing to say
    progress.look()
    assert len(said) == 1, said
    record_shard_total(sample, 4)
    progress.look()
    assert said[1:] == ["  running: sample (job 19): shards 0 of 4 (0%); none complete yet"], said

    said.clear()
    with SayProgress(0.05, said.append) as progress:
        progress.watch("train_vqvae", "18", train)
        trained_to(train, 400)
        deadline = time.time() + 30
        while not said:
            assert time.time() < deadline, "no progress line within 30 s of looks every 0.05 s"
            time.sleep(0.05)
    assert said[0].startswith("  running: train_vqvae (job 18): step 400 of 1000 (40%)"), said


def test_status_shows_the_cause_of_a_multi_rank_failure_first_and_the_echoes_after(tmp_path, monkeypatch):
    """When one rank fails, the others stop after it, with errors that only echo it (a failed
    collective, an agreement's OtherRankFailed): whichever is recorded first, the cause is shown
    first; a requeue of the job is a new execution."""
    import torch.distributed as dist

    from pipeline.launch import failures
    from pipeline.training.distributed import OtherRankFailed

    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    failures.record(tmp_path, OtherRankFailed("rank 1 failed (ValueError: bad image)"), tmp_path / "r0.log",
                    "rank 0", "7")
    failures.record(tmp_path, ValueError("bad image"), tmp_path / "r1.log", "rank 1", "7")
    failures.record(tmp_path, dist.DistBackendError("Connection closed by peer"), tmp_path / "r2.log", "rank 2", "7")
    failures.record(tmp_path, KeyError("later"), tmp_path / "r3.log", "rank 3", "7")
    lines = failures.lines(tmp_path, "7")
    assert re.fullmatch(r"ValueError: bad image \(rank 1, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", lines[0]), lines
    assert lines[1] == f"log:  {tmp_path / 'r1.log'}"
    assert [re.sub(r", \d{4}.*", "", line) for line in lines[2:]] == [
        "then: OtherRankFailed: rank 1 failed (ValueError: bad image) (rank 0",
        "then: DistBackendError: Connection closed by peer (rank 2",
        "then: KeyError: 'later' (rank 3"], lines
    assert failures.lines(tmp_path, "8") == []  # another job's record is not shown for job 8
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: a new execution, its own first error
    failures.record(tmp_path, OSError("disk full"), tmp_path / "r0b.log", "rank 0", "7")
    lines = failures.lines(tmp_path, "7")
    assert lines[0].startswith("OSError: disk full (rank 0, ") and len(lines) == 2, lines


def test_a_long_error_keeps_what_went_wrong_and_the_fix_on_its_one_line():
    """The status line and the run's error tag hold 300 characters; the fix, said last, was cut."""
    from pipeline.launch import failures

    said = ("SLURM gave this task 16 GPU(s), torch can use none: " + "the driver said why " * 12
            + "-- cluster.exclude the node, or set cluster.gpus_per_node=0 to run on CPUs")
    line = failures.message(RuntimeError(said + "\n"))
    assert len(line) == 300 and "\n" not in line
    assert line.startswith("RuntimeError: SLURM gave this task 16 GPU(s), torch can use none: the driver")
    assert line.endswith("or set cluster.gpus_per_node=0 to run on CPUs") and " [...] " in line
    assert failures.message(KeyError("x" * 280)) == "KeyError: '" + "x" * 280 + "'"  # 292: whole


def test_a_run_left_running_is_closed_once_and_a_sigterm_after_another_ranks_failure_is_one(tmp_path, monkeypatch):
    """The store is real (sqlite); which job ended how is given, as accounting would say it."""
    import signal

    from pipeline.launch import failures, mlflow_runs
    from pipeline.tracking import StageKilled, StageStopped

    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e")).info.run_id
    (tmp_path / "mlflow_run.json").write_text(json.dumps({"run_id": run, "tracking_uri": uri, "slurm_job": "7"}))
    failures.record(tmp_path, ValueError("bad image"), tmp_path / "r1.log", "rank 1", "7")
    assert mlflow_runs.close_after_job(tmp_path, "8", "FAILED", "test") == ""  # another job's end
    assert mlflow_runs.close_after_job(tmp_path, "7", "COMPLETED", "test") == ""  # not a failure
    (tmp_path / "mlflow_outbox").mkdir()  # records the stage kept, its own end among them: sent first
    assert mlflow_runs.close_after_job(tmp_path, "7", "CANCELLED", "test") == ""
    assert client.get_run(run).info.status == "RUNNING"
    (tmp_path / "mlflow_outbox").rmdir()
    assert mlflow_runs.close_after_job(tmp_path, "7", "CANCELLED", "test") == "KILLED"
    closed = client.get_run(run)
    assert closed.info.status == "KILLED" and closed.info.end_time
    tags = closed.data.tags  # the execution that opened the run: its first
    assert tags["execution.1.ended"] == ("SLURM job 7 ended CANCELLED before the stage could close this run "
                                         "(closed by test)")
    assert re.fullmatch(r"ValueError: bad image \(rank 1, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", tags["error"])
    assert tags["execution.1.error"] == tags["error"]
    assert mlflow_runs.close_after_job(tmp_path, "7", "FAILED", "test") == ""  # closed once
    assert mlflow_runs.status(tmp_path) == (run, "KILLED")
    # rank 0 told to stop after rank 1 recorded its failure: a failure, naming it
    assert failures.other_rank_failed(tmp_path, "7", StageKilled("received SIGTERM"), 2) == \
        "rank 1 failed: ValueError: bad image"
    assert failures.other_rank_failed(tmp_path, "7", StageKilled("received SIGTERM"), 1) is None  # one rank
    assert failures.other_rank_failed(tmp_path, "7", StageStopped("stop", signal.SIGUSR2), 2) is None  # preempted
    assert failures.other_rank_failed(tmp_path, "8", StageKilled("received SIGTERM"), 2) is None  # other job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the failure was the execution before the requeue
    assert failures.other_rank_failed(tmp_path, "7", StageKilled("received SIGTERM"), 2) is None


def test_a_free_stage_lock_means_its_process_is_gone_only_where_it_ran_here(tmp_path):
    """`submit status` closes a local run left RUNNING only then: a filesystem may keep flocks per node."""
    import os
    import socket

    from pipeline.launch import stage_lock

    assert not stage_lock.last_held_here(tmp_path)  # never locked
    with stage_lock.exclusive(tmp_path, 0, "train_vqvae"):
        assert stage_lock.holder(tmp_path).startswith(f"process {os.getpid()} on {socket.gethostname()} since ")
    assert stage_lock.holder(tmp_path) is None and stage_lock.last_held_here(tmp_path)
    (tmp_path / ".running-rank0.lock").write_text(f"process 12 on not-{socket.gethostname()} since 2026-12-01 10:00:00")
    assert stage_lock.holder(tmp_path) is None and not stage_lock.last_held_here(tmp_path)


def test_status_calls_a_local_run_crashed_and_closes_it_only_where_its_lock_was_taken_here(tmp_path):
    """A RUNNING run whose stage lock is free: crashed if the lock was last taken on this machine;
    from another machine's lock a free flock tells nothing (it may be kept per node)."""
    import socket

    runs, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    sdir = runs / "digits" / "train_vqvae"
    sdir.mkdir(parents=True)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("digits")).info.run_id
    (sdir / "mlflow_run.json").write_text(json.dumps({"run_id": run, "tracking_uri": uri, "slurm_job": ""}))
    lock = sdir / ".running-rank0.lock"
    lock.write_text(f"process 12 on not-{socket.gethostname()} since 2026-12-01 10:00:00")
    status = submit("status", f"run_root={runs}", cwd=tmp_path)
    assert re.search(r"^train_vqvae\s+running or crashed\s", status.stdout, re.M), status.stdout
    assert client.get_run(run).info.status == "RUNNING" and "left RUNNING" not in status.stdout
    lock.write_text(f"process 12 on {socket.gethostname()} since 2026-12-01 10:00:00")
    status = submit("status", f"run_root={runs}", cwd=tmp_path)
    assert re.search(r"^train_vqvae\s+crashed\s", status.stdout, re.M), status.stdout
    assert re.search(rf"^  run {run} of train_vqvae was left RUNNING by its killed process: closed as FAILED$",
                     status.stdout, re.M), status.stdout
    assert client.get_run(run).info.status == "FAILED"


def test_a_resumed_run_found_running_records_that_its_last_execution_was_killed(tmp_path):
    """Where nobody closed the run of a killed execution (no status, cancel or wait=true looked),
    the next execution says so in that execution's tags as it reopens the run."""
    from pipeline.config import compose
    from pipeline.tracking import StageRun

    run_root = tmp_path / "runs"
    cfg = compose(["stage=prepare", f"run_root={run_root}", "tracking.system_metrics=false"])
    sdir = run_root / "digits" / "prepare"
    sdir.mkdir(parents=True)
    with StageRun(cfg, "prepare", sdir) as first:
        pass
    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    with StageRun(cfg, "prepare", sdir):  # closed FINISHED before: nothing to say
        pass
    assert not any(k.endswith(".ended") for k in client.get_run(first.run_id).data.tags)
    client.update_run(first.run_id, status="RUNNING")  # as the second execution, killed, left it
    with StageRun(cfg, "prepare", sdir) as third:
        pass
    tags = client.get_run(third.run_id).data.tags
    assert third.run_id == first.run_id and client.get_run(first.run_id).info.status == "FINISHED"
    assert tags["execution.2.ended"] == ("ended without closing this run (killed); found RUNNING when execution 3 "
                                         "started")
    assert [k for k in tags if k.endswith(".ended")] == ["execution.2.ended"]


def test_status_of_an_experiment_that_never_ran_names_those_that_did(tmp_path):
    """A mistyped experiment= or a status asked from another folder used to print a table of 'not
    started' stages and nothing else."""
    nowhere = submit("status", cwd=tmp_path)
    assert nowhere.returncode == 0, nowhere.stderr
    assert f"nothing has run in {tmp_path / 'runs'} (no such folder) -- pass run_root=<where it ran>" in nowhere.stdout
    assert (f"  submit stage=all experiment=digits run_root={tmp_path / 'runs'} plus the data=, model=, cluster= "
            "it should use") in nowhere.stdout
    for made in ("flowers/prepare", "pets/sample-hot", "mlartifacts/0", "cifar/sample"):
        (tmp_path / "runs" / made).mkdir(parents=True)
    typo = submit("status", "experiment=flower", cwd=tmp_path)
    assert typo.returncode == 0, typo.stderr
    assert (f"nothing has run for experiment 'flower' in {tmp_path / 'runs'}; experiments there: cifar, flowers, pets "
            "-- pass experiment=<one of them> to see it") in typo.stdout, typo.stdout
    ran = submit("status", "experiment=flowers", cwd=tmp_path)
    assert "nothing has run" not in ran.stdout and "plus the data=" not in ran.stdout, ran.stdout


def test_long_lists_in_messages_name_the_first_few_and_count_the_rest():
    from pipeline.wording import first_few

    assert first_few(["a", "b"]) == "a, b"
    assert first_few([f"c{i}" for i in range(12)]) == "c0, c1, c2, c3, c4, c5, c6, c7, c8, c9 and 2 more"
    assert first_few(["x=1", "y=2", "z=3"], limit=2, sep="; ") == "x=1; y=2; and 1 more"
