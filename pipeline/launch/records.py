"""What `submit status` reads: per stage, the jobs submitted, the done marker, checkpoints, MLflow."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import atomic
from pipeline.config import GROUPS, changed_settings, flatten, stage_dir, stage_name
from pipeline.evaluation.report import sample_sets_table
from pipeline.launch import accounting, failures, mlflow_runs, stage_lock
from pipeline.launch.queue import SlurmOnce, SlurmUnavailable, queue_states, waiting_line
from pipeline.stages import ORDER, PROGRESS, depends_on, shard_progress, vqvae_model
from pipeline.tracking import tracking_uri
from pipeline.wording import first_few

JOBS = "jobs.json"  # SLURM job ids submitted for a stage, oldest first
COMMAND = "command.json"  # the `submit` arguments (and working dir) that last ran or queued a stage

# Overrides that locate or describe the experiment every stage reads, and where on the cluster its
# jobs go; not one stage's own settings (train.*, sample.*, ...) nor its resources (cluster.nodes,
# cluster.mem_gb, cluster.time_min, deepspeed.micro_batch, ...), which differ per stage.
_SITE = tuple(f"cluster.{k}" for k in ("partition", "account", "qos", "constraint", "exclude", "setup", "extra"))
_SHARED_KEYS = ("experiment", "run_root", "sample_set", *GROUPS, *_SITE)
_SHARED_PREFIXES = ("data.", "model.", "tracking.", "cluster.extra.")


# Config keys that say where or how a stage ran, was tracked, checked or logged, not what its outputs
# hold (the directory names, experiment and sample_set, are the same for the same stage dir)
NOT_OUTPUTS = ("cluster.", "tracking.", "stage.", "run_root", "experiment", "sample_set", "wait", "cancel_grace_s",
               "resume", "verify", "prepare.workers", "encode.workers", "encode.batch_size", "sample.method",
               "train.log_every", "train.eval_every", "train.eval_samples", "train.keep_ckpts",
               "train.sample_grid")  # "resume" covers resume_weights_only; sample.method: identical samples


def settings_changed(cfg: DictConfig, stage: str, only: tuple[str, ...] = ()) -> str:
    """``key=old there, new now; ...`` for each key ``stage``'s outputs depend on (of ``only``, where
    given) that its last run recorded (config.yaml) with another value than ``cfg``'s; '' where none,
    or nothing is recorded. Keys the stage did not record (added since) are left out."""
    recorded = stage_dir(cfg, stage) / "config.yaml"
    if not recorded.exists():
        return ""
    then, now = flatten(OmegaConf.load(recorded)), flatten(cfg)
    return changed_settings(then, now, lambda k: not k.startswith(NOT_OUTPUTS) and depends_on(stage, k, now)
                            and (not only or k in only), limit=4)


def shared_overrides(args: list[str]) -> list[str]:
    """The overrides of a `submit` command that another stage of the same experiment needs too."""
    keys = [a.partition("=")[0].lstrip("+~") for a in args]
    return [a for a, k in zip(args, keys) if k != "stage" and (k in _SHARED_KEYS or k.startswith(_SHARED_PREFIXES))]


def experiment_args(cfg: DictConfig) -> str:
    """The overrides naming this experiment's stage dirs, for the `submit status` / `submit cancel`
    commands printed to the user (a sample set's sample and evaluate dirs carry its name)."""
    named = f" sample_set={cfg.sample_set}" if cfg.get("sample_set") else ""
    return f"experiment={cfg.experiment}{named} run_root={cfg.run_root}"


def record_command(sdir: Path, args: list[str]) -> None:
    """Remember how this stage was run, so `submit status` can print the command that resumes it."""
    Path(sdir).mkdir(parents=True, exist_ok=True)
    atomic.write_json(Path(sdir) / COMMAND, {"args": list(args), "cwd": os.getcwd(),
                                             "submitted": time.strftime("%Y-%m-%d %H:%M:%S")})


def add_job(sdir: Path, job_id: str) -> None:
    path = Path(sdir) / JOBS
    jobs = json.loads(path.read_text()) if path.exists() else []
    jobs.append({"job_id": job_id, "submitted": time.strftime("%Y-%m-%d %H:%M:%S")})
    atomic.write_json(path, jobs)


def live_job(sdir: Path) -> tuple[str, str] | None:
    """The stage's last SLURM job while it is still in the queue (pending, running, requeued):
    (job id, state), else None. From ``squeue``, which needs no accounting and forgets finished jobs."""
    return live_jobs([sdir])[0]


def live_jobs(sdirs: list[Path]) -> list[tuple[str, str] | None]:
    """``live_job`` of each stage directory, all asked in one squeue call."""
    jobs = [last_job(sdir) for sdir in sdirs]
    states = queue_states([job for job in jobs if job])  # no job: squeue is not asked
    return [(job, states[job]) if job and states.get(job) else None for job in jobs]


def _last_record(sdir: Path) -> dict:
    path = Path(sdir) / JOBS
    return json.loads(path.read_text())[-1] if path.exists() else {}


def last_job(sdir: Path) -> str:
    """The stage's last SLURM job (an array's own id), '' where it never had one."""
    return _last_record(sdir).get("job_id", "")


def stage_status(cfg: DictConfig, stage: str, slurm: SlurmOnce) -> dict[str, Any]:
    from pipeline.stages import DONE

    sdir = stage_dir(cfg, stage)
    run_id, run_status = mlflow_runs.status(sdir)
    latest = sdir / "checkpoints" / "latest"
    row = {"stage": stage, "status": "not started", "job": "", "checkpoint": "", "run_id": run_id}
    if latest.exists():
        row["checkpoint"] = "step " + str(int(latest.read_text().strip()[5:]))
    last = _last_record(sdir)
    job = last.get("job_id", "")
    if (sdir / DONE).exists():
        row["status"] = "done"
    elif job:
        try:  # the queue first: it needs no accounting (sacct may be disabled on the cluster)
            queued, unanswered = slurm.queue(job), False
        except SlurmUnavailable:
            queued, unanswered = None, True
        state = queued or slurm.accounting(job, left_queue=not unanswered)
        if queued:  # CONFIGURING, SUSPENDED, REQUEUE_HOLD, ...: still in the queue
            word = "running" if state in ("RUNNING", "COMPLETING") else "pending"
            if state == "PENDING":
                row["waiting"] = waiting_line(job, slurm.reason(job))
        elif unanswered and state == "UNKNOWN":  # neither squeue nor sacct answered: not "failed"
            word, state = "unknown", "squeue failed"
        elif not unanswered and state in accounting.LIVE:  # gone from the queue; slurmdbd not told how it ended
            word, state = "ended", f"sacct still says {state}"
        else:
            word = {"RUNNING": "running", "PENDING": "pending", "REQUEUED": "pending", "COMPLETING": "running",
                    "COMPLETED": "incomplete"}.get(state, "failed")
            if word == "failed" and run_status == "RUNNING":  # killed before it could close its run
                run_status = row["closed"] = mlflow_runs.close_after_job(sdir, job, state, "submit status")
            if word == "failed" and run_status == "KILLED":  # asked to stop (submit cancel, scancel)
                word = "stopped"
        row["status"], row["job"] = f"{word} ({state})", job
    elif run_status:
        row["status"] = {"FAILED": "failed", "KILLED": "stopped", "RUNNING": "running or crashed",
                         "FINISHED": "incomplete"}.get(run_status, run_status.lower())
        if run_status == "RUNNING":  # a local run: its process holds the stage's lock while it lives
            who = stage_lock.holder(sdir)
            if who is None and not stage_lock.last_held_here(sdir):
                who = "?"  # taken on another machine: a filesystem may keep flocks per node
            row["status"] = {None: "crashed", "?": row["status"]}.get(who, "running")
            if who is None:
                row["closed"] = mlflow_runs.close_after_crash(sdir, "submit status")
    elif stage == "train_vqvae" and vqvae_model(cfg) != sdir / "model.pt":
        row["status"] = "not needed"  # encode used a VQ-VAE named with encode.vqvae
    if row["status"].startswith(("failed", "crashed")):
        since = time.mktime(time.strptime(last["submitted"], "%Y-%m-%d %H:%M:%S")) if last else 0.0
        row["why"] = failures.lines(sdir, job, since)
    return row


# A stage in one of these states is (re)run by the same `submit` command: it starts or resumes.
_TO_RUN = ("not started", "failed", "stopped", "incomplete", "crashed")


def _recorded(sdir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((sdir / COMMAND).read_text())
    except (OSError, ValueError):
        return None  # never run by this version (or the record is unreadable): no command to show


def resume_command(cfg: DictConfig, stage: str) -> str | None:
    """The `submit` command that starts or resumes ``stage``: the one it was run with, else the one
    of the latest stage producing its inputs, with that one's experiment-wide overrides (a
    `stage=all` command as it was: it runs whatever is not done). None where neither was recorded."""
    from pipeline.stages import NEEDS

    own = _recorded(stage_dir(cfg, stage))
    # the latest producer first: sample's command names the sample_set that prepare's does not
    producers = reversed(NEEDS.get(stage, ()))
    record = own or next((r for r in (_recorded(stage_dir(cfg, p)) for p, _ in producers) if r), None)
    if record is None:
        return None
    args = record["args"]
    if record is not own and "stage=all" not in args:
        args = [f"stage={stage}", *shared_overrides(args)]
    command = shlex.join(["submit", *args])
    # relative paths in the overrides (run_root=runs, data.source=...) mean what they meant there
    return command if record["cwd"] == os.getcwd() else f"cd {shlex.quote(record['cwd'])} && {command}"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


def progress_line(sdir: Path, now: float | None = None) -> str:
    """``step 1200 of 5000 (24%), 3.1 steps/s, ETA 21 min 03 s; updated 12 s ago`` (a training) or
    ``shards 12 of 40 (30%), ...`` (a shard-parallel stage) from the stage's progress file; empty if
    it has none."""
    now = time.time() if now is None else now
    shards = shard_progress(Path(sdir), now)
    if shards is not None:
        return _shards_line(shards)
    try:
        p = json.loads((Path(sdir) / PROGRESS).read_text())
        step, max_steps, rate, age = int(p["step"]), int(p["max_steps"]), float(p["steps_per_s"]), now - float(p["time"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: status goes on without it
        return ""
    age = max(0.0, age)
    # from now: the steps left at the last update's rate, less the time since that update
    left = max(0.0, (max_steps - step) / rate - age) if rate > 0 else None
    return (f"step {step} of {max_steps} ({100 * step / max(1, max_steps):.0f}%), {rate:.3g} steps/s, "
            f"ETA {'?' if left is None else duration(left)}; updated {duration(age)} ago")


def _shards_line(p: dict[str, float]) -> str:
    """Shards with a completion marker; the rate over those completed since the last task started."""
    line = f"shards {p['shards_complete']} of {p['shards_total']} ({100 * p['fraction']:.0f}%)"
    if "eta_s" in p:
        line += f", {p['shards_per_min']:.3g} shards/min, ETA {duration(p['eta_s'])}"
    return line + (f"; last shard {duration(p['last_shard_age_s'])} ago" if "last_shard_age_s" in p
                   else "; none complete yet")


def _send_kept_records(cfg: DictConfig) -> list[str]:
    """Records a stage kept while MLflow did not answer go now, if it answers."""
    from pipeline import mlflow_outbox

    uri, exp_dir = tracking_uri(cfg), Path(cfg.run_root) / str(cfg.experiment)
    kept = sorted(exp_dir.glob(f"*/{mlflow_outbox.OUTBOX}"))
    if not kept:
        return []
    away = mlflow_runs.away(uri)
    if away:
        return [f"does not answer ({away}): records kept in {', '.join(map(str, kept))} are sent "
                "by the next submit or status once it does"]
    return mlflow_outbox.send_kept(exp_dir, uri)


def status_table(cfg: DictConfig) -> str:
    """The stage table, why the failed stages failed, the stages that can run now (their inputs
    exist; not done, queued or running), then the evaluated sample sets."""
    from pipeline.stages import BUILT, DONE, missing_inputs

    mlflow_lines = _send_kept_records(cfg)
    sdirs = [stage_dir(cfg, s) for s in ORDER if s != "all"]
    slurm = SlurmOnce([last_job(sdir) for sdir in sdirs if not (sdir / DONE).exists()])  # asked in one call
    rows = [stage_status(cfg, s, slurm) for s in ORDER if s != "all"]
    names = [stage_name(cfg, r["stage"]) for r in rows]
    w_stage, w_status = max(20, *(len(n) + 2 for n in names)), max(24, *(len(r["status"]) + 2 for r in rows))
    head = f"{'stage':<{w_stage}}{'status':<{w_status}}{'job':<10}{'checkpoint':<14}MLflow run"
    lines = [f"experiment '{cfg.experiment}' in {Path(cfg.run_root) / str(cfg.experiment)}", head]
    lines += [f"{n:<{w_stage}}{r['status']:<{w_status}}{r['job']:<10}{r['checkpoint']:<14}{r['run_id']}"
              for n, r in zip(names, rows)]
    failed = [r for r in rows if r.get("why")]
    if failed:
        lines.append("failures:")
        for r in failed:
            lines += [f"  {stage_name(cfg, r['stage'])}: {r['why'][0]}"] + [f"    {line}" for line in r["why"][1:]]
    ready = [r["stage"] for r in rows if r["stage"] in BUILT and r["status"].startswith(_TO_RUN)
             and not missing_inputs(cfg, r["stage"])]
    commands = {s: resume_command(cfg, s) for s in ready}
    if ready:
        lines.append("can run now (a failed or stopped stage resumes from its last checkpoint):")
        lines += [f"  {c}" for c in dict.fromkeys(c for c in commands.values() if c)]
    unknown = [s for s in ready if not commands[s]]
    exp_dir = Path(cfg.run_root) / str(cfg.experiment)
    if not exp_dir.exists():
        lines.append(f"  submit stage=all {experiment_args(cfg)} plus the data=, model=, cluster= it should use")
    elif unknown:  # not recorded (run by an older version): status does not know the overrides (data=, ...)
        lines.append(f"  {', '.join(unknown)}: submit stage=<name> with this experiment's overrides")
    waiting = [r for r in rows if r.get("waiting")]
    if waiting:
        lines.append("waiting in the queue (SLURM's reason):")
        lines += [f"  {stage_name(cfg, r['stage'])}: {r['waiting']}" for r in waiting]
    running = [(r["stage"], progress_line(stage_dir(cfg, r["stage"]))) for r in rows if r["status"].startswith("running")]
    if any(line for _, line in running):
        lines.append("progress of the running stages:")
        lines += [f"  {stage_name(cfg, s)}: {line}" for s, line in running if line]
    if slurm.error:
        lines.append(f"SLURM: {slurm.error} (their states are from accounting, sacct, where it answers)")
    if slurm.accounting_error:
        lines.append(f"SLURM: {slurm.accounting_error}; sacct was not asked again for the other stages' jobs")
    mlflow_lines += [f"run {r['run_id']} of {stage_name(cfg, r['stage'])} was left RUNNING by its killed process: "
                     f"closed as {r['closed']}" for r in rows if r.get("closed")]
    if mlflow_lines:
        lines += [f"MLflow ({tracking_uri(cfg)}):"] + [f"  {line}" for line in mlflow_lines]
    sets = sample_sets_table(exp_dir)
    if sets:
        lines += ["", "evaluated sets of samples (FID and CAS also as multiples of real data's):", sets]
    if not exp_dir.exists():
        lines.append(_nothing_ran(cfg))
    return "\n".join(lines)


def _nothing_ran(cfg: DictConfig) -> str:
    """Said under the table of an experiment with no stage dir yet: often a mistyped experiment= or a
    status asked from another folder than the one the chain ran from (run_root=./runs by default)."""
    root = Path(cfg.run_root)
    there = sorted(p.name for p in root.iterdir() if p.is_dir() and any(  # sample-<set>: a sample set's
        d.is_dir() and d.name.partition("-")[0] in ORDER for d in p.iterdir())) if root.is_dir() else []
    if there:
        return (f"nothing has run for experiment '{cfg.experiment}' in {root}; experiments there: "
                f"{first_few(there)} -- pass experiment=<one of them> to see it")
    return (f"nothing has run in {root}{'' if root.is_dir() else ' (no such folder)'} -- pass run_root=<where it "
            "ran> to see a run made elsewhere (by default runs/ under the folder submit was run from)")
