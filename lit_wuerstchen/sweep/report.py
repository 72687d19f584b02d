"""Reporting on a sweep: final metrics of every point as CSV, a markdown table and plots against the ratio."""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ..checkpoints import CheckpointError, read_checkpoint
from ..files import atomic_file, write_text_atomic
from ..models.compressor import semantic_latent_size
from .grid import Grid, Point, SweepError, expand, load_grid, select

MISSING = "—"  # table cell of a metric that was not logged
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
    ("b_images_per_s", "b", "~perf/images_per_sec", "B img/s", "{:.1f}"),
    ("b_mfu", "b", "~perf/mfu", "B MFU", "{:.3f}"),
    ("b_params", "b", "#params", "B params", "params"),
    ("c_steps", "c", "#steps", "C steps", "{:.0f}"),
    ("c_steps_per_s", "c", "#throughput", "C steps/s", "{:.2f}"),
    ("c_peak_memory_gb", "c", "#memory", "C peak mem GB", "{:.2f}"),
    ("c_images_per_s", "c", "~perf/images_per_sec", "C img/s", "{:.1f}"),
    ("c_mfu", "c", "~perf/mfu", "C MFU", "{:.3f}"),
    ("c_params", "c", "#params", "C params", "params"),
]
PLOTTED = [m for m in METRICS if m[0] not in ("b_steps", "c_steps", "b_params", "c_params")]
# trainable parts of each stage's checkpoint (Stage A and the frozen networks are not part of the ablation)
PARAM_PREFIXES = {"b": ("decoder.", "compressor."), "c": ("prior.",)}


def read_scalars(folder: Path) -> list[dict[str, list[tuple[float, int, float]]]]:
    """Scalars of every event file in ``folder`` (one dict per file, in file order): tag -> [(wall, step, value)]."""
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


def median_value(files: list[dict[str, list[tuple[float, int, float]]]], tag: str) -> float | None:
    """The median of every logged value of ``tag`` (a rate logged per window: the warm-up window and the windows
    with a checkpoint write do not move it)."""
    values = [e[2] for f in files for e in f.get(tag, [])]
    return statistics.median(values) if values else None


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
    """Trainable parameters of ``stage`` in ``checkpoint`` (None: no checkpoint, unreadable, or none counted)."""
    if not checkpoint.is_file():
        return None
    try:
        try:
            ckpt = read_checkpoint(checkpoint, mmap=True)
        except CheckpointError:  # e.g. not a zip checkpoint: no mmap
            ckpt = read_checkpoint(checkpoint)
    except CheckpointError as err:
        print(f"warning: {err}", file=sys.stderr)
        return None
    state = ckpt.get("state_dict", ckpt)
    skip = ("running_mean", "running_var", "num_batches_tracked")
    total = sum(
        int(v.numel())
        for k, v in state.items()
        if k.startswith(PARAM_PREFIXES[stage]) and not k.endswith(skip) and hasattr(v, "numel")
    )
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
            elif tag.startswith("~"):
                row[column] = median_value(files, tag[1:])
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
    with atomic_file(out / "ablations.csv") as partial, open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    headers = ["point", "ratio", *extra_axes, "latent", *[m[3] for m in METRICS]]
    lines = [
        f"# Ablation: {grid.name}",
        "",
        f"Grid `{grid.path}`; final logged values per run (`{MISSING}`: not logged). "
        "Throughput: training steps/s between the first and last `train/loss` events; params: trainable "
        "networks (Stage B: decoder + compressor, Stage C: prior); img/s and MFU: medians of the logged "
        "`perf/images_per_sec` and `perf/mfu`; peak memory: the largest `perf/peak_memory_gb`.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + " --- |" * len(headers),
    ]
    for row in rows:
        cells = [
            row["point"],
            _format(row["ratio"], "{:g}"),
            *[str(row[a]) for a in extra_axes],
            _format(row["latent"], "{}"),
        ]
        cells += [_format(row[m[0]], m[4]) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    write_text_atomic(out / "ablations.md", "\n".join(lines) + "\n")
    return [out / "ablations.csv", out / "ablations.md", *plot(grid, rows, out)]


def plot(grid: Grid, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``ablation_<metric>.png`` per metric with at least one value: metric against the ratio (log x), one
    line per value of the other axes."""
    try:
        import matplotlib
    except ImportError:
        print(
            "warning: no plots: matplotlib is not installed (pip install 'lit_wuerstchen[sweep]' or "
            "pip install matplotlib)",
            file=sys.stderr,
        )
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
    finished = [r for p in points for r in p.runs if r.state() == "done"]
    if not finished:
        raise SweepError(f"no run of grid {grid.path} has finished (no DONE marker): nothing reported, nothing written")
    out = Path(args.out)
    existing = [out / name for name in ("ablations.md", "ablations.csv") if (out / name).exists()]
    if existing and not args.overwrite:
        raise SweepError(f"{existing[0]} exists: pass --overwrite to replace the report, or choose another --out")
    rows = collect(grid, points)
    files = write_report(grid, rows, out)
    print((Path(args.out) / "ablations.md").read_text())
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
