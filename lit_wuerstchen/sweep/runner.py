"""Running a sweep's training runs: locally one after another, or as submitit (SLURM) jobs."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from .grid import STAGE_TITLES, Grid, Point, Run, SweepError, expand, load_grid, ordered_runs, select


def display(cmd: list[str]) -> str:
    return shlex.join(["python", *cmd[1:]])


def _check_configs(runs: list[Run]) -> None:
    for run in runs:
        for i, arg in enumerate(run.args[:-1]):
            if arg == "-c" and not Path(run.args[i + 1]).is_file():
                raise SweepError(
                    f"config {run.args[i + 1]} of run {run.logger_name}/{run.name} does not exist "
                    f"(paths are relative to the current directory {Path.cwd()})"
                )


def execute_runs(runs: list[Run], python: str | None = None) -> None:
    """Run ``runs`` one after another in this process's working directory, streaming their output. A run counts as
    finished only when its ``fit`` wrote the ``DONE`` marker (``lit_wuerstchen.callbacks.RunLifecycle``): a preempted
    or crashed fit stops the sweep, and the next ``sweep run`` resumes it from its checkpoint."""
    python = python or sys.executable
    total = len(runs)
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{total}] {STAGE_TITLES[run.stage]} {run.name} ({run.folder})"
        state = run.state()
        if state == "done":
            print(f"{label}: finished ({run.marker} exists), skipped", flush=True)
            continue
        if run.depends_on is not None and not run.depends_on.checkpoint.is_file():
            raise SweepError(
                f"{label}: needs {run.depends_on.checkpoint}, which the "
                f"{STAGE_TITLES[run.depends_on.stage]} run did not write"
            )
        cmd = run.command(python)
        print(f"{label}: {'resuming' if state == 'resume' else 'starting'}\n  $ {display(cmd)}", flush=True)
        code = subprocess.run(cmd).returncode
        if code != 0:
            raise SweepError(
                f"{label} failed with exit code {code}; the sweep stops here. Command:\n  {display(cmd)}\n"
                "Fix the cause and rerun the same sweep command: finished runs are skipped and this one "
                "resumes from its last checkpoint if it wrote one."
            )
        if not run.marker.is_file():
            raise SweepError(f"{label} exited 0 but did not write {run.marker}: it did not reach its end")
        print(f"{label}: done", flush=True)


def _slurm_job(runs: list[Run], cwd: str) -> None:
    os.chdir(cwd)
    # Under several tasks per job every task launches the same fit (Lightning reads the SLURM ranks); rank 0 of each
    # fit writes its DONE marker.
    execute_runs(runs)


def submit_slurm(grid: Grid, points: list[Point]) -> list[Any]:
    """One submitit job per first-stage run: it trains that run and then every later stage depending on it."""
    try:
        import submitit
    except ImportError:
        raise SweepError(
            "--launcher slurm needs submitit: pip install 'lit_wuerstchen[sweep]' (or pip install 'submitit>=1.5')"
        ) from None
    params = dict(grid.slurm)
    folder = params.pop("folder", f"{grid.save_dir}/sweep_logs/{grid.name}")
    executor = submitit.AutoExecutor(folder=folder)
    groups: dict[int, list[Run]] = {}
    for run in ordered_runs(points):
        root = run
        while root.depends_on is not None:
            root = root.depends_on
        groups.setdefault(id(root), []).append(run)
    node_args = []
    if "nodes" in params:
        node_args.append(f"--trainer.num_nodes={params['nodes']}")
    if "tasks_per_node" in params:
        node_args.append(f"--trainer.devices={params['tasks_per_node']}")
    jobs = []
    for group in groups.values():
        pending = [r for r in group if r.state() != "done"]
        if not pending:
            print(f"{group[0].name}: all stages finished, nothing to submit")
            continue
        for r in pending:
            r.args = [*r.args, *node_args]
        executor.update_parameters(name=f"{grid.name}_{group[0].name}", **params)
        job = executor.submit(_slurm_job, pending, str(Path.cwd()))
        print(f"submitted job {job.job_id}: " + ", ".join(f"{STAGE_TITLES[r.stage]} {r.name}" for r in pending))
        jobs.append(job)
    return jobs


def cmd_run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    points = select(expand(grid), args.only)
    runs = ordered_runs(points)
    _check_configs(runs)
    if args.dry_run:
        print(f"# sweep '{grid.name}': {len(points)} point(s), {len(runs)} run(s), in order")
        for run in runs:
            state = run.state()
            note = {"done": "finished, skipped", "resume": "resumes from its checkpoint", "new": "new run"}[state]
            prefix = "# " if state == "done" else ""
            print(f"# {STAGE_TITLES[run.stage]} {run.name} -> {run.folder} ({note})")
            print(prefix + display(run.command()))
        return 0
    if args.launcher == "slurm":
        submit_slurm(grid, points)
        return 0
    execute_runs(runs)
    print(
        f"sweep '{grid.name}' finished: {len(runs)} run(s). Report: python -m lit_wuerstchen sweep report "
        f"--grid {args.grid} --out docs/ablations"
    )
    return 0
