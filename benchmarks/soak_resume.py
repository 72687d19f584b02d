"""Soak test of exact resume: a toy Stage A fit interrupted 10 times at random steps, resumed each time.

An uninterrupted run and an interrupted one of the same seed are trained through the command line, exactly as a
user would. The interrupted run is stopped with SIGKILL (``kill -9``: no chance to save, it resumes from the last
periodic checkpoint and redoes the steps after it) or SIGTERM (preemption: it saves and exits 143), mixed at random,
and resumed with ``fit --ckpt_path .../last.ckpt`` each time, until it finishes. Then:

- the final weights and EMA must equal the uninterrupted run's (max abs difference <= 1e-6);
- the sample keys each step trained on (the last time that step ran) must equal the uninterrupted run's: no sample
  seen twice or skipped in the training that counts.

    python benchmarks/soak_resume.py [--interruptions 10] [--steps 60] [--seed 0] [--workdir DIR]

Prints a table of the interruptions and the result; exits 1 if the runs differ. Results: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KEY_LOG = '''
import json, os
import lightning as L

class KeyLog(L.Callback):
    """Appends the keys each training step consumes to $SOAK_KEYS (one JSON line per step)."""
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(os.environ["SOAK_KEYS"], "a") as f:
            f.write(json.dumps([trainer.global_step, list(batch["key"])]) + "\\n")
'''


def fit_command(version: str, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "lit_wuerstchen", "fit",
        "-c", "experiments/stage_a.yaml", "-c", "experiments/toy/stage_a.yaml",
        "--model.init_args.vqgan.channels=[16,32]", "--model.init_args.vqgan.decoder_blocks=[1,1]",
        "--data.init_args.synthetic_num_train=1280", "--data.init_args.synthetic_num_val=32",
        "--data.init_args.batch_size=8", "--data.init_args.num_workers=2",
        "--data.init_args.train_batches_per_epoch=25",
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=10", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--checkpoint.every_n_train_steps=1",
        f"--trainer.logger.init_args.version={version}",
        "--trainer.callbacks+=soak_keys.KeyLog",
    ]  # fmt: skip


def run_dir(work: Path, version: str) -> Path:
    return work / "outputs" / "toy_stage_a" / version


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # being written, or not there yet
        return -1


def start(work: Path, version: str, steps: int, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(work), "SOAK_KEYS": str(work / f"keys_{version}.jsonl"),
           "HF_HUB_OFFLINE": "1", "LIT_WUERSTCHEN_OFFLINE": "1"}  # fmt: skip
    command = fit_command(version, steps)
    if resume:
        command.append(f"--ckpt_path={run_dir(work, version) / 'checkpoints' / 'last.ckpt'}")
    return subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def trajectory(path: Path) -> dict[int, list[str]]:
    """Keys per step; a step that ran again after a kill counts with its last run."""
    steps: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        step, keys = json.loads(line)
        steps[step] = keys
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interruptions", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="picks the interruption steps and signals")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder, removed)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "experiments").exists() or (work / "experiments").symlink_to(REPO / "experiments")
    (work / "soak_keys.py").write_text(KEY_LOG)
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.platform()} | {platform.machine()} | {os.cpu_count()} CPUs | torch {torch.__version__}")
    print(f"workdir   {work}")

    t0 = time.perf_counter()
    reference = start(work, "straight", args.steps, resume=False)
    if reference.wait() != 0:
        print(reference.stderr.read()[-3000:])
        return 1
    straight_minutes = (time.perf_counter() - t0) / 60

    rng = random.Random(args.seed)
    last = run_dir(work, "soaked") / "checkpoints" / "last.ckpt"
    rows = []
    t0 = time.perf_counter()
    gap = max(2, (args.steps - 25) // args.interruptions)
    for _ in range(args.interruptions):
        before = checkpoint_step(last)
        # a random step at least one checkpoint after the resumed one: the fit is really training when hit
        target = min(args.steps - 25, max(before, 0) + rng.randint(1, 2 * gap - 1))
        signum = rng.choice([signal.SIGKILL, signal.SIGTERM])
        process = start(work, "soaked", args.steps, resume=last.exists())
        while (sent_at := checkpoint_step(last)) < max(target, before + 1) and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signum)
        process.wait()
        rows.append((sent_at, signum.name, process.returncode, checkpoint_step(last)))
    final = start(work, "soaked", args.steps, resume=True)
    final_code = final.wait()
    soaked_minutes = (time.perf_counter() - t0) / 60

    straight_ckpt = torch.load(run_dir(work, "straight") / "checkpoints" / "last.ckpt", weights_only=True)
    soaked_ckpt = torch.load(last, weights_only=True)
    weights = max((straight_ckpt["state_dict"][k].float() - v.float()).abs().max().item()
                  for k, v in soaked_ckpt["state_dict"].items())  # fmt: skip
    ema = max((straight_ckpt["ema_state_dict"][k].float() - v.float()).abs().max().item()
              for k, v in soaked_ckpt["ema_state_dict"].items())  # fmt: skip
    keys_equal = trajectory(work / "keys_straight.jsonl") == trajectory(work / "keys_soaked.jsonl")
    done = (run_dir(work, "soaked") / "DONE").exists()

    print(f"\n{'signal sent at step':>19} {'signal':>8} {'exit code':>9} {'resumes from step':>17}")
    for stop, name, code, step in rows:
        print(f"{stop:>19} {name:>8} {code:>9} {step:>17}")
    print(f"\nfinal run exit code {final_code}, DONE marker {'written' if done else 'MISSING'}")
    print(f"uninterrupted run {straight_minutes:.1f} min; interrupted {len(rows)}x, resumed: {soaked_minutes:.1f} min")
    print(f"max |weights difference| {weights:.3g}   max |EMA difference| {ema:.3g}")
    print(f"per-step sample keys identical: {keys_equal}  ({args.steps} steps)")
    ok = final_code == 0 and done and weights <= 1e-6 and ema <= 1e-6 and keys_equal
    print("RESULT: " + ("identical to the uninterrupted run" if ok else "DIFFERENT"))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
