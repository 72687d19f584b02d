"""``make demo``: the toy pipeline on the built-in synthetic set, on the CPU, in minutes.

Runs each toy stage through the same CLI a user runs (``fit -c experiments/<stage>.yaml -c experiments/toy/...``)
into fixed run folders ``outputs/toy_<stage>/demo/``, then prints where the logs and checkpoints are and the
final validation metrics. Extra arguments are passed to every ``fit`` (e.g. ``--trainer.max_steps=100``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli import run_lightning_cli

RUN_VERSION = "demo"


def _fit_stage(stage: str, extra: list[str]) -> tuple[dict[str, float], Path, float]:
    start = time.perf_counter()
    cli = run_lightning_cli(
        [
            "fit",
            "-c", f"experiments/{stage}.yaml",
            "-c", f"experiments/toy/{stage}.yaml",
            f"--trainer.logger.init_args.version={RUN_VERSION}",
            *extra,
        ]
    )
    elapsed = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return metrics, Path(cli.trainer.log_dir), elapsed


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    if not Path("experiments/stage_a.yaml").is_file():
        print("run the demo from the repository root (where experiments/ is)", file=sys.stderr)
        return 2
    total_start = time.perf_counter()
    report = []
    for stage in ("stage_a",):
        metrics, log_dir, elapsed = _fit_stage(stage, extra)
        report.append((stage, metrics, log_dir, elapsed))

    print("\n=== lit_wuerstchen demo finished ===")
    for stage, metrics, log_dir, elapsed in report:
        print(f"{stage}: {elapsed / 60:.1f} min")
        print(f"  TensorBoard logs : {log_dir}   (tensorboard --logdir {log_dir.parent.parent})")
        print(f"  checkpoints      : {log_dir / 'checkpoints'}")
        for name, value in sorted(metrics.items()):
            print(f"  {name:<28}: {value:.4f}")
    print(f"total wall time: {(time.perf_counter() - total_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
