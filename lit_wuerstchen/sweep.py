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
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("b", "c")
STAGE_TITLES = {"b": "Stage B", "c": "Stage C"}
DONE_MARKER = "DONE"
MISSING = "—"
_GRID_KEYS = {"name", "save_dir", "stages", "base", "logger", "axes", "extra_args", "slurm"}
_AXIS_KEYS = {"name", "prefix", "values", "stages"}


class SweepError(RuntimeError):
    """A problem with the grid file or a run of the sweep, with a message meant for the user."""


# ----------------------------------------------------------------------------------------------------- grid


@dataclass
class Axis:
    name: str
    prefix: str
    values: list[Any]
    stages: dict[str, dict[str, Any]]  # stage -> {"key": dotted key, "config": template with {token}/{value}}

    def token(self, value: Any) -> str:
        return f"{self.prefix}{format_value(value)}"


@dataclass
class Grid:
    path: Path
    name: str
    save_dir: str
    stages: list[str]
    base: dict[str, list[str]]
    logger: dict[str, str]
    axes: list[Axis]
    extra_args: dict[str, list[str]]
    slurm: dict[str, Any] = field(default_factory=dict)

    def stage_axes(self, stage: str) -> list[Axis]:
        """Axes that name a run of ``stage``: those that touch it or a stage it depends on."""
        upto = self.stages[: self.stages.index(stage) + 1]
        return [axis for axis in self.axes if any(s in axis.stages for s in upto)]


@dataclass
class Run:
    """One training run: a stage of a point."""

    stage: str
    name: str  # run folder name (logger version)
    values: dict[str, Any]  # axis name -> value
    logger_name: str
    save_dir: str
    args: list[str]  # everything after 'fit'
    depends_on: Run | None = None

    @property
    def folder(self) -> Path:
        return Path(self.save_dir) / self.logger_name / self.name

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoints" / "last.ckpt"

    @property
    def marker(self) -> Path:
        return self.folder / DONE_MARKER

    def state(self) -> str:
        """'done' (marker present), 'resume' (checkpoint, no marker) or 'new'."""
        if self.marker.is_file():
            return "done"
        if self.checkpoint.is_file():
            return "resume"
        return "new"

    def command(self, python: str = "python") -> list[str]:
        cmd = [python, "-m", "lit_wuerstchen", "fit", *self.args]
        if self.state() == "resume":
            cmd += ["--ckpt_path", str(self.checkpoint)]
        return cmd


@dataclass
class Point:
    name: str
    values: dict[str, Any]
    runs: list[Run]  # in stage order


def format_value(value: Any) -> str:
    """8 -> '8', 42.67 -> '42p67', 1e-4 -> '0p0001' (folder- and shell-safe)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = repr(value) if isinstance(value, float) else str(value)
    return text.replace(".", "p").replace("-", "m").replace("/", "_").replace(" ", "")


def _fail(path: Path | str, message: str) -> SweepError:
    return SweepError(f"grid file {path}: {message}")


def _string_list(path: Path, where: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise _fail(path, f"'{where}' must be a list of strings, got {value!r}")
    return [str(v) for v in value]


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML; every problem raises a ``SweepError`` naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"grid file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise _fail(path, f"not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "must be a YAML mapping with keys 'base', 'axes' (and 'stages', 'logger', ...)")
    unknown = set(raw) - _GRID_KEYS
    if unknown:
        raise _fail(path, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_GRID_KEYS)}")

    stages = raw.get("stages", list(STAGES))
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise _fail(path, f"'stages' must be a non-empty list of {list(STAGES)}, got {stages!r}")
    stages = [s for s in STAGES if s in stages]  # Stage B always before Stage C
    if "c" in stages and "b" not in stages:
        raise _fail(path, "'stages' has c without b: Stage C needs the Stage B run of its point")

    base = raw.get("base")
    if not isinstance(base, dict) or any(s not in base for s in stages):
        raise _fail(path, f"'base' must map every stage in {stages} to its list of config files")
    base = {s: _string_list(path, f"base.{s}", base[s]) for s in stages}
    for s in stages:
        if not base[s]:
            raise _fail(path, f"'base.{s}' lists no config file")

    name = str(raw.get("name") or path.stem)
    logger = raw.get("logger") or {}
    if not isinstance(logger, dict):
        raise _fail(path, f"'logger' must map stages to logger names, got {logger!r}")
    logger = {s: str(logger.get(s) or f"sweep_{name}_stage_{s}") for s in stages}

    axes_raw = raw.get("axes")
    if not isinstance(axes_raw, list) or not axes_raw:
        raise _fail(path, "'axes' must be a non-empty list (first axis: the compression ratio)")
    axes: list[Axis] = []
    for i, a in enumerate(axes_raw):
        if not isinstance(a, dict):
            raise _fail(path, f"axes[{i}] must be a mapping, got {a!r}")
        unknown = set(a) - _AXIS_KEYS
        if unknown:
            raise _fail(path, f"axes[{i}] has unknown key(s) {sorted(unknown)}; allowed: {sorted(_AXIS_KEYS)}")
        if not a.get("name"):
            raise _fail(path, f"axes[{i}] needs a 'name'")
        values = a.get("values")
        if not isinstance(values, list) or not values:
            raise _fail(path, f"axis '{a['name']}' needs a non-empty list 'values'")
        axis_stages = a.get("stages")
        if not isinstance(axis_stages, dict) or not axis_stages:
            raise _fail(path, f"axis '{a['name']}' needs 'stages': {{b: {{key: ..., config: ...}}, ...}}")
        for s, spec in axis_stages.items():
            if s not in stages:
                raise _fail(path, f"axis '{a['name']}' sets stage '{s}', which is not in 'stages' {stages}")
            if not isinstance(spec, dict) or not (spec.get("key") or spec.get("config")) or set(spec) - {"key", "config"}:
                raise _fail(path, f"axis '{a['name']}' stage '{s}' must be a mapping with 'key' and/or 'config'")
        axis = Axis(str(a["name"]), str(a.get("prefix", a["name"][0])), values, axis_stages)
        tokens = [axis.token(v) for v in values]
        if len(set(tokens)) != len(tokens):
            raise _fail(path, f"axis '{axis.name}' has values that give the same point name: {tokens}")
        axes.append(axis)
    if len({a.name for a in axes}) != len(axes):
        raise _fail(path, "two axes share a name")

    extra = raw.get("extra_args") or {}
    if not isinstance(extra, dict):
        raise _fail(path, f"'extra_args' must map stages to argument lists, got {extra!r}")
    extra_args = {s: _string_list(path, f"extra_args.{s}", extra.get(s)) for s in stages}
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise _fail(path, f"'slurm' must be a mapping of submitit parameters, got {slurm!r}")
    return Grid(path, name, str(raw.get("save_dir", "outputs")), stages, base, logger, axes, extra_args, slurm)


def expand(grid: Grid) -> list[Point]:
    """The grid's points (cartesian product of the axes, first axis outermost) with their runs."""
    points: list[Point] = []
    runs: dict[tuple[str, str], Run] = {}  # shared runs (e.g. one Stage B for several Stage C widths)
    for combo in itertools.product(*(axis.values for axis in grid.axes)):
        values = {axis.name: v for axis, v in zip(grid.axes, combo)}
        point_runs: list[Run] = []
        previous: Run | None = None
        for stage in grid.stages:
            run_name = "_".join(a.token(values[a.name]) for a in grid.stage_axes(stage))
            run = runs.get((stage, run_name))
            if run is None:
                run = _make_run(grid, stage, run_name, values, previous)
                runs[(stage, run_name)] = run
            point_runs.append(run)
            previous = run
        points.append(Point("_".join(a.token(values[a.name]) for a in grid.axes), values, point_runs))
    return points


def _make_run(grid: Grid, stage: str, run_name: str, values: dict[str, Any], previous: Run | None) -> Run:
    args: list[str] = []
    for config in grid.base[stage]:
        args += ["-c", config]
    sets: list[str] = []
    for axis in grid.axes:
        spec = axis.stages.get(stage)
        if not spec:
            continue
        value = values[axis.name]
        if spec.get("config"):
            args += ["-c", str(spec["config"]).format(token=axis.token(value), value=value)]
        if spec.get("key"):
            sets.append(f"--{spec['key']}={value}")
    args += sets
    args += [f"--trainer.logger.init_args.save_dir={grid.save_dir}",
             f"--trainer.logger.init_args.name={grid.logger[stage]}",
             f"--trainer.logger.init_args.version={run_name}"]
    if stage == "c" and previous is not None:
        args.append(f"--model.init_args.stage_b_checkpoint={previous.checkpoint}")
    args += grid.extra_args[stage]
    return Run(stage, run_name, {a.name: values[a.name] for a in grid.stage_axes(stage)}, grid.logger[stage],
               grid.save_dir, args, depends_on=previous)


def select(points: list[Point], only: str | None) -> list[Point]:
    """Points named in ``only`` (comma-separated point or run names, or a prefix such as 'f16')."""
    if not only:
        return points
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [p for p in points
              if any(p.name == w or p.name.startswith(w + "_") or any(r.name == w for r in p.runs) for w in wanted)]
    if not chosen:
        raise SweepError(f"--only {only!r} matches no point; points: {', '.join(p.name for p in points)}")
    return chosen


def ordered_runs(points: list[Point]) -> list[Run]:
    """Every run of ``points`` once, each after the run it depends on."""
    seen: dict[int, Run] = {}
    for point in points:
        for run in point.runs:
            seen.setdefault(id(run), run)
    return list(seen.values())


# ------------------------------------------------------------------------------------------------------ run


def display(cmd: list[str]) -> str:
    return shlex.join(["python", *cmd[1:]])


def _check_configs(runs: list[Run]) -> None:
    for run in runs:
        for i, arg in enumerate(run.args[:-1]):
            if arg == "-c" and not Path(run.args[i + 1]).is_file():
                raise SweepError(f"config {run.args[i + 1]} of run {run.logger_name}/{run.name} does not exist "
                                 f"(paths are relative to the current directory {Path.cwd()})")


def execute_runs(runs: list[Run], python: str | None = None, write_marker: bool = True) -> None:
    """Run ``runs`` one after another in this process's working directory, streaming their output."""
    python = python or sys.executable
    total = len(runs)
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{total}] {STAGE_TITLES[run.stage]} {run.name} ({run.folder})"
        state = run.state()
        if state == "done":
            print(f"{label}: finished ({run.marker} exists), skipped", flush=True)
            continue
        if run.depends_on is not None and not run.depends_on.checkpoint.is_file():
            raise SweepError(f"{label}: needs {run.depends_on.checkpoint}, which the "
                             f"{STAGE_TITLES[run.depends_on.stage]} run did not write")
        cmd = run.command(python)
        print(f"{label}: {'resuming' if state == 'resume' else 'starting'}\n  $ {display(cmd)}", flush=True)
        code = subprocess.run(cmd).returncode
        if code != 0:
            raise SweepError(f"{label} failed with exit code {code}; the sweep stops here. Command:\n  {display(cmd)}\n"
                             "Fix the cause and rerun the same sweep command: finished runs are skipped and this one "
                             "resumes from its last checkpoint if it wrote one.")
        if write_marker:
            run.folder.mkdir(parents=True, exist_ok=True)
            run.marker.write_text(display(cmd) + "\n")
        print(f"{label}: done", flush=True)


def _slurm_job(runs: list[Run], cwd: str) -> None:
    os.chdir(cwd)
    # Under several tasks per job every task launches the same fit (Lightning reads the SLURM ranks); only the
    # first writes the markers.
    execute_runs(runs, write_marker=os.environ.get("SLURM_PROCID", "0") == "0")


def submit_slurm(grid: Grid, points: list[Point]) -> list[Any]:
    """One submitit job per first-stage run: it trains that run and then every later stage depending on it."""
    try:
        import submitit
    except ImportError:
        raise SweepError("--launcher slurm needs submitit: pip install 'lit_wuerstchen[sweep]' "
                         "(or pip install 'submitit>=1.5')") from None
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
    print(f"sweep '{grid.name}' finished: {len(runs)} run(s). Report: python -m lit_wuerstchen sweep report "
          f"--grid {args.grid} --out docs/ablations")
    return 0


# --------------------------------------------------------------------------------------------------- report

ALIGN = ("background", "colour", "shape", "position", "size", "all")
# (column, stage, scalar tag or special, header, format)
METRICS: list[tuple[str, str, str, str, str]] = [
    ("b_psnr", "b", "val/psnr", "B PSNR", "{:.2f}"),
    ("b_ssim", "b", "val/ssim", "B SSIM", "{:.4f}"),
    ("b_psnr_stage_a", "b", "val/psnr_stage_a", "A PSNR", "{:.2f}"),
    ("b_rfid", "b", "eval/fid", "B rFID", "{:.2f}"),
    *[(f"c_align_{a}", "c", f"val/align_{a}", f"C align {a}", "{:.3f}") for a in ALIGN],
    ("c_clip_score", "c", "eval/clip_score", "C CLIP score", "{:.4f}"),
    ("c_fid", "c", "eval/fid", "C FID", "{:.2f}"),
    ("b_steps", "b", "#steps", "B steps", "{:.0f}"),
    ("b_steps_per_s", "b", "#throughput", "B steps/s", "{:.2f}"),
    ("b_peak_memory_gb", "b", "#memory", "B peak mem GB", "{:.2f}"),
    ("b_params", "b", "#params", "B params", "params"),
    ("c_steps", "c", "#steps", "C steps", "{:.0f}"),
    ("c_steps_per_s", "c", "#throughput", "C steps/s", "{:.2f}"),
    ("c_peak_memory_gb", "c", "#memory", "C peak mem GB", "{:.2f}"),
    ("c_params", "c", "#params", "C params", "params"),
]
PLOTTED = [m for m in METRICS if m[0] not in ("b_steps", "c_steps", "b_params", "c_params")]
# trainable parts of each stage's checkpoint (Stage A and the frozen networks are not part of the ablation)
PARAM_PREFIXES = {"b": ("decoder.", "compressor."), "c": ("prior.",)}


def read_scalars(folder: Path) -> list[dict[str, list[tuple[float, int, float]]]]:
    """Scalars of every event file in ``folder`` (one dict per file, in file order): tag -> [(wall, step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        try:
            acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
            acc.Reload()
            tags = acc.Tags().get("scalars", [])
            out.append({t: [(e.wall_time, e.step, e.value) for e in acc.Scalars(t)] for t in tags})
        except Exception as err:  # a truncated file of a killed run must not stop the report
            print(f"warning: cannot read {path}: {err}", file=sys.stderr)
    return out


def final_value(files: list[dict[str, list[tuple[float, int, float]]]], tag: str) -> float | None:
    events = [e for f in files for e in f.get(tag, [])]
    if not events:
        return None
    return max(events, key=lambda e: (e[1], e[0]))[2]  # the latest step (then the latest write)


def throughput(files: list[dict[str, list[tuple[float, int, float]]]], tag: str = "train/loss") -> float | None:
    """Training steps per second between the first and last ``tag`` event of each event file (resumed runs: the
    segments are added up, so the time between a crash and the resumption does not count)."""
    steps = seconds = 0.0
    for f in files:
        events = sorted(f.get(tag, []), key=lambda e: e[0])
        if len(events) >= 2 and events[-1][0] > events[0][0]:
            steps += events[-1][1] - events[0][1]
            seconds += events[-1][0] - events[0][0]
    return steps / seconds if seconds > 0 and steps > 0 else None


def count_parameters(checkpoint: Path, stage: str) -> int | None:
    if not checkpoint.is_file():
        return None
    import torch

    try:
        try:
            ckpt = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # not a zip checkpoint: no mmap
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:
        print(f"warning: cannot read {checkpoint}: {err}", file=sys.stderr)
        return None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    skip = ("running_mean", "running_var", "num_batches_tracked")
    total = sum(int(v.numel()) for k, v in state.items()
                if k.startswith(PARAM_PREFIXES[stage]) and not k.endswith(skip) and hasattr(v, "numel"))
    return total or None


def _nested(config: dict, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def read_config(folder: Path) -> dict:
    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def collect(grid: Grid, points: list[Point]) -> list[dict[str, Any]]:
    """One row per point: axis values, ratio, semantic latent size and every metric (None where missing)."""
    from .models.compressor import semantic_latent_size

    rows = []
    ratio_axis = grid.axes[0]
    cache: dict[int, tuple[list, dict]] = {}
    for point in points:
        row: dict[str, Any] = {"point": point.name}
        for axis in grid.axes[1:]:
            row[axis.name] = point.values[axis.name]
        runs = {r.stage: r for r in point.runs}
        for r in point.runs:
            if id(r) not in cache:
                cache[id(r)] = (read_scalars(r.folder) if r.folder.is_dir() else [], read_config(r.folder))
        b_config = cache[id(runs["b"])][1] if "b" in runs else {}
        ratio = _nested(b_config, "model.init_args.compression")
        if ratio is None and "b" in ratio_axis.stages:
            ratio = point.values[ratio_axis.name]
        row["ratio"] = float(ratio) if ratio is not None else None
        resolution = _nested(b_config, "data.init_args.resolution")
        if resolution is None and "c" in runs:
            resolution = _nested(cache[id(runs["c"])][1], "data.init_args.resolution")
        if row["ratio"] and resolution:
            h, w = semantic_latent_size(int(resolution), row["ratio"])
            row["latent"] = f"{h}x{w}"
        else:
            row["latent"] = None
        for column, stage, tag, _, _ in METRICS:
            run = runs.get(stage)
            if run is None:
                row[column] = None
                continue
            files = cache[id(run)][0]
            if tag == "#throughput":
                row[column] = throughput(files)
            elif tag == "#memory":
                events = [e[2] for f in files for e in f.get("perf/peak_memory_gb", [])]
                row[column] = max(events) if events else None
            elif tag == "#params":
                row[column] = count_parameters(run.checkpoint, stage)
            elif tag == "#steps":
                events = [e[1] for f in files for e in f.get("train/loss", [])]
                row[column] = max(events) if events else None
            else:
                row[column] = final_value(files, tag)
        rows.append(row)
    return rows


def _format(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if fmt == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}k"
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def write_report(grid: Grid, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    extra_axes = [a.name for a in grid.axes[1:]]
    columns = ["point", "ratio", *extra_axes, "latent", *[m[0] for m in METRICS]]
    # CSV: raw numbers, empty cells where a metric was not logged
    with open(out / "ablations.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    headers = ["point", "ratio", *extra_axes, "latent", *[m[3] for m in METRICS]]
    lines = [f"# Ablation: {grid.name}", "",
             f"Grid `{grid.path}`; final logged values per run (`{MISSING}`: not logged). "
             "Throughput: training steps/s between the first and last `train/loss` events; params: trainable "
             "networks (Stage B: decoder + compressor, Stage C: prior).", "",
             "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for row in rows:
        cells = [row["point"], _format(row["ratio"], "{:g}"), *[str(row[a]) for a in extra_axes],
                 _format(row["latent"], "{}")]
        cells += [_format(row[m[0]], m[4]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "ablations.md").write_text("\n".join(lines) + "\n")
    return [out / "ablations.csv", out / "ablations.md", *plot(grid, rows, out)]


def plot(grid: Grid, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``ablation_<metric>.png`` per metric with at least one value: metric against the ratio (log x), one
    line per value of the other axes."""
    try:
        import matplotlib
    except ImportError:
        print("warning: no plots: matplotlib is not installed (pip install 'lit_wuerstchen[sweep]' or "
              "pip install matplotlib)", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    extra_axes = [a.name for a in grid.axes[1:]]
    for column, _, tag, header, _ in PLOTTED:
        series: dict[tuple, list[tuple[float, float]]] = {}
        for row in rows:
            if row.get(column) is None or not row.get("ratio"):
                continue
            series.setdefault(tuple(row[a] for a in extra_axes), []).append((row["ratio"], float(row[column])))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ratios = sorted({x for s in series.values() for x, _ in s})
        for key, pts in series.items():
            pts.sort()
            label = ", ".join(f"{a}={v}" for a, v in zip(extra_axes, key)) or None
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xticks(ratios)
        ax.set_xticklabels([f"{r:g}" for r in ratios])
        ax.minorticks_off()
        ax.set_xlabel("compression ratio (f)")
        ax.set_ylabel(header)
        ax.set_title(f"{header} vs compression ({tag.lstrip('#')})", fontsize=9)
        ax.grid(True, alpha=0.3)
        if extra_axes:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"ablation_{column}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def cmd_report(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    points = select(expand(grid), args.only)
    rows = collect(grid, points)
    files = write_report(grid, rows, Path(args.out))
    print((Path(args.out) / "ablations.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lit_wuerstchen sweep",
                                     description="Run an ablation grid (Stage B then Stage C per point) and report on it.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every point of a grid (skips finished runs, resumes unfinished ones)")
    run.add_argument("--grid", required=True, help="grid YAML, e.g. experiments/ablations/compression/grid_toy.yaml")
    run.add_argument("--dry_run", action="store_true", help="print the commands in order, run nothing")
    run.add_argument("--launcher", choices=("local", "slurm"), default="local",
                     help="local: one after another here; slurm: submitit jobs (pip install submitit)")
    run.add_argument("--only", default=None, help="comma-separated point names (or prefixes such as f16)")
    report = sub.add_parser("report", help="CSV, markdown table and plots of the grid's logged metrics")
    report.add_argument("--grid", required=True)
    report.add_argument("--out", default="docs/ablations", help="output folder (default docs/ablations)")
    report.add_argument("--only", default=None, help="comma-separated point names")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_run(args) if args.command == "run" else cmd_report(args)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
