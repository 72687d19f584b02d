"""``python -m lit_wuerstchen sweep``: run an ablation grid (Stage B then Stage C per point) and report on it.

A grid YAML (see ``experiments/ablations/compression/grid_toy.yaml``)::

    name: compression_toy
    save_dir: outputs                       # TensorBoard logger save_dir of every run
    stages: [b, c]                          # which stages each point trains, in order (c needs b's checkpoint)
    base: {b: [stage_b.yaml, toy/stage_b.yaml], c: [...]}   # base configs per stage
    logger: {b: ablation_b, c: ablation_c}  # logger name per stage; the version is the point's name
    axes:                                   # first axis: the compression ratio; further axes optional
      - name: ratio
        prefix: f                           # point names: f8, f16, f42p67 ('.' -> 'p')
        values: [8, 16, 32]
        stages:                             # per stage: a dotted config key set to the value, and/or a config
          b: {key: model.init_args.compression, config: .../stage_b_{token}.yaml}
          c: {config: .../stage_c_{token}.yaml}
    extra_args: {b: [], c: []}              # appended to every command of that stage
    slurm: {...}                            # submitit AutoExecutor parameters (--launcher slurm)

A stage's run is named by the axes that touch it *or an earlier stage* (Stage C depends on Stage B), so an
axis that only changes Stage C (e.g. its width) shares one Stage B run between points: ``f16`` (Stage B) and
``f16_w256`` (Stage C). Runs live in ``<save_dir>/<logger name>/<run name>/``; a successful run gets a ``DONE``
file there. ``run`` skips finished runs and resumes (``--ckpt_path .../last.ckpt``) unfinished ones that have a
checkpoint, so rerunning the same command after a failure or pre-emption continues the sweep.

Modules: ``grid`` (parsing, validation, expansion into points and runs), ``runner`` (``sweep run``: local or
submitit), ``report`` (``sweep report``: CSV, markdown table, plots); this one holds the command line.
"""

from __future__ import annotations

import argparse
import sys

from .grid import (
    DONE_MARKER,
    STAGE_TITLES,
    STAGES,
    Axis,
    Grid,
    Point,
    Run,
    SweepError,
    expand,
    format_value,
    load_grid,
    ordered_runs,
    select,
)
from .report import ALIGN, METRICS, cmd_report, collect, write_report
from .runner import _check_configs, cmd_run, execute_runs, submit_slurm

__all__ = [
    "ALIGN",
    "DONE_MARKER",
    "METRICS",
    "STAGES",
    "STAGE_TITLES",
    "Axis",
    "Grid",
    "Point",
    "Run",
    "SweepError",
    "_check_configs",
    "build_parser",
    "collect",
    "execute_runs",
    "expand",
    "format_value",
    "load_grid",
    "main",
    "ordered_runs",
    "select",
    "submit_slurm",
    "write_report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_wuerstchen sweep",
        description="Run an ablation grid (Stage B then Stage C per point) and report on it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every point of a grid (skips finished runs, resumes unfinished ones)")
    run.add_argument("--grid", required=True, help="grid YAML, e.g. experiments/ablations/compression/grid_toy.yaml")
    run.add_argument("--dry_run", action="store_true", help="print the commands in order, run nothing")
    run.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: one after another here; slurm: submitit jobs (pip install submitit)",
    )
    run.add_argument("--only", default=None, help="comma-separated point names (or prefixes such as f16)")
    report = sub.add_parser("report", help="CSV, markdown table and plots of the grid's logged metrics")
    report.add_argument("--grid", required=True)
    report.add_argument("--out", default="docs/ablations", help="output folder (default docs/ablations)")
    report.add_argument("--only", default=None, help="comma-separated point names")
    report.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_run(args) if args.command == "run" else cmd_report(args)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
