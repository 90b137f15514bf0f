"""One picklable callable per stage execution (the dinov2 pattern): set up the stage dir, logs,
config snapshot and MLflow run, then call the library stage function."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline import atomic
from pipeline.config import stage_dir
from pipeline.data.shards import OutputsMadeOtherwise
from pipeline.launch import failures
from pipeline.stages import DONE, StageContext, stage_function
from pipeline.tracking import StageKilled, StageRun, StageStopped, tracking_uri, ui_command
from pipeline.training.distributed import OtherRankFailed, detect, require_allotted_gpus, use_allotted_cpus

log = logging.getLogger("pipeline")


class ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm: on a terminal a log line would otherwise land on the end of the progress
    bar's line (bars are on stderr, logs on stdout); tqdm.write clears the bars, writes, redraws them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _setup_logging(log_file: Path) -> logging.Handler:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handler = logging.FileHandler(log_file)
    handler.setFormatter(fmt)
    root = logging.getLogger()
    root.addHandler(handler)
    if not any(getattr(h, "_pipeline_console", False) for h in root.handlers):
        console = ConsoleHandler(sys.stdout)
        console.setFormatter(fmt)
        console._pipeline_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
    root.setLevel(logging.INFO)
    return handler


def _raise_killed(signum: int, _frame: Any) -> None:
    raise StageKilled(f"received {signal.Signals(signum).name}")


def catch_stop_signals() -> Callable[[], None]:
    """SIGTERM raises StageKilled in the stage; returns what puts the earlier handlers back.

    SIGCONT goes back to the kernel's default meanwhile. SLURM ends a job step with SIGCONT then
    SIGTERM; with a Python handler for SIGCONT (submitit logs "Bypassing signal SIGCONT") the
    SIGCONT is still pending on the main thread when the SIGTERM comes, so Linux hands the SIGTERM
    to another thread. A main thread blocked in a sleep or a lock wait then misses it (Python checks
    after the SIGCONT, not again) and SLURM kills the process KillWait later, its MLflow run left
    RUNNING: about 1 stop in 7 on a busy node. Without a handler a SIGCONT is never pending."""
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_killed),
                signal.SIGCONT: signal.signal(signal.SIGCONT, signal.SIG_DFL)}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return restore


def _requeue_if_scheduled(stopped: StageStopped, rank: int, ends_with_rank0: bool) -> None:
    """Under submitit, hand the stop to its signal handler now that the checkpoint is saved: it
    calls ``checkpoint()``, requeues the job (counting time-outs) and exits. A SIGTERM (plain
    ``scancel``) is not requeued: submitit's handler for it does nothing. ``ends_with_rank0``:
    SLURM ends the other tasks when one exits with an error (cluster.kill_on_bad_exit)."""
    if "SUBMITIT_FOLDER" not in os.environ or stopped.signum is None:
        return
    handler = signal.getsignal(stopped.signum)
    if rank != 0:
        # rank 0 requeues the whole job (USR2), which kills this task; on SIGTERM it marks its
        # MLflow run KILLED and uploads its log: exiting first (with an error) would have SLURM
        # kill rank 0 mid-way, so this task waits to be ended with it
        if stopped.signum == signal.SIGUSR2 or ends_with_rank0:
            log.info("stopped; waiting for rank 0 to %s", "requeue the job" if stopped.signum == signal.SIGUSR2
                     else "finish")
            time.sleep(300)
        return
    if callable(handler) and handler not in (_raise_killed,):
        log.info("%s; handing %s to submitit to requeue", stopped, signal.Signals(stopped.signum).name)
        handler(stopped.signum, None)


class StageJob:
    """Runs one stage of one experiment. Holds the config as YAML so it pickles anywhere."""

    def __init__(self, cfg: DictConfig, stage: str, task: int = 0, tasks: int = 1):
        self.stage, self.task, self.tasks = stage, task, tasks
        self.cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)

    def checkpoint(self) -> Any:
        """submitit calls this on preemption/time-out: requeue a fresh callable. It resumes from
        the stage dir (checkpoints, completed shards), so it needs no state of its own."""
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.cfg, self.stage, self.task, self.tasks))

    @property
    def cfg(self) -> DictConfig:
        return OmegaConf.create(self.cfg_yaml)

    def __call__(self) -> dict[str, Any]:
        cfg = self.cfg
        sdir = stage_dir(cfg, self.stage)
        (sdir / "logs").mkdir(parents=True, exist_ok=True)
        env = detect()
        rank = env.rank
        job = failures.slurm_job() if cfg.cluster.name == "slurm" else ""  # '' in submit's own process
        ends_with_rank0 = bool(cfg.cluster.get("kill_on_bad_exit", False))  # one task's exit ends the job
        suffix = (f"-task{self.task}" if self.tasks > 1 else "") + (f"-rank{rank}" if rank else "")
        log_file = sdir / "logs" / f"{self.stage}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}.log"
        handler = _setup_logging(log_file)
        finished_before = None  # (done.json, config.yaml) of a done stage run again, to restore on a refusal
        if rank == 0 and self.task == 0 and not cfg.verify:  # running again: done once it finishes again
            if (sdir / DONE).exists() and (sdir / "config.yaml").exists():
                finished_before = (sdir / DONE).read_text(), (sdir / "config.yaml").read_text()
            (sdir / DONE).unlink(missing_ok=True)
            failures.forget_earlier(sdir, job)
        atomic.write_text(sdir / "config.yaml", self.cfg_yaml)
        refused: OutputsMadeOtherwise | None = None
        restore_signals = catch_stop_signals()
        try:
            log.info("stage %s of experiment '%s': outputs in %s, log %s", self.stage,
                     cfg.experiment, sdir, log_file)
            threads = use_allotted_cpus()
            if threads:
                log.info("%s", threads)
            with StageRun(cfg, self.stage, sdir, self.task, job) as run:
                if run.run_id is not None:
                    log.info("MLflow run %s at %s (%s)", run.run_id, tracking_uri(cfg), ui_command(tracking_uri(cfg)))
                else:  # another rank or array task: the run is rank 0's (of task 0)
                    log.info("MLflow: this stage's run is rank 0's (of array task 0), at %s", tracking_uri(cfg))
                run.set_tags({"log_file": str(log_file)})  # this execution's; all are under logs/
                try:
                    try:
                        require_allotted_gpus()  # in the run: its FAILED status says why
                        result = stage_function(self.stage)(cfg, StageContext(
                            self.stage, sdir, run, logging.getLogger(f"pipeline.{self.stage}"), self.task,
                            self.tasks))
                    except Exception as e:
                        failures.log_traceback(handler, self.stage)  # before the log goes to MLflow
                        run.set_tags({f"execution.{run.attempt + 1}.error": failures.message(e)})  # in the UI
                        if not (finished_before and isinstance(e, OutputsMadeOtherwise)):
                            raise
                        refused = e  # nothing was written: its run stays FINISHED, the stage done
                    finally:
                        handler.flush()
                        run.log_artifact(log_file, "logs")
                except StageKilled as stop:  # a SIGTERM may end the job after another rank failed
                    # caught out here: the signal lands wherever Python is, in the stage or while its
                    # error is being handled (a compiler the same SIGTERM killed raised first)
                    cause = failures.other_rank_failed(sdir, job, stop, env.world_size)
                    if cause is None:
                        raise
                    failed = OtherRankFailed(f"{stop} after {cause}")
                    log.error("stage %s failed: %s", self.stage, failed)
                    run.set_tags({f"execution.{run.attempt + 1}.error": failures.message(failed)})
                    raise failed from stop
            if refused is not None and finished_before:
                atomic.write_text(sdir / DONE, finished_before[0])
                atomic.write_text(sdir / "config.yaml", finished_before[1])
                log.warning("stage %s: its finished outputs were not touched and it is still done", self.stage)
                raise refused
            if result.get("complete", True) and rank == 0 and not cfg.verify:
                # the stage's outputs are final: `stage=all` skips it, `submit status` reports it done
                atomic.write_json(sdir / DONE, {"finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                "run_id": run.run_id, "log": str(log_file),
                                                "summary": {k: v for k, v in result.items()
                                                            if isinstance(v, (int, float, str))}})
            return {**result, "stage_dir": str(sdir), "log": str(log_file), "run_id": run.run_id,
                    "tracking_uri": tracking_uri(cfg)}
        except StageStopped as stopped:
            log.warning("%s", stopped)  # in the stage's own log too, not only the job's stderr
            _requeue_if_scheduled(stopped, rank, ends_with_rank0)
            raise
        except Exception as e:  # for `submit status`: what went wrong, where its log is
            if e is refused:
                raise
            where = ", ".join(filter(None, [f"task {self.task}" if self.tasks > 1 else "",
                                           f"rank {rank}" if env.world_size > 1 else ""]))
            failures.record(sdir, e, log_file, where, job)
            if rank != 0 and "SUBMITIT_FOLDER" in os.environ and ends_with_rank0:
                # this task's exit ends the job (kill_on_bad_exit): where rank 0 fails too (the
                # ranks' agreements), give it time to mark its MLflow run FAILED and exit first
                grace_s = float(cfg.cluster.rank0_grace_s)
                log.info("failed; waiting up to %g s for rank 0 to end the job (cluster.rank0_grace_s)", grace_s)
                time.sleep(grace_s)
            raise
        finally:
            restore_signals()
            logging.getLogger().removeHandler(handler)
            handler.close()
            if "SUBMITIT_FOLDER" in os.environ:
                gc.freeze()  # this job's process ends with its stage: no collections at exit (see cli.command)
