#!/usr/bin/env python
"""What a `submit` costs besides its stage's work: a 10-step `train_vqvae` and a `submit status`,
each timed as the `submit` command runs them and as plain ``main()`` runs them (without the
command's gc.freeze before Python's exit), on the embedded digits in a temporary run_root.

    python tools/bench_submit_overhead.py            # 3 runs of each, medians
    python tools/bench_submit_overhead.py --runs 5

Prints wall seconds; nothing is asserted (speed is measured here, not in tests).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBMIT = str(Path(sys.executable).with_name("submit"))
# main() as the command would run it, minus what `command()` adds on the way out
PLAIN_MAIN = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.argv[0] = 'submit'; "
              "sys.exit(main())"]
TRAIN = ["stage=train_vqvae", "train.max_steps=10", "deepspeed.micro_batch=16", "data.num_workers=0",
         "train.eval_every=1000", "train.eval_samples=64"]


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs of each command and variant (medians printed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = work / "runs"
        timed([SUBMIT, "stage=prepare", f"run_root={runs}"], work)  # the digits' shards, once
        variants = {"submit": [SUBMIT], "main() only": PLAIN_MAIN}
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for name, cmd in variants.items():  # alternated, so both see the same machine state
                shutil.rmtree(runs / "digits" / "train_vqvae", ignore_errors=True)
                times.setdefault(("train_vqvae, 10 steps", name), []).append(
                    timed([*cmd, *TRAIN, f"run_root={runs}"], work))
                times.setdefault(("status", name), []).append(timed([*cmd, "status", f"run_root={runs}"], work))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"median of {args.runs} runs, wall seconds")
    print(f"{'command':<24}{'submit':>10}{'main() only':>14}")
    for what in dict.fromkeys(k for k, _ in times):
        print(f"{what:<24}{statistics.median(times[what, 'submit']):>10.2f}"
              f"{statistics.median(times[what, 'main() only']):>14.2f}")


if __name__ == "__main__":
    main()
