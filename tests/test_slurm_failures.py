"""`cluster=slurm` failures against the local SLURM cluster (the `slurm` fixture, conftest.py): a
squeue that cannot answer, a rank that fails (the job ends, the MLflow run ends FAILED with its
error, wait=true and status name it), array tasks failing alike, a long job killed without a result
(wait=true says so within seconds)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import (EVAL_ARGS, SLURM_FAST, copy_stages, slurm_job_id, slurm_sh, spoil_last_sample, submit,
                      train_vqvae_run, unsplittable_tree)
from pipeline.cli import main
from pipeline.launch import queue, records, waiting


def test_a_squeue_that_cannot_answer_is_not_taken_for_a_finished_job(slurm, tmp_path, monkeypatch):
    """squeue fails when the controller is unreachable or overloaded: "not in the queue" would let
    submit start a stage a second time beside its live job. Only the controller's "Invalid job id"
    (or no SLURM set up) means gone; anything else refuses, naming the job and squeue's words."""
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    assert queue.queue_state("999999") is None  # the real controller holds no such job
    # the same cluster's config with the controller's port pointing where nothing listens
    conf = Path(slurm["SLURM_CONF"]).read_text()
    away = re.sub(r"^SlurmctldPort=\d+$", "SlurmctldPort=26799", conf, flags=re.M)
    assert away != conf
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "slurm.conf").write_text(away + "\nMessageTimeout=2\nTCPTimeout=1\n")
    unreachable = {"SLURM_CONF": str(tmp_path / "etc" / "slurm.conf")}
    monkeypatch.setenv("SLURM_CONF", unreachable["SLURM_CONF"])
    with pytest.raises(queue.SlurmUnavailable, match=r"squeue -j 4242 failed 2 times \(.*Unable to contact "
                                                       r"slurm controller.*whether job 4242 is still queued"):
        queue.queue_state("4242", pause_s=0)

    run_root = tmp_path / "runs"
    prepare = run_root / "digits" / "prepare"
    prepare.mkdir(parents=True)
    records.add_job(prepare, "4242")
    before = (prepare / records.JOBS).read_text()
    one = submit("stage=prepare", "cluster=slurm", f"run_root={run_root}", cwd=tmp_path, env=unreachable)
    assert one.returncode == 2, one.stdout + one.stderr
    assert "stage=prepare: squeue -j 4242 failed 2 times" in one.stderr and "nothing was submitted" in one.stderr
    chain = submit("stage=all", "cluster=slurm", f"run_root={run_root}", cwd=tmp_path, env=unreachable)
    assert chain.returncode == 2 and "nothing was queued" in chain.stderr, chain.stdout + chain.stderr
    cancel = submit("cancel", f"run_root={run_root}", cwd=tmp_path, env=unreachable)
    assert cancel.returncode == 1 and "nothing was cancelled" in cancel.stderr, cancel.stdout + cancel.stderr
    assert (prepare / records.JOBS).read_text() == before  # no job added
    assert [p.name for p in (run_root / "digits").iterdir()] == ["prepare"]  # nothing queued, nor recorded
    # a second stage with a job: status asks squeue once (each failing call waits out the controller's
    # timeout), counted by a wrapper in front of the real squeue
    (run_root / "digits" / "train_vqvae").mkdir()
    records.add_job(run_root / "digits" / "train_vqvae", "4243")
    wrapper = tmp_path / "bin" / "squeue"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "squeue.calls"}\nexec {shutil.which("squeue")} "$@"\n')
    wrapper.chmod(0o755)
    counted = {**unreachable, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
    status = submit("status", f"run_root={run_root}", cwd=tmp_path, env=counted)
    # the controller unreachable and no accounting record of the jobs: their state is unknown, not "failed"
    assert status.returncode == 0, status.stdout + status.stderr
    for stage, job in (("prepare", 4242), ("train_vqvae", 4243)):
        assert re.search(rf"^{stage}\s+unknown \(squeue failed\)\s+{job}", status.stdout, re.M), status.stdout
    calls = (tmp_path / "squeue.calls").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("-h -j 4242,4243 "), calls  # both jobs in one call
    assert re.search(r"^SLURM: squeue -j 4242,4243 failed \(.*Unable to contact slurm controller.*\): whether jobs "
                     r"4242,4243 are still queued is unknown \(their states are from accounting", status.stdout,
                     re.M), status.stdout
    assert "SLURM: sacct" not in status.stdout  # slurmdbd answered
    # slurmdbd unreachable too (the head node down): sacct is asked once as well, not once per stage
    dbd_away = re.sub(r"^AccountingStoragePort=\d+$", "AccountingStoragePort=26798", away, flags=re.M)
    assert dbd_away != away
    (tmp_path / "etc" / "slurm.conf").write_text(dbd_away + "\nMessageTimeout=2\nTCPTimeout=1\n")
    sacct = wrapper.parent / "sacct"
    sacct.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "sacct.calls"}\nexec {shutil.which("sacct")} "$@"\n')
    sacct.chmod(0o755)
    status = submit("status", f"run_root={run_root}", cwd=tmp_path, env=counted)
    assert status.returncode == 0, status.stdout + status.stderr
    for stage, job in (("prepare", 4242), ("train_vqvae", 4243)):
        assert re.search(rf"^{stage}\s+unknown \(squeue failed\)\s+{job}", status.stdout, re.M), status.stdout
    calls = (tmp_path / "sacct.calls").read_text().splitlines()
    assert len(calls) == 1 and "-j 4242" in calls[0], calls
    assert re.search(r"^SLURM: sacct -j 4242 failed \(.*\); sacct was not asked again for the other stages' jobs$",
                     status.stdout, re.M), status.stdout
    # wait=true's watch says the failure once, goes on asking, and never takes the job to have left
    monkeypatch.setenv("PATH", counted["PATH"])
    asked, said = tmp_path / "squeue.calls", []
    asked.unlink()
    with queue.QueueWatch(["4242"], said.append, first_s=0.1, every_s=0.3) as watch:
        deadline = time.time() + 120
        while not asked.exists() or len(asked.read_text().splitlines()) < 3:
            assert time.time() < deadline, said
            time.sleep(0.1)
        assert not watch.left("4242")
    assert len(said) == 1 and re.fullmatch(r"squeue -j 4242 failed \(.*Unable to contact slurm controller.*\): whether "
                                           r"job 4242 is still queued is unknown -- asking again every 0.3 s", said[0]), said


def test_a_rank_that_fails_ends_the_whole_job_at_once(slurm, run_root, tmp_path):
    """Rank 1 of a two-node training dies at its python's start (a sitecustomize on PYTHONPATH):
    rank 0 would wait at the rendezvous for the process group's 30-minute timeout, far past this
    test's; with cluster.kill_on_bad_exit SLURM ends the step, and the job fails at once."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text("import os\nif os.environ.get('SLURM_PROCID') == '1':\n    os._exit(3)\n")
    proc = submit("stage=train_vqvae", "cluster=slurm", "cluster.nodes=2", "cluster.partition=high",
                  f"run_root={tmp_path / 'runs'}", *SLURM_FAST, "train.max_steps=20", f"cluster.setup=['export "
                  f"PYTHONPATH={hold}:$PYTHONPATH']", "wait=true", cwd=tmp_path, env=slurm, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = slurm_job_id(proc.stdout + proc.stderr)
    assert slurm_sh(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], slurm).split()[0] == "FAILED"
    stderr = (tmp_path / "runs" / "digits" / "train_vqvae" / "slurm" / job / f"{job}_0_log.err").read_text()
    assert re.search(r"task 1: Exited with exit code 3", stderr), stderr[-2000:]
    # slurmdbd learns of a job's end after squeue forgets it: status asks sacct again while it still
    # says RUNNING (a wrapper in front of the real sacct says so for its first `lies` state queries)
    wrapper, calls = tmp_path / "bin" / "sacct", tmp_path / "sacct.calls"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *"-o State"*)\n  echo "$@" >> {calls}\n'
                       f'  [ $(wc -l < {calls}) -le $(cat {tmp_path / "lies"}) ] && echo RUNNING && exit 0;;\nesac\n'
                       f'exec {shutil.which("sacct")} "$@"\n')
    wrapper.chmod(0o755)
    lagging = {**slurm, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
    for lies, says, asked in ((2, "failed (FAILED)", 3), (99, "ended (sacct still says RUNNING)", 4)):
        (tmp_path / "lies").write_text(str(lies))
        calls.unlink(missing_ok=True)
        status = submit("status", f"run_root={tmp_path / 'runs'}", cwd=tmp_path, env=lagging, timeout=120)
        assert re.search(rf"^train_vqvae\s+{re.escape(says)}\s+{job}\s", status.stdout, re.M), status.stdout
        assert len(calls.read_text().splitlines()) == asked, calls.read_text()


@pytest.mark.parametrize("rank0", ["rendezvous", "python", "handling"])
def test_a_rank_that_fails_alone_fails_the_mlflow_run_with_its_error(slurm, run_root, tmp_path, rank0):
    """Rank 1's training raises once rank 0 has opened its MLflow run (a sitecustomize on PYTHONPATH
    replaces it); its exit, cluster.rank0_grace_s later, has SLURM end rank 0 (kill_on_bad_exit). Rank 0
    either waits at the rendezvous, where its SIGTERM handler never runs and SLURM kills it, leaving its
    MLflow run RUNNING for wait=true to close; or is busy in Python code (its training replaced by a
    sleep), where it takes the SIGTERM for a failure, not a stop; or is handling an error of its own
    when the SIGTERM comes (as where a compiler the same SIGTERM killed failed first: its run ended
    KILLED). Every way the run ends FAILED with rank 1's error, and status says failed, rank 1's error
    first (not "stopped")."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(
        "import os, time\nrank = os.environ.get('SLURM_PROCID')\n"
        "class SlowToSay(RuntimeError):  # formatting its traceback takes long: the SIGTERM comes meanwhile\n"
        "    @property\n"
        "    def __notes__(self):\n"
        "        time.sleep(300)\n"
        f"if rank == '1' or (rank == '0' and {rank0 != 'rendezvous'}):\n"
        "    from pipeline.training import engine\n"
        "    def train(cfg, ctx, task):\n"
        "        if rank == '1':  # once rank 0 has opened its MLflow run\n"
        "            deadline = time.time() + 120\n"
        "            while not (ctx.stage_dir / 'mlflow_run.json').exists() and time.time() < deadline:\n"
        "                time.sleep(0.2)\n"
        "            raise ValueError('rank 1 cannot train')\n"
        f"        while {rank0 == 'python'} or not (ctx.stage_dir / 'failed.json').exists():\n"
        "            time.sleep(0.1)\n"
        "        raise SlowToSay()\n"
        "    engine.train = train\n")
    proc = submit("stage=train_vqvae", "cluster=slurm", "cluster.nodes=2", "cluster.partition=high",
                  f"run_root={run_root}", *SLURM_FAST, "train.max_steps=20", "cluster.rank0_grace_s=3",
                  f"cluster.setup=['export PYTHONPATH={hold}:$PYTHONPATH']", "wait=true", cwd=tmp_path, env=slurm,
                  timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = slurm_job_id(proc.stdout)
    err = (run_root / "digits" / "train_vqvae" / "slurm" / job / f"{job}_0_log.err").read_text()
    assert "task 1: Exited with exit code 1" in err, err[-2000:]
    rank1_log = next((run_root / "digits" / "train_vqvae" / "logs").glob("*-rank1.log")).read_text()
    assert "failed; waiting up to 3 s for rank 0 to end the job (cluster.rank0_grace_s)" in rank1_log, rank1_log
    closed = re.search(rf"^  MLflow:  the run was left RUNNING by job {job} \(FAILED\): closed as FAILED$",
                       proc.stderr, re.M)
    client, run = train_vqvae_run(run_root)
    assert run.info.status == "FAILED", run.info
    if rank0 == "rendezvous":
        assert "task 0: Killed" in err and closed, err[-2000:] + proc.stderr
        assert run.data.tags["execution.1.ended"] == (
            f"SLURM job {job} ended FAILED before the stage could close this run (closed by submit wait=true)")
        assert run.data.tags["error"].startswith("ValueError: rank 1 cannot train (rank 1, ")
        end = slurm_sh(["sacct", "-X", "-n", "-P", "-j", job, "-o", "End"], slurm).split()[0]
        assert run.info.end_time == 1000 * time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))
    else:  # rank 0 closed its run itself
        assert not closed and "execution.1.ended" not in run.data.tags, proc.stderr
        assert run.data.tags["error"] == run.data.tags["execution.1.error"] == (
            "OtherRankFailed: received SIGTERM after rank 1 failed: ValueError: rank 1 cannot train")
    status = submit("status", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=120)
    assert re.search(rf"^train_vqvae\s+failed \(FAILED\)\s+{job}\s", status.stdout, re.M), status.stdout
    assert re.search(r"^  train_vqvae: ValueError: rank 1 cannot train \(rank 1, ", status.stdout, re.M), status.stdout
    assert "left RUNNING" not in status.stdout  # closed once


def test_wait_names_the_rank_whose_error_failed_a_two_node_job(slurm, evaluated, tmp_path):
    """A two-node evaluate where a sample image only rank 1 reads is unreadable: rank 0 stops on the
    ranks' agreement (its error only echoes rank 1's). wait=true names the cause and its rank, and
    rank 1 let rank 0 finish before its exit ended the job: rank 0 marked the MLflow run FAILED."""
    root = copy_stages(evaluated["root"], tmp_path / "runs", "prepare", "train_vqvae", "sample")
    last, png = spoil_last_sample(root)
    proc = submit("stage=evaluate", "cluster=slurm", "cluster.nodes=2", "cluster.partition=high", f"run_root={root}",
                  *EVAL_ARGS, "train.max_steps=5", "train.eval_every=5", "train.ckpt_every=5", "data.num_workers=0",
                  "cluster.mem_gb=2", "cluster.cpus_per_task=1", "wait=true", cwd=tmp_path, env=slurm, timeout=900)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    job = slurm_job_id(proc.stdout)
    assert re.search(rf"^submit: job {job} failed: \S*OtherRankFailed: features of samples-\S+: another rank failed",
                     proc.stderr, re.M), proc.stderr[-3000:]
    cause = re.search(r"^  cause:   ValueError: (\S+): (\S+) is not a readable image .*\(rank 1\)$", proc.stderr, re.M)
    assert cause and cause.groups() == (last, png), proc.stderr[-3000:]
    log = Path(re.search(r"^  log:     (\S+)$", proc.stderr, re.M).group(1))
    assert log.name.endswith("-rank1.log") and "is not a readable image" in log.read_text()
    record = json.loads((root / "digits" / "evaluate" / "mlflow_run.json").read_text())
    run = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(record["run_id"])
    assert run.info.status == "FAILED", run.info.status


def test_wait_reports_array_tasks_that_fail_alike_on_one_line(slurm, tmp_path):
    src = unsplittable_tree(tmp_path)  # every task fails the same way
    proc = submit("stage=prepare", "cluster=slurm", "data=folder", f"data.source={src}", f"run_root={tmp_path / 'runs'}",
                  "cluster.array_tasks=2", "cluster.mem_gb=1", "cluster.cpus_per_task=1", "wait=true", cwd=tmp_path,
                  env=slurm, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job = slurm_job_id(proc.stdout)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("submit: job")]
    assert len(lines) == 1 and re.fullmatch(rf"submit: job {job}_0, {job}_1 \(2 tasks\) failed: ValueError: "
                                            r"data.val_fraction=\S+ of 2 images gives 0 val images; .*", lines[0]), lines
    assert re.search(r"^submit: stage prepare failed$", proc.stderr, re.M), proc.stderr


def test_wait_learns_at_once_that_a_long_running_job_was_killed(slurm, tmp_path, monkeypatch):
    """A task killed without a result (here scancel; out of memory or a lost node alike) once its job
    has run long: submitit's watcher then asks sacct only every 10 min, so it does not know yet;
    wait=true's ``results`` sees the job leave squeue and raises submitit's error within seconds."""
    import submitit
    from submitit.core.utils import UncompletedJobError

    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    executor = submitit.SlurmExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(time=10, mem="1G", cpus_per_task=1, partition="high")
    job = executor.submit(time.sleep, 600)
    try:
        deadline = time.time() + 120
        while queue.queue_state(job.job_id) != "RUNNING":
            assert time.time() < deadline, slurm_sh(["squeue", "-j", job.job_id, "-o", "%i %T %r"], slurm)
            time.sleep(1)
        job.watcher.update()  # its last sacct look: now, on a job registered an hour ago
        monkeypatch.setattr(job.watcher, "_start_time", time.time() - 3600)
        slurm_sh(["scancel", job.job_id], slurm)
        while queue.queue_state(job.job_id) is not None or "CANCELLED" not in slurm_sh(
                ["sacct", "-X", "-n", "-P", "-j", job.job_id, "-o", "State"], slurm):
            assert time.time() < deadline + 60, slurm_sh(["squeue", "-j", job.job_id], slurm)
            time.sleep(1)
        assert not job.done()  # submitit alone would say so only at its next sacct, up to 10 min on
        start = time.time()
        with pytest.raises(UncompletedJobError, match=r"has not produced any output \(state: CANCELLED"):
            with queue.QueueWatch([job.job_id], print, first_s=1, every_s=2) as watch:
                waiting.results(job, watch)
        assert time.time() - start < 60  # 2 s look + submitit's 15 s for a late result file
    finally:
        slurm_sh(["scancel", job.job_id], slurm)


def test_a_task_given_gpus_torch_cannot_use_fails_at_once_saying_why(slurm, tmp_path, monkeypatch, capsys):
    """The local cluster's nodes have one GPU each that no driver serves (its device file is
    /dev/null), as a node whose driver is broken, or a job whose venv holds a CPU-only torch: the
    stage ran on the CPU, which for a paper-size prior means days, holding GPUs it never used."""
    run_root = tmp_path / "runs"
    # the jobs run this Python: with a CPU-only torch here, submit refuses before anything is queued
    # (this machine's torch is a CUDA build: its CUDA version is set aside, as a CPU-only build has none)
    with monkeypatch.context() as cpu_only:
        cpu_only.setenv("SLURM_CONF", slurm["SLURM_CONF"])
        cpu_only.setattr(torch.version, "cuda", None)
        for stage, args in (("prepare", ["stage=prepare", "cluster.gpus_per_node=1"]),
                            ("train_top_prior", ["stage=all", "train_top_prior:cluster.gpus_per_node=1"])):
            assert main([*args, "cluster=slurm", f"run_root={run_root}"]) == 2
            assert re.search(rf"^submit: error: cluster.gpus_per_node=1 \(stage {stage}\): the jobs run "
                             rf"{re.escape(sys.executable)}, whose torch \S+ is a CPU-only build -- install a CUDA "
                             rf"build of torch there, or set cluster.gpus_per_node=0 \({stage}:cluster.gpus_per_node=0 ",
                             capsys.readouterr().err, re.M)
        assert not run_root.exists() and not slurm_sh(["squeue", "-h"], slurm).strip()
    proc = submit("stage=prepare", "cluster=slurm", "cluster.gpus_per_node=1", "cluster.array_tasks=1",
                  f"run_root={run_root}", "cluster.mem_gb=1", "cluster.cpus_per_task=1", "wait=true", cwd=tmp_path,
                  env=slurm, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    job = slurm_job_id(proc.stdout)
    want = (r"\S*NoUsableGPU: SLURM gave this task 1 GPU\(s\), torch can use none: .+ \(torch \S+, "
            r"(CUDA [\d.]+|a CPU-only build)\) -- fix the node's driver or the job's environment \(cluster.setup\), "
            r"cluster.exclude the node, or set cluster.gpus_per_node=0 to run on CPUs")
    assert re.search(rf"^submit: job {job} failed: {want}", proc.stderr, re.M), proc.stderr
    assert not (run_root / "digits" / "prepare" / "shards").exists()  # nothing of the stage ran
    record = json.loads((run_root / "digits" / "prepare" / "mlflow_run.json").read_text())
    run = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}").get_run(record["run_id"])
    assert run.info.status == "FAILED" and re.match(want, run.data.tags["error"]), run.data.tags
    status = submit("status", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=120)
    assert re.search(rf"^  prepare: {want}", status.stdout, re.M), status.stdout


def test_a_job_sbatch_refuses_is_named_and_status_says_why_queued_jobs_wait(slurm, tmp_path):
    """sbatch refusing a job (here a partition that does not exist) gave submitit's traceback; in a
    chain, the stages queued before it were not named. A job SLURM queues but will never start (held,
    a time limit over the partition's) showed as "pending" like any other."""
    run_root = tmp_path / "runs"
    alone = submit("stage=prepare", "cluster=slurm", "cluster.partition=nosuch", f"run_root={run_root}",
                   cwd=tmp_path, env=slurm, timeout=120)
    assert alone.returncode == 2, alone.stdout + alone.stderr
    assert ("submit: error: SLURM refused the job of stage prepare: invalid partition specified: nosuch; Batch job "
            "submission failed: Invalid partition name specified -- check cluster.partition, ") in alone.stderr
    assert "Traceback" not in alone.stderr and "sbatch: error" not in alone.stderr  # said once, in that line
    assert not [p for p in (run_root / "digits" / "prepare" / "slurm").iterdir()]  # submitit's pickles removed
    # the refused command is not the one `submit status` offers to resume the stage with
    assert not (run_root / "digits" / "prepare" / records.COMMAND).exists()
    # prepare held (an sbatch option through cluster.extra), so nothing of this chain runs
    args = ["stage=all", "cluster=slurm", f"run_root={run_root}", "prepare:cluster.extra={hold: true}"]
    proc = submit(*args, "train_top_prior:cluster.partition=nosuch", cwd=tmp_path, env=slurm, timeout=300)
    queued = re.findall(r"^\s*(\d+)", slurm_sh(["squeue", "-h", "-o", "%F"], slurm), re.M)
    try:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert ("submit: error: SLURM refused the job of stage train_top_prior: invalid partition specified: nosuch; "
                "Batch job submission failed: Invalid partition name specified -- check ") in proc.stderr
        assert "(train_top_prior:cluster.<key>=<value> sets one for that stage alone)" in proc.stderr
        left = re.search(r"queued before it, left in the queue: prepare \(job (\d+)\), train_vqvae \(job (\d+)\), "
                         r"encode \(job (\d+)\)\n  submit again once fixed", proc.stderr)
        assert left and sorted(left.groups()) == sorted(queued), (proc.stderr, queued)
        assert "JobHeldUser" in slurm_sh(["squeue", "-h", "-j", left.group(1), "-o", "%r"], slurm)
        recorded = {p.parent.name: json.loads(p.read_text())["args"] for p in
                    (run_root / "digits").glob(f"*/{records.COMMAND}")}
        assert recorded == {s: [*args, "train_top_prior:cluster.partition=nosuch"] for s in
                            ("prepare", "train_vqvae", "encode")}, recorded
        fixed = submit(*args, cwd=tmp_path, env=slurm, timeout=300)  # the rest queue after the jobs left
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        for stage, job in zip(("prepare", "train_vqvae", "encode"), left.groups()):
            assert re.search(rf"^  {stage}\s+already pending\s+{job}$", fixed.stdout, re.M), fixed.stdout
        assert re.search(rf"^  train_top_prior\s+queued after {left.group(3)}\s+\d+$", fixed.stdout, re.M)
        assert json.loads((run_root / "digits" / "train_top_prior" / records.COMMAND).read_text())["args"] == args
        prepare, train_vqvae = left.group(1), left.group(2)
        wrapper = tmp_path / "bin" / "squeue"  # counts status' squeue calls: one for all jobs, state and reason
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "squeue.calls"}\nexec {shutil.which("squeue")} "$@"\n')
        wrapper.chmod(0o755)
        counted = {**slurm, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
        status = submit("status", f"run_root={run_root}", cwd=tmp_path, env=counted, timeout=120).stdout
        assert (f"waiting in the queue (SLURM's reason):\n  prepare: job {prepare} (JobHeldUser): will not start, it "
                f"is held -- `scontrol release {prepare}` lets it start\n  train_vqvae: job {train_vqvae} (Dependency)"
                "\n") in status, status
        calls = (tmp_path / "squeue.calls").read_text().splitlines()
        asked = calls[0].split()[2].split(",")
        waiting = re.findall(r"^  \w+: job (\d+) ", status, re.M)
        assert len(calls) == 1 and prepare in asked and sorted(asked) == sorted(set(asked)) == sorted(waiting), (
            calls, status)
        # a time limit over the partition's (the local cluster's "short" allows 5 min): queued, never started
        long = submit("stage=prepare", "cluster=slurm", "cluster.partition=short", "cluster.time_min=10",
                      f"run_root={run_root}", "experiment=long", cwd=tmp_path, env=slurm, timeout=120)
        assert long.returncode == 0, long.stdout + long.stderr
        job = slurm_job_id(long.stdout)
        deadline = time.time() + 60  # the reason comes with the scheduler's next pass
        while "PartitionTimeLimit" not in slurm_sh(["squeue", "-h", "-j", job, "-o", "%r"], slurm):
            assert time.time() < deadline, slurm_sh(["squeue", "-j", job, "-o", "%i %T %r"], slurm)
            time.sleep(1)
        status = submit("status", f"run_root={run_root}", "experiment=long", cwd=tmp_path, env=slurm, timeout=120)
        assert (f"  prepare: job {job} (PartitionTimeLimit): will not start, its time limit is over the partition's "
                f"-- scancel {job}, then submit it with a lower cluster.time_min or another cluster.partition"
                ) in status.stdout, status.stdout
    finally:
        slurm_sh(["scancel", *re.findall(r"^\s*(\d+)", slurm_sh(["squeue", "-h", "-o", "%F"], slurm), re.M)], slurm)


def test_cancel_ends_a_hung_job_outright_and_closes_the_run_it_left_running(slurm, run_root, tmp_path):
    """A training that does not stop on SIGTERM (here it ignores the signal; a rank stuck in a
    collective never runs its handler) is cancelled outright after cancel_grace_s; SLURM kills it,
    so `submit cancel` closes the MLflow run it left RUNNING."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(
        "import os, pathlib, signal, time\n"
        "if os.environ.get('SLURM_PROCID') == '0':\n"
        "    from pipeline.training import engine\n"
        "    def train(cfg, ctx, task):\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"        pathlib.Path('{tmp_path / 'hung'}').touch()\n"
        "        while True:\n"
        "            time.sleep(1)\n"
        "    engine.train = train\n")
    proc = submit("stage=train_vqvae", "cluster=slurm", f"run_root={run_root}", *SLURM_FAST,
                  f"cluster.setup=['export PYTHONPATH={hold}:$PYTHONPATH']", cwd=tmp_path, env=slurm, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = slurm_job_id(proc.stdout)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "hung").exists():
            assert time.time() < deadline, slurm_sh(["squeue"], slurm)
            time.sleep(1)
        cancel = submit("cancel", f"run_root={run_root}", "cancel_grace_s=5", cwd=tmp_path, env=slurm, timeout=300)
    finally:
        slurm_sh(["scancel", job], slurm)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert re.search(rf"^  train_vqvae\s+{job}\s+running -> cancelled after cancel_grace_s=5; its MLflow run, left "
                     r"RUNNING, closed as KILLED$", cancel.stdout, re.M), cancel.stdout
    _, run = train_vqvae_run(run_root)
    assert run.info.status == "KILLED", run.info
    assert run.data.tags["execution.1.ended"] == (
        f"SLURM job {job} ended CANCELLED before the stage could close this run (closed by submit cancel)")
    status = submit("status", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=120)
    assert re.search(rf"^train_vqvae\s+stopped \(CANCELLED\)\s+{job}\s", status.stdout, re.M), status.stdout
