"""Grid files of ``python -m lit_wuerstchen sweep``: parsing and validation, expansion into points and runs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("b", "c")
STAGE_TITLES = {"b": "Stage B", "c": "Stage C"}
DONE_MARKER = "DONE"
_GRID_KEYS = {"name", "save_dir", "stages", "base", "logger", "axes", "extra_args", "slurm"}
_AXIS_KEYS = {"name", "prefix", "values", "stages"}


class SweepError(RuntimeError):
    """A problem with the grid file or a run of the sweep, with a message meant for the user."""


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
        """'done' (the marker ``fit`` writes when it reached its end), 'resume' (a checkpoint, no marker) or 'new'."""
        if self.marker.is_file():
            return "done"
        if self.checkpoint.is_file():
            return "resume"
        return "new"

    def command(self, python: str = "python") -> list[str]:
        cmd = [python, "-m", "lit_wuerstchen", "fit", *self.args]
        state = self.state()
        if state == "resume":
            cmd += ["--ckpt_path", str(self.checkpoint)]
        elif state == "new" and self.folder.is_dir() and any(self.folder.iterdir()):
            cmd += ["--overwrite_run=true"]  # a run that stopped before its first checkpoint: nothing to keep
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
            if (
                not isinstance(spec, dict)
                or not (spec.get("key") or spec.get("config"))
                or set(spec) - {"key", "config"}
            ):
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
    args += [
        f"--trainer.logger.init_args.save_dir={grid.save_dir}",
        f"--trainer.logger.init_args.name={grid.logger[stage]}",
        f"--trainer.logger.init_args.version={run_name}",
    ]
    if stage == "c" and previous is not None:
        args.append(f"--model.init_args.stage_b_checkpoint={previous.checkpoint}")
    args += grid.extra_args[stage]
    return Run(
        stage,
        run_name,
        {a.name: values[a.name] for a in grid.stage_axes(stage)},
        grid.logger[stage],
        grid.save_dir,
        args,
        depends_on=previous,
    )


def select(points: list[Point], only: str | None) -> list[Point]:
    """Points named in ``only`` (comma-separated point or run names, or a prefix such as 'f16')."""
    if not only:
        return points
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [
        p
        for p in points
        if any(p.name == w or p.name.startswith(w + "_") or any(r.name == w for r in p.runs) for w in wanted)
    ]
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
