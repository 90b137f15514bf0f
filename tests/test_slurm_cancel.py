"""`submit cancel` against a real SLURM cluster on localhost (slurm/local-cluster.sh): a chain's queued
and running jobs, a job or array task still in its sbatch script's setup lines, a two-node training."""

from __future__ import annotations

import os
import re
import shutil
import time

from conftest import SLURM_FAST, slurm_job_id, slurm_sh, submit, train_vqvae_run


def test_cancel_stops_the_queued_and_running_jobs_of_a_chain_and_deletes_nothing(slurm, tmp_path):
    run_root = tmp_path / "runs"
    proc = submit("stage=all", "cluster=slurm", f"run_root={run_root}", *SLURM_FAST, "train.max_steps=100000",
                  "cluster.time_min=10", cwd=tmp_path, env=slurm, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = dict(re.findall(r"^\s*(\w+)\s+queued(?: after [\d,]+)?\s+(\d+)", proc.stdout, re.M))
    assert len(jobs) == 7, proc.stdout
    try:
        deadline = time.time() + 300  # prepare done, train_vqvae training, the rest waiting for it
        while not (run_root / "digits" / "train_vqvae" / "progress.json").exists():
            assert time.time() < deadline, slurm_sh(["squeue"], slurm)
            time.sleep(1)
        wrapper = tmp_path / "bin" / "squeue"  # counts cancel's squeue calls
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "squeue.calls"}\nexec {shutil.which("squeue")} "$@"\n')
        wrapper.chmod(0o755)
        counted = {**slurm, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
        cancel = submit("cancel", f"run_root={run_root}", cwd=tmp_path, env=counted, timeout=300)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        # which jobs are live: one squeue call for all the stages, not one per stage
        first = (tmp_path / "squeue.calls").read_text().splitlines()[0]
        assert first == f"-h -j {','.join(jobs.values())} -o %F %T %r", (first, jobs)
        # the running training got SIGTERM alone (no SIGKILL after KillWait) and stopped with a checkpoint
        stopped = re.search(rf"train_vqvae\s+{jobs['train_vqvae']}\s+running -> stopped, checkpoint at step (\d+) "
                            r"\(SLURM state FAILED\)", cancel.stdout)
        assert stopped, cancel.stdout
        for stage in ("encode", "train_top_prior", "train_bottom_prior", "sample", "evaluate"):
            assert re.search(rf"{stage}\s+{jobs[stage]}\s+pending -> cancelled", cancel.stdout), cancel.stdout
        assert not re.search(r"^\s+prepare\s", cancel.stdout, re.M)  # finished: nothing to cancel
        assert all(not slurm_sh(["squeue", "-h", "-j", job], slurm).strip() for job in jobs.values())
    finally:
        slurm_sh(["scancel", *jobs.values()], slurm)
    # the training saved a checkpoint on its way out: the latest is the step the cancel names, and the
    # stage's own log says it stopped on SIGTERM
    latest = (run_root / "digits" / "train_vqvae" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{int(stopped.group(1)):08d}", latest
    (log,) = (run_root / "digits" / "train_vqvae" / "logs").glob("*.log")
    assert f"stop requested (SIGTERM); checkpoint saved at step {int(stopped.group(1))}" in log.read_text()
    assert (run_root / "digits" / "prepare" / "done.json").exists()  # nothing deleted
    assert (run_root / "digits" / "prepare" / "shards" / "dataset.json").exists()
    again = submit("cancel", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=120)
    assert again.returncode == 0 and "no SLURM job of experiment 'digits' is queued or running" in again.stdout
    # the stopped training is not reported as a failure, and status offers to resume it
    status = submit("status", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=120)
    assert re.search(rf"^train_vqvae\s+stopped \(FAILED\)\s+{jobs['train_vqvae']}\s+step {int(stopped.group(1))}\s",
                     status.stdout, re.M), status.stdout
    assert "can run now" in status.stdout and "submit stage=all" in status.stdout


def test_cancel_ends_a_job_in_its_setup_lines_at_once(slurm, tmp_path):
    """A job SLURM shows RUNNING while its sbatch script runs cluster.setup has no srun step that
    SIGTERM could reach (scancel signals steps only) and no training to checkpoint: it is cancelled
    outright, not waited on for cancel_grace_s (600 s, longer than this test's timeout)."""
    run_root = tmp_path / "runs"
    proc = submit("stage=prepare", "cluster=slurm", f"run_root={run_root}", "cluster.setup=['sleep 600']",
                  cwd=tmp_path, env=slurm)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = slurm_job_id(proc.stdout)
    try:
        deadline = time.time() + 120
        while "RUNNING" not in slurm_sh(["squeue", "-h", "-j", job, "-o", "%T"], slurm):
            assert time.time() < deadline, slurm_sh(["squeue"], slurm)
            time.sleep(1)
        cancel = submit("cancel", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=120)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        assert re.search(rf"prepare\s+{job}\s+running -> cancelled \(in its setup lines: no step had started\)",
                         cancel.stdout), cancel.stdout
        assert not slurm_sh(["squeue", "-h", "-j", job], slurm).strip()  # its queued array tasks too
    finally:
        slurm_sh(["scancel", job], slurm)
    assert not (run_root / "digits" / "prepare" / "done.json").exists()


def test_cancel_ends_an_array_task_in_its_setup_lines_at_once_beside_one_in_its_step(slurm, tmp_path):
    """A running array with task 1 in its srun step and task 0 still in its setup lines: SIGTERM
    reaches task 1's step only, so task 0 is cancelled outright at once, not after cancel_grace_s
    (600 s, longer than this test's timeout)."""
    run_root, hold = tmp_path / "runs", tmp_path / "hold"
    hold.mkdir()
    # task 1's step holds in its python's startup (a sitecustomize on PYTHONPATH), task 0 in setup
    (hold / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('SLURM_ARRAY_TASK_ID') == '1':\n    time.sleep(600)\n")
    (hold / "setup.sh").write_text(f"export PYTHONPATH={hold}:$PYTHONPATH\n"
                                   'if [ "$SLURM_ARRAY_TASK_ID" = 0 ]; then sleep 600; fi\n')
    proc = submit("stage=prepare", "cluster=slurm", f"run_root={run_root}", "cluster.array_tasks=2",
                  "cluster.mem_gb=1", "cluster.cpus_per_task=1", f"cluster.setup=['. {hold / 'setup.sh'}']",
                  cwd=tmp_path, env=slurm)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = slurm_job_id(proc.stdout)
    try:
        deadline = time.time() + 120
        while not (f"{job}_1.0" in slurm_sh(["squeue", "-h", "-s", "-j", job, "-o", "%i"], slurm).split()
                   and f"{job}_0" in slurm_sh(["squeue", "-h", "-t", "RUNNING", "-j", job, "-o", "%i"], slurm).split()):
            assert time.time() < deadline, slurm_sh(["squeue", "-s"], slurm)
            time.sleep(1)
        cancel = submit("cancel", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=120)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        assert re.search(rf"prepare\s+{job}\s+running -> stopped \(SLURM state \w+\); task {job}_0 cancelled in "
                         r"its setup lines$", cancel.stdout, re.M), cancel.stdout
        assert not slurm_sh(["squeue", "-h", "-j", job], slurm).strip()
    finally:
        slurm_sh(["scancel", job], slurm)
    assert not (run_root / "digits" / "prepare" / "done.json").exists()


def test_cancel_stops_a_two_node_training_with_its_checkpoint_and_mlflow_status(slurm, run_root, tmp_path):
    """A job of several tasks ends when one of them exits with an error (cluster.kill_on_bad_exit):
    a stopped training's rank 1 must not end the job while rank 0 is still marking its MLflow run."""
    proc = submit("stage=train_vqvae", "cluster=slurm", "cluster.nodes=2", "cluster.partition=high",
                  f"run_root={run_root}", *SLURM_FAST, "train.max_steps=100000", "cluster.time_min=10", cwd=tmp_path,
                  env=slurm, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = slurm_job_id(proc.stdout)
    try:
        deadline = time.time() + 300
        while not (run_root / "digits" / "train_vqvae" / "progress.json").exists():
            assert time.time() < deadline, slurm_sh(["squeue"], slurm)
            time.sleep(1)
        cancel = submit("cancel", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=300)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    finally:
        slurm_sh(["scancel", job], slurm)
    stopped = re.search(rf"train_vqvae\s+{job}\s+running -> stopped, checkpoint at step (\d+) ", cancel.stdout)
    assert stopped, cancel.stdout
    logs = sorted((run_root / "digits" / "train_vqvae" / "logs").glob("*.log"))
    assert len(logs) == 2 and all(f"checkpoint saved at step {stopped.group(1)}" in p.read_text() for p in logs)
    client, run = train_vqvae_run(run_root)
    assert run.info.status == "KILLED", run.info.status  # rank 0 ended its run before the job ended
    # rank 1 waited for rank 0 to finish: rank 0 exited by itself, then SLURM ended rank 1 (rank 1
    # used to exit first and SLURM terminated rank 0 while it was still marking its run)
    err = (run_root / "digits" / "train_vqvae" / "slurm" / job / f"{job}_0_log.err").read_text()
    assert "task 0: Exited with exit code 1" in err and "task 0: Terminated" not in err, err[-2000:]
    status = submit("status", f"run_root={run_root}", cwd=tmp_path, env=slurm, timeout=120)
    assert re.search(rf"^train_vqvae\s+stopped \(FAILED\)\s+{job}\s+step {stopped.group(1)}\s", status.stdout,
                     re.M), status.stdout
