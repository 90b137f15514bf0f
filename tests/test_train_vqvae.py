"""`submit stage=train_vqvae` with the real DeepSpeed engine (CPU, gloo): learning, export,
restarts after SIGKILL and SIGUSR2, exact resume, two ranks, NaN guard."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from mlflow.tracking import MlflowClient

from conftest import SUBMIT, run_group, submit
from pipeline.config import compose
from pipeline.data.shard_images import write_image_shard
from pipeline.data.streams import ordered_batches
from pipeline.models import VQVAE2
from pipeline.stages.train_vqvae import VQVAETask
from pipeline.training.engine import cpu_emulates_bf16

FAST = ["deepspeed.micro_batch=16", "data.num_workers=0", "train.warmup_steps=10", "train.log_every=10",
        "train.eval_samples=64"]


def _args(run_root, *extra):
    return ["stage=train_vqvae", f"run_root={run_root}", *FAST, *extra]


def _run(run_root):
    record = json.loads((run_root / "digits" / "train_vqvae" / "mlflow_run.json").read_text())
    client = MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    return client, client.get_run(record["run_id"])


def _history(client, run, key):
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def _wait_for_checkpoint(proc, ckpt_dir, tag, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = ckpt_dir / "latest"
        if latest.exists() and latest.read_text().strip() >= tag:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before {tag}: {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no checkpoint {tag} within {timeout}s")


def _popen(args, cwd):
    """`submit` in a process group of its own, as a terminal's foreground job is."""
    return subprocess.Popen([SUBMIT, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                            start_new_session=True)


def test_learns_logs_and_exports(run_root, tmp_path):
    proc = submit(*_args(run_root, "train.max_steps=200", "train.eval_every=50", "train.ckpt_every=100",
                         "tracking.system_metrics_interval=1"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = _run(run_root)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "train_vqvae"
    loss = _history(client, run, "loss")
    assert loss[-1][1] < loss[0][1] / 2, loss
    psnr = dict(_history(client, run, "val_psnr"))
    assert sorted(psnr) == [50, 100, 150, 200] and psnr[200] > psnr[50] + 2, psnr
    for key in ("recon", "commit", "lr", "grad_norm", "samples_per_s", "loader_wait_fraction",
                "perplexity_top", "usage_bottom", "restarted_top", "corrupt_samples"):
        assert _history(client, run, key), key
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("val_reconstructions" in p for p in images), images
    # tracking.system_metrics (default true): the job's CPU and memory are sampled
    # every tracking.system_metrics_interval seconds (1 here): about one sample per second of the run,
    # whatever this machine's speed (a quarter of that leaves room for the monitor's start-up)
    cpu = _history(client, run, "system/cpu_utilization_percentage")
    seconds = (run.info.end_time - run.info.start_time) / 1000
    assert len(cpu) >= max(3, seconds / 4), (seconds, cpu)
    # stderr is a pipe here, as a SLURM job's is a file: the training's progress bar is drawn at its
    # start, once a minute and at its end (and again after each line logged through it, which clears
    # it), not every 2 s as on a terminal
    bars = re.findall(r"vqvae:\s+\d+%\|[^|]*\|\s*(\d+)/200 ", proc.stderr)
    logged = len(re.findall(r"step \d+: ", proc.stdout))
    assert bars[0] == "0" and bars[-1] == "200", bars
    assert len(bars) <= 3 + seconds / 60 + logged, (seconds, logged, bars)
    assert _history(client, run, "system/system_memory_usage_megabytes")

    blob = torch.load(run_root / "digits" / "train_vqvae" / "model.pt", weights_only=True)
    assert blob["kind"] == "vqvae" and blob["resolution"] == 32 and blob["num_classes"] == 10
    model = VQVAE2(**blob["model_config"]["vqvae"])
    model.load_state_dict(blob["state_dict"])
    top, bottom = model.encode(torch.zeros(2, 3, 32, 32))
    assert top.shape == (2, 4, 4) and bottom.shape == (2, 8, 8)
    assert "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    ckpts = sorted(p.name for p in (run_root / "digits" / "train_vqvae" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000100", "step_00000200"]
    # DeepSpeed's init on CPU compiles nothing: its shared-memory op, and the probe of which ops a
    # compiler could build (gcc lines in the log), are skipped
    (log,) = (run_root / "digits" / "train_vqvae" / "logs").glob("train_vqvae-*.log")
    assert "gcc " not in log.read_text()

    # run again, done: nothing to train, and model.pt is kept as it is (later stages know it by its
    # sha256), also where another stage's model section or a lower max_steps is asked for; the summary
    # still carries the validation
    sdir = run_root / "digits" / "train_vqvae"
    exported = (sdir / "model.pt").read_bytes(), (sdir / "model.pt").stat().st_mtime_ns
    for extra, said in ((["train.max_steps=200"], "vqvae: already trained to train.max_steps=200: nothing to train"),
                        (["train.max_steps=150", "model.top_prior.layers=3"],
                         "vqvae: the checkpoint is at step 200, past train.max_steps=150: nothing to train")):
        again = submit(*_args(run_root, *extra, "train.ckpt_every=100"), cwd=tmp_path, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert said in again.stdout + again.stderr and "holds these weights already: kept" in again.stdout
        assert ((sdir / "model.pt").read_bytes(), (sdir / "model.pt").stat().st_mtime_ns) == exported
        assert json.loads((sdir / "done.json").read_text())["summary"]["val_psnr"] == pytest.approx(psnr[200], abs=1e-3)


def test_sigkill_then_rerun_resumes_the_same_run(run_root, tmp_path):
    ckpt_dir = run_root / "digits" / "train_vqvae" / "checkpoints"
    proc = _popen(_args(run_root, "train.max_steps=5000", "train.ckpt_every=20", "train.eval_every=1000"),
                  tmp_path)
    _wait_for_checkpoint(proc, ckpt_dir, "step_00000040")
    # a second submit of the running stage is refused before it writes anything
    command = (run_root / "digits" / "train_vqvae" / "command.json").read_bytes()
    busy = submit(*_args(run_root, "train.max_steps=60"), cwd=tmp_path)
    assert busy.returncode == 2, busy.stdout + busy.stderr
    assert re.search(rf"stage=train_vqvae: already running in process {proc.pid} on \S+ since ", busy.stderr), busy.stderr
    assert (run_root / "digits" / "train_vqvae" / "command.json").read_bytes() == command
    status = submit("status", f"run_root={run_root}", cwd=tmp_path)
    assert re.search(r"^train_vqvae\s+running\s", status.stdout, re.M), status.stdout  # its process holds the lock
    progress = re.search(r"^  train_vqvae: step (\d+) of 5000 \(\d+%\), ([\d.]+) steps/s, ETA (\d+ min )?\d+ s; "
                         r"updated \d+ s ago$", status.stdout, re.M)
    assert progress and int(progress.group(1)) >= 40 and float(progress.group(2)) > 0, status.stdout
    assert proc.poll() is None  # the first goes on
    proc.send_signal(signal.SIGKILL)  # its lock goes with it: the rerun below is not refused
    proc.communicate()
    killed_at = (ckpt_dir / "latest").read_text().strip()
    status = submit("status", f"run_root={run_root}", cwd=tmp_path)  # MLflow still says RUNNING; no process does
    assert re.search(rf"^train_vqvae\s+crashed\s+step {int(killed_at[5:])}", status.stdout, re.M), status.stdout
    assert "can run now" in status.stdout and "progress of the running stages" not in status.stdout
    # killed, it recorded no error: status says so and names the log the killed process wrote
    logs = sorted((run_root / "digits" / "train_vqvae" / "logs").glob("train_vqvae-*.log"))
    assert status.stdout.split("\nfailures:\n")[1].splitlines()[:2] == [
        "  train_vqvae: the stage recorded no error: it was ended from outside (see the state, the log's end)",
        f"    log:  {logs[-1]}"], status.stdout
    # status closed the run the killed process left RUNNING (the MLflow UI showed it running)
    assert re.search(r"^  run \w+ of train_vqvae was left RUNNING by its killed process: closed as FAILED$",
                     status.stdout, re.M), status.stdout
    _, run = _run(run_root)
    run_id = run.info.run_id
    assert run.info.status == "FAILED" and "closed by submit status" in run.data.tags["execution.1.ended"], run.info
    assert run.info.end_time == int(logs[-1].stat().st_mtime * 1000)  # when its process last wrote
    later = submit("status", f"run_root={run_root}", cwd=tmp_path)  # closed once: now a failed run
    assert re.search(rf"^train_vqvae\s+failed\s+step {int(killed_at[5:])}", later.stdout, re.M), later.stdout
    assert "left RUNNING" not in later.stdout

    again = submit(*_args(run_root, "train.max_steps=" + str(int(killed_at[5:]) + 30), "train.ckpt_every=20",
                          "train.eval_every=1000"), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt_dir / killed_at}" in again.stdout
    client, run = _run(run_root)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    steps = [s for s, _ in _history(client, run, "loss")]
    assert len(steps) == len(set(steps)), steps  # no step logged twice
    assert max(steps) == int(killed_at[5:]) + 30  # the step kept counting
    assert json.loads((run_root / "digits" / "train_vqvae" / "mlflow_run.json").read_text())["attempts"] == 2


@pytest.mark.parametrize("stop, extra, resume_with", [
    (signal.SIGUSR2, [], []), (signal.SIGUSR2, ["deepspeed.bf16=true"], []),
    (signal.SIGUSR2, ["deepspeed.zero_stage=2", "deepspeed.grad_accum=2"], []),
    (signal.SIGINT, ["data.num_workers=2"], []),  # Ctrl-C in a terminal: every process, loader workers too
    # stopped under ZeRO-0, resumed by ZeRO-2 (its optimizer state converted): as if ZeRO-2 all along
    # (ZeRO-2 keeps convolutions contiguous: both do here)
    (signal.SIGUSR2, ["train.channels_last=false"], ["deepspeed.zero_stage=2"]),
], ids=["fp32", "bf16", "zero2-accum2", "ctrl-c-workers2", "zero0-resumed-by-zero2"])
def test_a_stop_signal_checkpoints_and_resume_is_exact(run_root, tmp_path, stop, extra, resume_with):
    bf16 = "deepspeed.bf16=true" in extra
    # bf16 takes half the steps: CPUs without AVX-512 BF16 run its convolutions ~30x slower than fp32
    max_steps = 60 if bf16 else 120
    args = [f"train.max_steps={max_steps}", "train.ckpt_every=20", "train.eval_every=1000", *extra]
    # the reference: the resume's command, uninterrupted, in another run_root
    ref_root = tmp_path / "ref"
    shutil.copytree(run_root, ref_root)
    ref = submit(*_args(ref_root, *args, *resume_with), cwd=tmp_path, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    said = ref.stdout + ref.stderr
    assert re.search(r"training vqvae: .*, cpu, " + ("bf16" if bf16 else "fp32"), said)
    # bf16 on a CPU that emulates it is slow: the log says so, and how to train in fp32
    assert ("CPU without bf16 units" in said) == (bf16 and cpu_emulates_bf16()), said[-3000:]

    ckpt_dir = run_root / "digits" / "train_vqvae" / "checkpoints"
    proc = _popen(_args(run_root, *args), tmp_path)
    _wait_for_checkpoint(proc, ckpt_dir, "step_00000020")
    os.killpg(proc.pid, stop) if stop == signal.SIGINT else proc.send_signal(stop)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == (130 if stop == signal.SIGINT else 75), err[-3000:]  # 75: the requeue status
    stopped_at = int((ckpt_dir / "latest").read_text().strip()[5:])
    assert 20 <= stopped_at < max_steps
    assert f"checkpoint saved at step {stopped_at}" in err
    client, run = _run(run_root)
    assert run.info.status == "KILLED"

    again = submit(*_args(run_root, *args, *resume_with), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert ("this job has ZeRO stage 2: its optimizer state is converted" in said) == bool(resume_with), said[-3000:]
    a = torch.load(ref_root / "digits" / "train_vqvae" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(run_root / "digits" / "train_vqvae" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), (k, stopped_at)


def test_nan_marks_failed_and_keeps_the_checkpoint(run_root, tmp_path):
    proc = submit(*_args(run_root, "train.max_steps=100", "train.ckpt_every=20", "train.eval_every=1000",
                         "train.inject_nan_at_step=30"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 1
    assert "non-finite loss or gradient norm at step 30" in proc.stderr
    assert "the last checkpoint, step_00000020, is intact" in proc.stderr and "lower train.lr" in proc.stderr
    _, run = _run(run_root)
    assert run.info.status == "FAILED" and "step 30" in run.data.tags["error"]
    ckpt_dir = run_root / "digits" / "train_vqvae" / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000020"
    assert not (ckpt_dir / "step_00000030").exists()
    assert not (run_root / "digits" / "train_vqvae" / "model.pt").exists()

    logs = sorted((run_root / "digits" / "train_vqvae" / "logs").iterdir())
    for stage in ("stage=train_vqvae", "stage=all"):  # refused before anything starts, alone or in a chain
        args = [a for a in _args(run_root, "train.max_steps=100", "resume=false") if not a.startswith("stage=")]
        refused = submit(stage, *args, cwd=tmp_path, timeout=600)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert re.search(r"resume=false: \S+checkpoints holds checkpoints \(latest step_00000020\) .* "
                         r"experiment=<a new name>", refused.stderr), refused.stderr
        # another model: refused too, naming what changed (the job would have failed after starting)
        refused = submit(stage, *args[:-1], "model.vqvae.res_blocks=3", cwd=tmp_path, timeout=600)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert (f"submit: error: stage=train_vqvae: {ckpt_dir / 'step_00000020'} was trained with another model or "
                "dataset configuration (model.vqvae.res_blocks=2 there, 3 now) -- pass the values it was trained "
                "with to resume it, or experiment=<a new name> to train from scratch") in refused.stderr
    assert sorted((run_root / "digits" / "train_vqvae" / "logs").iterdir()) == logs
    assert _run(run_root)[1].info.status == "FAILED"  # still the NaN's run, not a new failure
    assert (ckpt_dir / "step_00000020").exists()  # nothing deleted


def test_two_ranks_agree_and_one_process_resumes_their_checkpoint(run_root, tmp_path, temp_dir_under_basetemp):
    port = 29000 + os.getpid() % 1000
    earlier_launches = set(temp_dir_under_basetemp.glob("torchelastic_*"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "pipeline.cli", *_args(run_root, "train.max_steps=30", "train.ckpt_every=30",
                                         "train.eval_every=30", "deepspeed.zero_stage=2")]
    proc = run_group(cmd, cwd=tmp_path, timeout=600,
                     env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # torchrun's log dir, which it never deletes, went where pytest removes it, not to /tmp
    assert len(set(temp_dir_under_basetemp.glob("torchelastic_*")) - earlier_launches) == 1
    # one summary (rank 0's, with its MLflow run); rank 1 says it is done and where its log is
    assert proc.stdout.count("stage train_vqvae: done\n") == 1 and "MLflow:  run None" not in proc.stdout
    assert re.search(r"stage train_vqvae: done on rank 1 \(log \S+-rank1\.log\)", proc.stdout), proc.stdout
    both = proc.stdout + proc.stderr
    assert "MLflow: this stage's run is rank 0's" in both and "MLflow run None" not in both
    logs = sorted((run_root / "digits" / "train_vqvae" / "logs").glob("*.log"))
    digests = {re.search(r"identical on all 2 rank\(s\): sha256 (\w+)", p.read_text()).group(1) for p in logs}
    assert len(logs) == 2 and len(digests) == 1  # each rank computed the same digest of its weights
    client, run = _run(run_root)
    assert run.data.tags["world_size"] == "2"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # rank 1 logged nothing of its own

    # ZeRO-2 sharded the optimizer state over the two ranks: one process resumes it re-sharded
    # (DeepSpeed's universal format), weights and EMA codebooks bit for bit: the export is the same
    # file (tests/test_checkpoints.py: ZeRO-0 on any number of ranks, other ZeRO-1/2 layouts, refusals)
    ckpts = run_root / "digits" / "train_vqvae" / "checkpoints"
    for steps in (30, 40):
        ok = submit(*_args(run_root, f"train.max_steps={steps}", "deepspeed.zero_stage=2"), cwd=tmp_path, timeout=600)
        assert ok.returncode == 0, ok.stderr[-3000:]
        out = ok.stdout + ok.stderr
        assert re.search(r"step_00000030 was written by 2 data-parallel rank\(s\), this job has 1: resumed with its "
                         r"whole optimizer state, re-sharded", out)
        assert re.search(r"resumed from \S+step_00000030 \(step 30\)\n", out) and not (ckpts / "universal").exists()
        if steps == 30:
            assert f"identical on all 1 rank(s): sha256 {digests.pop()}" in out and "holds these weights already" in out
    resumed = _run(run_root)[1]
    assert resumed.info.run_id == run.info.run_id and [s for s, _ in _history(client, resumed, "loss")][-2:] == [30, 40]


def test_validation_takes_a_class_balanced_val_subset_decoded_as_the_stream_decodes_it(run_root, tmp_path, caplog):
    cfg = compose(["stage=train_vqvae", f"run_root={run_root}", "train.eval_samples=30", "deepspeed.micro_batch=8"])
    task = VQVAETask(cfg, None)
    rng = torch.get_rng_state()
    x = torch.cat(list(task._val_batches()))
    assert torch.equal(rng, torch.get_rng_state())  # validating leaves training's randomness alone
    assert np.bincount(task.val.labels, minlength=10).tolist() == [3] * 10  # not the first 30 val images
    crop = "none" if cfg.data.augment == "none" else "center"
    stream = {key: image for b in ordered_batches(task.val_urls, batch_size=64, resolution=int(cfg.data.resolution),
                                                  augment=crop, num_workers=0) if "image" in b
              for key, image in zip(b["key"], b["image"])}
    assert x.shape[0] == 30 and all(torch.equal(x[i], stream[e.key]) for i, e in enumerate(task.val.entries))

    # an image that does not decode is left out of the subset, as the training stream leaves it out
    good = write_image_shard(tmp_path / "val-000000.tar", np.zeros((3, 32, 32, 3), np.uint8), [0, 1, 2])
    with wds.TarWriter(str(tmp_path / "val-000001.tar")) as sink:
        sink.write({"__key__": "bad", "png": b"not an image", "cls": 1})
    task.val, task.val_urls = None, [str(good), str(tmp_path / "val-000001.tar")]
    assert len(torch.cat(list(task._val_batches()))) == 3 and "bad" not in [e.key for e in task.val.entries]
    assert "1 of 4 samples of a fixed subset (ShardImages) do not decode" in caplog.text
