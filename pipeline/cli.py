"""`submit`: compose the config, validate it, run the chosen stage on the chosen executor.

Exit codes: 0 success, 1 the stage failed, 2 bad command line or config (nothing was created),
75 a training stopped on request after a checkpoint, 130/143 interrupted/terminated (the MLflow run
is marked KILLED), 141 its output's reader went away (`| head`).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable

from pipeline.config import ConfigError, compose, stage_name, to_yaml
from pipeline.config_checks import validate
from pipeline.config_help import USAGE, help_text


def _help(args: list[str]) -> int:
    """`--help`: the stages and groups; with a stage=, that stage's keys, values and meanings."""
    if not any(a.partition("=")[0] == "stage" for a in args):
        print(help_text())
        return 0
    from pipeline.config import split_stage_scoped
    from pipeline.config_help import stage_help

    overrides = split_stage_scoped(args)[0] if "stage=all" in args else _own_overrides(args)
    print(stage_help(compose(overrides), overrides))
    return 0


def _unreadable_tqdm_environment() -> str:
    """tqdm converts its TQDM_* variables when it is imported (every stage draws progress bars) and
    raises a bare ValueError on one it cannot read, naming neither the variable nor the fix; '' if
    they read."""
    try:
        importlib.import_module("tqdm")
    except ValueError as e:
        names = ", ".join(f"{k}={v!r}" for k, v in sorted(os.environ.items()) if k.startswith("TQDM_"))
        return (f"{names}: tqdm cannot read it ({e}) -- unset it, or give a value of the right type, "
                "e.g. TQDM_MININTERVAL=5 (seconds between redraws)")
    return ""


def command() -> int:
    """The `submit` command (also ``python -m pipeline.cli``): `main` on the command line."""
    try:
        return main()
    finally:
        # Python's exit ends with garbage collections that walk every object torch, DeepSpeed and
        # MLflow made (~1.5 s of each command here) only to free memory the OS takes back anyway:
        # what exists now moves to a generation no collection visits; atexit handlers still run
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:  # a bad key, value or path, found before the stage starts: nothing was created
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `submit --help | head`: the reader went away; nothing failed here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit raises again
        return 141  # 128 + SIGPIPE, as a shell tool killed by it


def _main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        return _help([a for a in args if a not in ("-h", "--help")])
    unreadable = _unreadable_tqdm_environment()
    if unreadable:
        print(f"submit: error: {unreadable}", file=sys.stderr)
        return 2
    if args[:1] == ["status"]:
        return _status(args[1:])
    if args[:1] == ["cancel"]:
        return _cancel(args[1:])
    print_cfg = False
    if "--cfg" in args:
        i = args.index("--cfg")
        if args[i + 1:i + 2] != ["job"]:
            print("submit: error: --cfg takes 'job' (print the resolved config and exit)", file=sys.stderr)
            return 2
        print_cfg = True
        del args[i:i + 2]
    flags = [a for a in args if a.startswith("-")]
    if flags:
        print(f"submit: error: unknown option {flags[0]}\n{USAGE}", file=sys.stderr)
        return 2

    from pipeline.launch import executors, preflight

    if "stage=all" in args:
        return _chain(args, print_cfg)
    cfg = compose(_own_overrides(args))
    stage = str(cfg.stage.name)
    if print_cfg:
        print(to_yaml(cfg), end="")
        return 0
    validate(cfg)
    preflight.check_stage(cfg, stage)
    prepared = preflight.prepared_otherwise(cfg, stage)
    if prepared:
        print(f"warning: {prepared}", file=sys.stderr)

    from pipeline.config import stage_dir
    from pipeline.launch import records
    from pipeline.launch.stage_lock import StageBusy

    # the command `submit status` offers to resume a stage with: the one that produces it
    remember = (lambda: None) if cfg.verify else (lambda: records.record_command(stage_dir(cfg, stage), args))
    if cfg.cluster.name == "slurm":
        return _submit_to_slurm(cfg, stage, args, remember)
    try:
        with executors.exclusive(cfg, stage):  # held from before anything of this run is written
            remember()
            result = executors.run(cfg, stage)
    except StageBusy as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("submit: interrupted; the MLflow run is marked KILLED", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - the stage's failure becomes the exit status
        from pipeline.tracking import EXIT_REQUEUE, StageKilled, StageStopped

        if isinstance(e, StageStopped):
            print(f"submit: stage {stage} stopped: {e}", file=sys.stderr)
            return 130 if e.signum == signal.SIGINT else EXIT_REQUEUE

        from pipeline.launch.failures import failure_log

        log = "" if isinstance(e, StageKilled) else failure_log([stage_dir(cfg, stage)])
        print(f"submit: stage {stage} failed: {type(e).__name__}: {e}{log}", file=sys.stderr)
        return 143 if isinstance(e, StageKilled) else 1
    if result["run_id"] is None:  # a torchrun rank other than 0: rank 0 prints the summary below
        from pipeline.training.distributed import detect

        print(f"stage {stage}: done on rank {detect().rank} (log {result['log']})")
        return 0
    print(f"\nstage {stage}: done\n  outputs: {result['stage_dir']}\n  log:     {result['log']}\n"
          f"  MLflow:  run {result['run_id']} at {result['tracking_uri']}\n"
          f"  open:    {ui_command_for(result['tracking_uri'])}")
    for command in _next_commands(cfg, stage, args):
        print(f"  next:    {command}")
    if stage == "evaluate":
        print(f"  report:  {result['stage_dir']}/report.md")
    return 0


def _own_overrides(args: list[str]) -> list[str]:
    """A single stage's overrides: `<stage>:<key>=...` scoped to it become plain `<key>=...`; one scoped
    to another stage is refused (it would be ignored)."""
    from pipeline.config import split_stage_scoped

    plain, scoped = split_stage_scoped(args)
    chosen = [a.partition("=")[2] for a in plain if a.partition("=")[0] == "stage"][-1:]
    for stage, own in scoped.items():
        if [stage] != chosen:
            raise ConfigError(f"{stage}:{own[0].partition('=')[0]}", f"applies to stage={stage} only, and this "
                              f"command runs stage={chosen[0] if chosen else '?'}",
                              f"pass it to `submit stage={stage}` or `submit stage=all`")
    return [*plain, *scoped.get(chosen[0], [])] if chosen else plain


def _next_commands(cfg, stage: str, args: list[str]) -> list[str]:
    """`submit` commands for the stages this one's outputs unblock (all their inputs now exist, not
    done yet), carrying the overrides that say which experiment they belong to."""
    from pipeline.config import stage_dir
    from pipeline.launch.records import shared_overrides
    from pipeline.stages import BUILT, DONE, NEEDS, ORDER, missing_inputs

    carried = shared_overrides(args)
    return [shlex.join(["submit", f"stage={s}", *carried]) for s in ORDER
            if s in BUILT and stage in (p for p, _ in NEEDS.get(s, ()))
            and not (stage_dir(cfg, s) / DONE).exists() and not missing_inputs(cfg, s)]


def _submit_to_slurm(cfg, stage: str, args: list[str], remember: Callable[[], None]) -> int:
    from pipeline.config import stage_dir
    from pipeline.launch import executors, records, waiting
    from pipeline.tracking import tracking_uri

    try:
        jobs = executors.submit_slurm(cfg, stage)
    except executors.JobRefused as e:
        print(f"submit: error: {e} -- {e.FIX}", file=sys.stderr)
        return 2
    sdir = stage_dir(cfg, stage)
    records.add_job(sdir, jobs[0].job_id.split("_")[0])
    remember()  # once queued: a command sbatch refused is not the one that resumes the stage
    print(f"stage {stage}: submitted to SLURM\n{executors.job_summary(jobs)}\n  outputs: {sdir}\n"
          f"  MLflow:  experiment '{cfg.experiment}' at {tracking_uri(cfg)} (run id in "
          f"{sdir / 'mlflow_run.json'} once the job starts)\n  open:    {ui_command_for(tracking_uri(cfg))}")
    if not cfg.wait:
        return 0
    ended = waiting.wait_for_stage(cfg, stage, jobs)
    if ended:
        return ended
    run = json.loads((sdir / "mlflow_run.json").read_text())
    print(f"stage {stage}: done (MLflow run {run['run_id']})")
    for command in _next_commands(cfg, stage, args):
        print(f"  next:    {command}")
    return 0


def _status(overrides: list[str]) -> int:
    from pipeline.launch.records import status_table

    print(status_table(compose(["stage=all", *overrides])))
    return 0


def _cancel(args: list[str]) -> int:
    """`submit cancel [stage=<s>]`: cancel the experiment's queued and running SLURM jobs."""
    from pipeline.launch.cancel import cancel, stages_of
    from pipeline.launch.queue import SlurmUnavailable
    from pipeline.launch.records import experiment_args
    from pipeline.stages import ORDER

    stage = next((a.partition("=")[2] for a in args if a.partition("=")[0] == "stage"), None)
    if stage is not None and (stage not in ORDER or stage == "all"):
        raise ConfigError(f"stage={stage}", "not a stage to cancel",
                          f"pass one of {', '.join(s for s in ORDER if s != 'all')}, or no stage= for all")
    cfg = compose(["stage=all", *(a for a in args if a.partition("=")[0] != "stage")])
    print(f"submit cancel: experiment '{cfg.experiment}' in {cfg.run_root}")
    try:
        lines, cancelled = cancel(cfg, stages_of(cfg, stage))
    except SlurmUnavailable as e:
        print(f"submit: error: {e} -- nothing was cancelled; run it again once `squeue` answers", file=sys.stderr)
        return 1
    print("\n".join(lines))
    if cancelled > 0:
        print(f"  nothing was deleted: submitting a stage again resumes it from its outputs\n"
              f"  status:  submit status {experiment_args(cfg)}")
    return 1 if cancelled < 0 else 0


def _chain(args: list[str], print_cfg: bool) -> int:
    """stage=all: run (local) or queue (slurm) every built stage not done yet, then a summary."""
    from pipeline.config import stage_dir
    from pipeline.launch import chain, failures, preflight, queue, records, waiting
    from pipeline.tracking import tracking_uri

    cfgs = chain.compose_all(args)
    cfg = next(iter(cfgs.values()))
    if print_cfg:
        for stage, c in cfgs.items():
            print(f"# --- {stage}\n{to_yaml(c)}", end="")
        return 0
    todo, done, _ = chain.stages_to_run(cfgs)
    preflight.check_chain(cfgs, todo)
    changed = chain.done_with_other_settings(cfgs, done)
    if changed:
        print("warning: stages done before with other settings are not run again (outputs are never "
              "overwritten):\n  " + "\n  ".join(changed) + "\n  to run them with these settings: "
              "experiment=<a new name>, or sample_set=<a name> for sample and evaluate settings", file=sys.stderr)
    start = time.time()
    if cfg.cluster.name == "slurm":
        try:
            rows = chain.submit_slurm(cfgs, args)
        except queue.SlurmUnavailable as e:
            print(f"submit: error: {e} -- nothing was queued; submit again once `squeue` answers", file=sys.stderr)
            return 2
        except chain.ChainRefused as e:
            print(f"submit: error: {e.refused} -- {e.refused.FIX} ({e.refused.stage}:cluster.<key>=<value> sets one "
                  "for that stage alone)", file=sys.stderr)
            if e.queued:  # valid jobs of this chain: the same command, fixed, queues the rest after them
                print("  queued before it, left in the queue: " + ", ".join(f"{stage_name(cfg, r['stage'])} (job "
                      f"{r['job']})" for r in e.queued) + "\n  submit again once fixed: stages done or in the queue "
                      "are not queued twice, the rest queue after them", file=sys.stderr)
            return 2
        print(f"experiment '{cfg.experiment}': chain queued on SLURM (each job afterok the jobs whose "
              "outputs it reads; a failure cancels what depends on it)")
        for r in rows:
            print(f"  {stage_name(cfg, r['stage']):<20}{r['status']:<28}{r['job']}")
        print(f"  watch:   submit status {records.experiment_args(cfg)}\n"
              f"  open:    {ui_command_for(tracking_uri(cfg))}")
        if cfg.wait:
            ended = waiting.wait_for_chain(cfg, cfgs, rows)
            if ended:
                return ended
            _print_finished(cfg, chain.slurm_summary_rows(cfgs, rows), time.time() - start)
        return 0
    for stage in todo:
        records.record_command(stage_dir(cfg, stage), args)
    try:
        rows = chain.run_local(cfgs)
    except BaseException as e:  # noqa: BLE001 - the failing stage's error is the chain's
        log = failures.failure_log([stage_dir(c, s) for s, c in cfgs.items()]) if isinstance(e, Exception) else ""
        print(f"submit: stage=all stopped: {type(e).__name__}: {e}{log}\n  fix the cause and rerun the same command: "
              "finished stages are skipped, a training stage resumes from its last checkpoint\n"
              f"  status:  submit status {records.experiment_args(cfg)}", file=sys.stderr)
        ctrl_c = isinstance(e, KeyboardInterrupt) or getattr(e, "signum", None) == signal.SIGINT
        return 130 if ctrl_c else 1
    _print_finished(cfg, rows, time.time() - start)
    return 0


def _print_finished(cfg, rows: list[dict], seconds: float) -> None:
    """A finished chain's last lines: each stage's wall time, key metric and outputs, then where to look."""
    from pipeline.config import stage_dir
    from pipeline.launch import chain
    from pipeline.tracking import tracking_uri

    print(f"\nexperiment '{cfg.experiment}': stage=all finished")
    print(chain.summary_table(rows, seconds))
    report = stage_dir(cfg, "evaluate") / "report.md"
    if report.exists():
        print(f"  report:  {report}")
    uri = tracking_uri(cfg)
    browse = "" if uri.startswith("http") else "   # then browse http://127.0.0.1:5000"
    print(f"  MLflow:  {ui_command_for(uri)}{browse}, experiment '{cfg.experiment}'")


def ui_command_for(uri: str) -> str:
    from pipeline.tracking import ui_command

    return ui_command(uri)


if __name__ == "__main__":
    sys.exit(command())
