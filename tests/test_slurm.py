"""`cluster=slurm` against a real SLURM cluster on localhost (slurm/local-cluster.sh): training,
USR2 preemption -> requeue -> resume, time-limit requeue, two nodes, the stage=all chain,
status. Cancel: test_slurm_cancel.py. Failures (squeue, a rank, array tasks): test_slurm_failures.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import SLURM_FAST, SUBMIT, slurm_job_id, slurm_sh, submit, train_vqvae_run, unsplittable_tree
from pipeline.data import shards
from pipeline.launch import accounting, queue, records


def _wait_job(job: str, slurm: dict, timeout: float = 600) -> str | None:
    """The job's final state once it has left the queue (None if still queued after ``timeout``):
    the launch layer's own wait, which asks sacct again while slurmdbd lags squeue (under load sacct
    said RUNNING for a job squeue had already forgotten)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SLURM_CONF", slurm["SLURM_CONF"])
        return queue.wait_for_job(job, poll_s=2.0, timeout_s=timeout)


def _wait_for_first_checkpoint(submit_stdout: str, run_root: Path) -> Path:
    """Wait until the submitted train_vqvae job has saved a checkpoint; returns its stdout log."""
    stdout_log = Path(re.search(r"stdout:\s+(\S+)", submit_stdout).group(1))
    ckpt = run_root / "digits" / "train_vqvae" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert ckpt.exists(), stdout_log.read_text() if stdout_log.exists() else "no log"
    return stdout_log


def test_train_on_slurm_and_preemption_requeues_and_resumes(slurm, run_root, tmp_path):
    proc = submit("stage=train_vqvae", "cluster=slurm", f"run_root={run_root}", *SLURM_FAST, "train.max_steps=200",
                  "train.ckpt_every=20", "train.eval_every=1000", "cluster.time_min=60", cwd=tmp_path, env=slurm)
    assert proc.returncode == 0, proc.stderr
    job = slurm_job_id(proc.stdout)  # submit returned at once: the job is queued or running
    stdout_log = _wait_for_first_checkpoint(proc.stdout, run_root)
    slurm_sh(["scancel", "--signal=USR2", job], slurm)
    assert _wait_job(job, slurm) == "COMPLETED"
    assert "Restarts=1" in slurm_sh(["scontrol", "show", "job", job], slurm)
    log = stdout_log.read_text()
    assert "handing SIGUSR2 to submitit to requeue" in log
    stopped = int(re.search(r"checkpoint saved at step (\d+); rerun", log).group(1))
    resumed = re.search(r"resumed from \S+step_(\d+) \(step (\d+)\)", log)
    assert resumed, log[-3000:]
    client, run = train_vqvae_run(run_root)
    assert run.info.status == "FINISHED"
    assert json.loads((run_root / "digits" / "train_vqvae" / "mlflow_run.json").read_text())["attempts"] == 2
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 200
    assert int(resumed.group(2)) == stopped  # the requeued job continued from the saved step
    # the run says which job ran it, and each execution: the first, then the requeue
    tags = run.data.tags
    assert tags["slurm.job_id"] == job and tags["slurm.restart_count"] == "1", tags
    assert f"SLURM job {job} on " in tags["execution.1"] and f"SLURM job {job} requeue 1 on " in tags["execution.2"]
    assert (run_root / "digits" / "train_vqvae" / "model.pt").exists()


def test_a_stage_whose_job_is_still_queued_is_not_submitted_twice(slurm, run_root, tmp_path):
    args = ("stage=train_vqvae", "cluster=slurm", f"run_root={run_root}", *SLURM_FAST, "train.max_steps=100000",
            "cluster.time_min=10")
    proc = submit(*args, cwd=tmp_path, env=slurm)
    assert proc.returncode == 0, proc.stderr
    job = slurm_job_id(proc.stdout)
    to_cancel, waiting = [job], None
    try:
        again = submit(*args, cwd=tmp_path, env=slurm)  # both would write the same checkpoints
        assert again.returncode == 2, again.stdout
        assert re.search(rf"stage=train_vqvae: its SLURM job {job} is still (PENDING|RUNNING) -- .*scancel {job}",
                         again.stderr), again.stderr
        local = submit("stage=train_vqvae", f"run_root={run_root}", cwd=tmp_path, env=slurm)
        assert local.returncode == 2 and f"scancel {job}" in local.stderr, local.stderr
        # the chain depends on the queued job instead of queueing the stage again, and waits for it;
        # its squeue calls are counted by a wrapper in front of the real squeue
        wrapper, calls = tmp_path / "bin" / "squeue", tmp_path / "squeue.calls"
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {shutil.which("squeue")} "$@"\n')
        wrapper.chmod(0o755)
        env = {**os.environ, **slurm, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
        waiting = subprocess.Popen([SUBMIT, "stage=all", "cluster=slurm", f"run_root={run_root}", *SLURM_FAST,
                                    "wait=true"], cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (run_root / "digits" / "evaluate" / "jobs.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        slurm_sh(["scancel", job], slurm)
        out, err = waiting.communicate(timeout=180)
        queued = re.findall(r"queued(?: after [\d,]+)?\s+(\d+)$", out, re.M)
        to_cancel += queued
        assert waiting.returncode == 1 and f"stage train_vqvae (job {job}) ended CANCELLED" in err, out + err
        assert re.search(rf"^\s+train_vqvae\s+already (pending|running)\s+{job}$", out, re.M), out
        assert re.search(rf"^\s+encode\s+queued after {job}\s", out, re.M), out
        vqvae_jobs = json.loads((run_root / "digits" / "train_vqvae" / "jobs.json").read_text())
        assert [j["job_id"] for j in vqvae_jobs] == [job]
        assert len(queued) == 5, out  # encode, both priors, sample, evaluate
        # the chain's one look at which stages are live, then only the wait's watch: every job still
        # queued in one call (its own poll of the live job alone, every 5 s, is gone)
        asked = [line.split()[2].split(",") for line in calls.read_text().splitlines()]
        assert asked[0] == [job] and len(asked) > 1 and set(asked[1]) == {job, *queued}, (asked, queued)
        assert all(jobs != [job] and set(jobs) <= {job, *queued} for jobs in asked[1:]), (asked, queued)
    finally:
        slurm_sh(["scancel", *to_cancel], slurm)
        if waiting is not None and waiting.poll() is None:
            waiting.kill()
    assert _wait_job(job, slurm) == "CANCELLED"


@pytest.mark.parametrize("stage,named", [("prepare", ""), ("all", "sample_set=t2")])
def test_ctrl_c_while_waiting_stops_the_wait_not_the_jobs(slurm, tmp_path, stage, named):
    """wait=true only watches: Ctrl-C ends the wait with exit 130 and says how to watch or stop the
    jobs (a sample set's commands name it), which stay queued (no traceback, nothing cancelled)."""
    run_root = tmp_path / "runs"
    env = {**os.environ, **slurm, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([SUBMIT, f"stage={stage}", "cluster=slurm", f"run_root={run_root}", "wait=true",
                             "cluster.setup=['sleep 600']", *filter(None, [named])], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        printed = ""
        while "open:" not in printed:  # the last line before the wait
            line = proc.stdout.readline()
            assert line, printed + proc.stderr.read()
            printed += line
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        job = json.loads((run_root / "digits" / "prepare" / records.JOBS).read_text())[-1]["job_id"]
        assert proc.returncode == 130, printed + out + err
        assert "submit: stopped waiting (Ctrl-C); the SLURM jobs go on" in err and "Traceback" not in err, err
        where = f"experiment=digits {named + ' ' if named else ''}run_root={run_root}"
        assert f"watch:   submit status {where}" in err
        assert f"stop:    submit cancel {'stage=prepare ' if stage == 'prepare' else ''}{where}" in err
        assert slurm_sh(["squeue", "-h", "-j", job, "-o", "%T"], slurm).split(), "the job was cancelled"
    finally:
        proc.kill()
        for extra in {"", named}:  # a set's sample and evaluate are cancelled with its name
            submit("cancel", f"run_root={run_root}", *filter(None, [extra]), cwd=tmp_path, env=slurm, timeout=120)


def test_wait_says_once_why_a_job_will_not_start_and_goes_on_waiting(slurm, tmp_path):
    """wait=true on a job SLURM will never start by itself (here held) waited silently forever: it
    says why with the fix, once, and the fix as printed lets the wait end with the stage done."""
    env = {**os.environ, **slurm, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([SUBMIT, "stage=prepare", "cluster=slurm", f"run_root={tmp_path / 'runs'}", "wait=true",
                             "cluster.extra={hold: true}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    guard = threading.Timer(180, proc.kill)  # readline returns '' (and the test fails) if the line never comes
    guard.start()
    try:
        said = proc.stderr.readline()
        held = re.fullmatch(r"submit: still waiting: job (\d+) \(JobHeldUser\): will not start, it is held -- "
                            r"`(scontrol release \d+)` lets it start \(Ctrl-C stops the wait; the job stays queued\)\n",
                            said)
        assert held and held.group(2) == f"scontrol release {held.group(1)}", said
        slurm_sh(held.group(2).split(), slurm)
        out, err = proc.communicate(timeout=170)
        assert proc.returncode == 0, out + said + err
        assert "stage prepare: done" in out and "still waiting" not in err, out + err  # said once
    finally:
        guard.cancel()
        proc.kill()
        submit("cancel", f"run_root={tmp_path / 'runs'}", cwd=tmp_path, env=slurm, timeout=120)


def test_the_queue_watch_asks_squeue_about_all_jobs_in_one_call_and_keeps_which_left(slurm, tmp_path, monkeypatch):
    """wait=true on a chain watches all its jobs: one squeue call a poll names every job still queued
    (one call per job cost the controller up to seven calls each time), an array's tasks count as
    their job, a job that left the queue is not asked about again and is known to have left. Counted
    by a wrapper in front of the real squeue."""
    wrapper = tmp_path / "bin" / "squeue"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "squeue.calls"}\nexec {shutil.which("squeue")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    hold = ["sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "sleep 60"]
    jobs = [slurm_sh(hold, slurm).strip(), slurm_sh(hold, slurm).strip(),
            slurm_sh([*hold[:-2], "--array=0-1", *hold[-2:]], slurm).strip()]
    said: list[str] = []
    calls = tmp_path / "squeue.calls"
    try:
        with queue.QueueWatch(jobs, said.append, first_s=0.1, every_s=0.3) as watch:
            deadline = time.time() + 30
            while len(said) < 3:
                assert time.time() < deadline, (said, calls.read_text())
                time.sleep(0.1)
            slurm_sh(["scancel", jobs[0]], slurm)
            left = f"-h -j {','.join(jobs[1:])} -o %F %T %r"
            while left not in calls.read_text().splitlines():
                assert time.time() < deadline, calls.read_text()
                time.sleep(0.1)
            time.sleep(1)  # more polls: the cancelled job stays out of them
            assert watch.left(jobs[0]) and not any(watch.left(job) for job in jobs[1:])
            watch.wait_left(jobs[0])  # returns: it has left
        asked = calls.read_text().splitlines()
        first = asked.index(left)
        assert set(asked[:first]) == {f"-h -j {','.join(jobs)} -o %F %T %r"} and set(asked[first:]) == {left}, asked
        assert sorted(said) == sorted(queue.waiting_line(job, "JobHeldUser") for job in jobs), said  # once each
    finally:
        slurm_sh(["scancel", *jobs], slurm)


def _run_time_s(job: str, slurm: dict) -> int:
    run_time = re.search(r"RunTime=(?:(\d+)-)?(\d+):(\d+):(\d+)", slurm_sh(["scontrol", "show", "job", job], slurm))
    days, hours, minutes, seconds = (int(x or 0) for x in run_time.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def test_time_limit_requeue_resumes_and_completes(slurm, run_root, tmp_path, monkeypatch):
    # SLURM sends USR2 signal_delay_s before the time limit. How far a job gets before that depends on
    # this machine's speed (a fast one finished a 2-minute job before its signal), so the job gets an
    # hour and, once it trains, its limit is cut to end 40-100 s from now: the signal (70 s before
    # the end, checked every 30 s) comes while it still has a minute of steps left. Once requeued it
    # gets its hour back and completes.
    proc = submit("stage=train_vqvae", "cluster=slurm", f"run_root={run_root}", *SLURM_FAST, "train.max_steps=1500",
                  "train.ckpt_every=50", "train.eval_every=5000", "cluster.time_min=60",
                  "cluster.signal_delay_s=70", "cluster.max_requeues=5", cwd=tmp_path, env=slurm)
    assert proc.returncode == 0, proc.stderr
    job = slurm_job_id(proc.stdout)
    stdout_log = _wait_for_first_checkpoint(proc.stdout, run_root)
    first_run_s = _run_time_s(job, slurm)
    limit_min = -(-(first_run_s + 40) // 60)
    slurm_sh(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit_min}"], slurm)
    assert f"TimeLimit=00:{limit_min:02d}:00" in slurm_sh(["scontrol", "show", "job", job], slurm)
    deadline = time.time() + 200
    while "Restarts=0" in slurm_sh(["scontrol", "show", "job", job], slurm) and time.time() < deadline:
        time.sleep(1)
    slurm_sh(["scontrol", "update", f"JobId={job}", "TimeLimit=60"], slurm)
    assert _wait_job(job, slurm) == "COMPLETED"
    assert "Restarts=1" in slurm_sh(["scontrol", "show", "job", job], slurm)
    # the chain summary's run time counts both runs, not only the last one
    last_run = int(slurm_sh(["sacct", "-X", "-n", "-P", "-j", job, "-o", "ElapsedRaw"], slurm).split()[0])
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    assert accounting.elapsed_s(job) >= last_run + first_run_s
    log = stdout_log.read_text()
    stopped = int(re.search(r"stop requested \(SIGUSR2\); checkpoint saved at step (\d+)", log).group(1))
    assert 50 <= stopped < 1500
    assert re.search(rf"resumed from \S+step_0*{stopped} \(step {stopped}\)", log), log[-3000:]
    client, run = train_vqvae_run(run_root)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 1500


def test_two_nodes_train_data_parallel(slurm, run_root, tmp_path):
    proc = submit("stage=train_vqvae", "cluster=slurm", "cluster.nodes=2", "cluster.partition=high",
                  f"run_root={run_root}", *SLURM_FAST, "train.max_steps=20", "train.ckpt_every=20", "train.eval_every=20",
                  "tracking.system_metrics_interval=1", "wait=true", "wait_report_min=0.01", cwd=tmp_path, env=slurm,
                  timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = slurm_job_id(proc.stdout)
    # the wait said the training's progress as it moved (looking every 0.6 s; step 10 of 20 is written
    # seconds before the job ends), each position once, before the stage was said done
    said = re.findall(rf"^  running: train_vqvae \(job {job}\): step (\d+) of 20 \(\d+%\), \S+ steps/s, ETA (?:\d+ min )?\d+ s; "
                      r"updated (?:\d+ min )?\d+ s ago$", proc.stdout.split("stage train_vqvae: done")[0], re.M)
    assert said and said == sorted(set(said), key=int) and set(said) <= {"10", "20"}, proc.stdout
    # encode's inputs exist now: its command keeps the cluster and partition, not this job's resources
    assert f"next:    submit stage=encode cluster=slurm cluster.partition=high run_root={run_root} " \
           "data.num_workers=0 tracking.system_metrics_interval=1\n" in proc.stdout, proc.stdout
    nodes = slurm_sh(["sacct", "-X", "-n", "-P", "-j", job, "-o", "NodeList"], slurm).strip()
    assert nodes == "n[1-2]"
    logs = sorted((run_root / "digits" / "train_vqvae" / "logs").glob("*.log"))
    digests = {re.search(r"identical on all 2 rank\(s\): sha256 (\w+)", p.read_text()).group(1) for p in logs}
    assert len(logs) == 2 and len(digests) == 1
    # each rank runs as many CPU threads as the cores SLURM allotted it (cluster.cpus_per_task=1 of
    # the node's 2): torch's default, one per core of the machine, would oversubscribe a shared node
    assert all("1 CPU thread(s) per rank" in p.read_text() for p in logs), [p.read_text()[:3000] for p in logs]
    client, run = train_vqvae_run(run_root)
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    assert (run.data.tags["slurm.job_id"], run.data.tags["slurm.nodelist"]) == (job, "n[1-2]")
    # each node's system metrics, named by node: rank 0 logs n1's, the first rank on n2 logs n2's
    for name in ("n1", "n2"):
        assert len(client.get_metric_history(run.info.run_id, f"system/{name}/cpu_utilization_percentage")) >= 2
    assert not [k for k in run.data.metrics if k.startswith("system/cpu")], run.data.metrics


def test_chain_runs_every_built_stage_and_a_failure_cancels_the_rest(slurm, tmp_path):
    ok = submit("stage=all", "cluster=slurm", f"run_root={tmp_path / 'ok'}", *SLURM_FAST, "train.max_steps=20",
                "train.ckpt_every=20", "train.eval_every=20", "cluster.array_tasks=2", "sample.per_class=2",
                "train_vqvae:cluster.nodes=2", "wait=true", "wait_report_min=0.01", cwd=tmp_path, env=slurm, timeout=900)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    jobs = dict(re.findall(r"^\s*(\w+)\s+queued(?: after [\d,]+)?\s+(\d+)", ok.stdout, re.M))
    assert re.search(rf"train_vqvae\s+queued after {jobs['prepare']}\s", ok.stdout)
    assert re.search(rf"encode\s+queued after {jobs['prepare']},{jobs['train_vqvae']}\s", ok.stdout)
    for prior in ("train_top_prior", "train_bottom_prior"):  # side by side, each after encode only
        assert re.search(rf"{prior}\s+queued after {jobs['encode']}\s", ok.stdout), ok.stdout
    producers = ",".join(sorted((jobs[s] for s in ("train_vqvae", "train_top_prior", "train_bottom_prior")), key=int))
    assert re.search(rf"sample\s+queued after {producers}\s", ok.stdout), ok.stdout
    inputs = ",".join(sorted((jobs[s] for s in ("prepare", "train_vqvae", "sample")), key=int))
    assert re.search(rf"evaluate\s+queued after {inputs}\s", ok.stdout), ok.stdout
    # resources scoped to one stage: the VQ-VAE trained on both nodes, a prior on one
    nodes = {s: slurm_sh(["sacct", "-X", "-n", "-P", "-j", jobs[s], "-o", "NodeList"], slurm).split() for s in jobs}
    assert nodes["train_vqvae"] == ["n[1-2]"] and len(nodes["train_top_prior"]) == 1, nodes
    assert nodes["train_top_prior"][0] in ("n1", "n2"), nodes
    # while it waits, each stage is said done in turn, with its key metric: a long chain's wait is not silent
    waited, finished = ok.stdout.split("stage=all finished")
    said = re.findall(r"^  done:    (\w+) \(job (\d+)\), (\d) of 7, \d+ (?:s|min \d+ s) into the wait(.*)$", waited, re.M)
    assert [(stage, job, str(i)) for i, (stage, job) in enumerate(jobs.items(), 1)] == [d[:3] for d in said], waited
    assert said[1][3].startswith(": val PSNR ") and said[-1][3].startswith(": FID "), said
    # and, looking every 0.6 s, the progress of the stage it waits on as it moves: prepare's shards at
    # least (each stage's lines come before its "done:" line, with its own job)
    running = re.findall(r"^  running: (\w+) \(job (\d+)\): (?:step \d+ of 20|shards \d+ of \d+) \(\d+%\)", waited, re.M)
    assert ("prepare", jobs["prepare"]) in running and set(running) <= set(jobs.items()), waited
    for stage, job in set(running):
        assert waited.rindex(f"running: {stage} (job {job})") < waited.index(f"done:    {stage} (job {job})"), waited
    # once every job is done, the same summary as a local chain: wall time (from sacct), key metric
    assert re.search(r"^\s+train_vqvae\s+\d+ s\s+val PSNR [\d.]+ dB\s", finished, re.M), finished
    assert re.search(r"^\s+evaluate\s+\d+ s\s+FID \S+ \([\d.]+x real\)", finished, re.M), finished
    assert f"report:  {tmp_path / 'ok' / 'digits' / 'evaluate' / 'report.md'}" in finished
    status = submit("status", f"run_root={tmp_path / 'ok'}", cwd=tmp_path, env=slurm)
    assert re.search(r"prepare\s+done", status.stdout) and re.search(r"train_vqvae\s+done\s+step 20", status.stdout)
    for stage in ("encode", "train_top_prior", "train_bottom_prior", "sample", "evaluate"):
        assert re.search(rf"{stage}\s+done", status.stdout), status.stdout
    assert (tmp_path / "ok" / "digits" / "train_bottom_prior" / "model.pt").exists()
    assert shards.read_manifest(tmp_path / "ok" / "digits" / "sample" / "shards")["splits"]["samples"]["count"] == 20
    results = json.loads((tmp_path / "ok" / "digits" / "evaluate" / "results.json").read_text())["results"]
    assert {"fid", "cas/top1", "real/top1", "recon/psnr"} <= set(results)
    (evaluate_log,) = (tmp_path / "ok" / "digits" / "evaluate" / "logs").glob("*.log")
    assert len(re.findall(r"training classifier: .* 1 rank\(s\) \(slurm\)", evaluate_log.read_text())) == 2
    # the array stages' MLflow runs hold the stage's totals, whichever of their two tasks ended last
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'ok' / 'mlflow.db'}")
    for stage, total in (("prepare", "images"), ("encode", "codes"), ("sample", "samples")):
        done = json.loads((tmp_path / "ok" / "digits" / stage / "done.json").read_text())
        run = client.get_run(done["run_id"])
        assert run.data.metrics[total] == done["summary"][total] and run.info.status == "FINISHED", (stage, done)
    assert done["summary"]["samples"] == 20 and client.get_run(json.loads(
        (tmp_path / "ok" / "digits" / "prepare" / "done.json").read_text())["run_id"]).data.metrics["images"] == 1797

    # prepare fails in the job (a class-folder tree too small to split): train_vqvae is cancelled
    src = unsplittable_tree(tmp_path)
    bad_args = ("stage=all", "cluster=slurm", "data=folder", f"data.source={src}", f"run_root={tmp_path / 'bad'}",
                *SLURM_FAST, "cluster.array_tasks=1", "wait=true")
    bad = submit(*bad_args, cwd=tmp_path, env=slurm, timeout=600)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    # waiting, it names the failed stage's job, its error and its log (the traceback is there)
    assert re.search(r"^submit: stage prepare \(job \d+\) failed: ValueError: data.val_fraction", bad.stderr, re.M)
    failed_log = Path(re.search(r"^  log:     (\S+)$", bad.stderr, re.M).group(1))
    assert "Traceback (most recent call last):" in failed_log.read_text(), bad.stderr
    train_job = re.search(r"train_vqvae\s+queued after \d+\s+(\d+)", bad.stdout).group(1)
    assert _wait_job(train_job, slurm, timeout=300) == "CANCELLED"
    status = submit("status", f"run_root={tmp_path / 'bad'}", cwd=tmp_path, env=slurm)
    assert re.search(r"prepare\s+failed \(FAILED\)", status.stdout), status.stdout
    assert re.search(r"train_vqvae\s+failed \(CANCELLED\)", status.stdout), status.stdout
    # why prepare failed (recorded by its job), its log with the traceback, the job's SLURM output; not
    # train_vqvae, which never started
    prepare_job = re.search(r"^prepare\s+failed \(FAILED\)\s+(\d+)", status.stdout, re.M).group(1)
    why = status.stdout.split("\nfailures:\n")[1].splitlines()
    assert re.fullmatch(r"  prepare: ValueError: data.val_fraction=\S+ of 2 images gives 0 val images; .*\)", why[0]), why
    assert why[1] == f"    log:  {failed_log}" and failed_log.parent == tmp_path / "bad" / "digits" / "prepare" / "logs"
    assert why[2] == f"    SLURM output of job {prepare_job}: {tmp_path / 'bad' / 'digits' / 'prepare' / 'slurm' / prepare_job}/"
    section = why[:next((i for i, line in enumerate(why) if not line.startswith("  ")), len(why))]
    assert len(section) == 3, why
    # the failed stage is rerun by the command that queued it, data=folder and all (status has only run_root)
    ready = status.stdout.split("can run now")[1].splitlines()[1:]
    assert ready == ["  " + shlex.join(["submit", *bad_args])], status.stdout

