"""Training from the precomputed cache against training on the fly: toy Stage B and Stage C steps/s, same run.

For each stage (``experiments/<stage>.yaml`` + ``experiments/toy/<stage>.yaml``; the checkpoints ``make demo`` writes
must exist), builds the cache once with ``data precompute``'s code (its time is reported: the one-off cost), then
times ``Trainer.fit`` steps of the same model and settings (2 DataLoader workers, EMA) on the fly and from the cache,
interleaved (raw, cache, raw, cache, ...) so that load drift on the machine hits both alike. The ratio is
cache/raw steps/s; the break-even is the number of training steps after which the precompute has paid for itself.
Usage: python benchmarks/cache_speedup.py [--steps 60] [--warmup 10] [--repeats 2] [--stages stage_b stage_c]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
from training_throughput import full_step_rate  # this folder's script: the same timed fit

from lit_wuerstchen.checkpoints import CheckpointError
from lit_wuerstchen.cli import run_lightning_cli
from lit_wuerstchen.data.precompute import precompute


def _configs(stage: str) -> list[str]:
    return ["-c", f"experiments/{stage}.yaml", "-c", f"experiments/toy/{stage}.yaml"]


def fit_rate(stage: str, cache: str | None, steps: int, warmup: int) -> float:
    cli = run_lightning_cli(_configs(stage) + (["--data.init_args.cache", cache] if cache else []), run=False)
    return full_step_rate(cli.model, cli.datamodule, steps, warmup)


def benchmark(stage: str, steps: int, warmup: int, repeats: int, folder: str) -> dict:
    cli = run_lightning_cli(_configs(stage), run=False)
    cache = os.path.join(folder, stage)
    start = time.perf_counter()
    manifest = precompute(cli.model, cli.datamodule, cache, batch_size=64, progress=False)
    precompute_seconds = time.perf_counter() - start
    raw, cached = [], []
    for _ in range(repeats):
        raw.append(fit_rate(stage, None, steps, warmup))
        cached.append(fit_rate(stage, cache, steps, warmup))
    raw_rate, cached_rate = statistics.median(raw), statistics.median(cached)
    saved_per_step = 1 / raw_rate - 1 / cached_rate
    return {
        "stage": stage,
        "samples": manifest["samples"],
        "precompute": precompute_seconds,
        "raw": raw,
        "cached": cached,
        "ratio": cached_rate / raw_rate,
        "break_even": precompute_seconds / saved_per_step if saved_per_step > 0 else float("inf"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["stage_b", "stage_c"])
    args = parser.parse_args()
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.platform()} | {platform.machine()} | os.cpu_count()={os.cpu_count()} | "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for stage in args.stages:
            try:
                rows.append(benchmark(stage, args.steps, args.warmup, args.repeats, folder))
            except CheckpointError as error:  # the toy Stages B and C need the demo's checkpoints
                print(f"{stage}: skipped ({error})")
    print(f"\n{'stage':<8} {'cached samples':>14} {'precompute s':>12} {'on the fly (steps/s)':>22} "
          f"{'from the cache (steps/s)':>26} {'ratio':>6} {'break-even steps':>17}")  # fmt: skip
    for r in rows:
        raw = " / ".join(f"{x:.2f}" for x in r["raw"])
        cached = " / ".join(f"{x:.2f}" for x in r["cached"])
        print(f"{r['stage']:<8} {r['samples']:>14} {r['precompute']:>12.1f} {raw:>22} {cached:>26} "
              f"{r['ratio']:>6.2f} {r['break_even']:>17.0f}")  # fmt: skip
    print("\n(ratio: median cached / median on-the-fly steps/s; the demo trains Stage B 1500 and Stage C 3000 steps)")


if __name__ == "__main__":
    main()
