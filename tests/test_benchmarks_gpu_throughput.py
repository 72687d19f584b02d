"""benchmarks/gpu_throughput.py: its FLOP count against analytic counts, and one tiny run of its main() on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO
from torch import nn

from lit_wuerstchen.diffusion import Diffusion, DiffusionConfig
from lit_wuerstchen.models import Prior, PriorConfig

sys.path.insert(0, str(REPO / "benchmarks"))  # as when run as a script: its helper module machine.py
_spec = importlib.util.spec_from_file_location("gpu_throughput", REPO / "benchmarks" / "gpu_throughput.py")
gpu_throughput = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_throughput  # dataclasses look their module up
_spec.loader.exec_module(gpu_throughput)


def test_flop_counter_linear_and_depthwise_conv_training_step():
    """Two linears (the input needs no gradient) and a depthwise conv (torch's formula counts its weight gradient
    `groups` times over): forward + backward against the textbook counts."""
    batch, d_in, hidden, d_out = 3, 20, 48, 8
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    with gpu_throughput.flop_counter() as counter:
        mlp(torch.randn(batch, d_in)).sum().backward()
    # forward 2BIH + 2BHO; backward: grad weight of both, grad input of the second only
    assert counter.get_total_flops() == 4 * batch * d_in * hidden + 6 * batch * hidden * d_out

    channels, side, k = 16, 10, 3
    conv = nn.Conv2d(channels, channels, k, padding=1, groups=channels)
    x = torch.randn(batch, channels, side, side, requires_grad=True)
    with gpu_throughput.flop_counter() as counter:
        conv(x).sum().backward()
    # forward, grad input and grad weight: 2 * B * C * k^2 * H * W each
    assert counter.get_total_flops() == 3 * 2 * batch * channels * k * k * side * side


def prior_training_flops(batch: int, side: int, config: PriorConfig, text_tokens: int = 77) -> int:
    """Matmul/conv FLOPs of one training step of the prior, by hand: 3x the forward where both gradients are needed,
    2x where the input needs none (the text, x_t and the r embedding enter without gradients)."""
    n, L, c, t, lat, e, k = side * side, text_tokens, config.width, config.text_channels, 16, 64, 3
    flops = 4 * L * t * c + 6 * L * c * c  # text mapper: first linear (input without gradient), second
    flops += 4 * n * lat * c + 6 * n * c * 2 * lat  # 1x1 conv in (x_t without gradient), 1x1 conv out
    per_block = 6 * n * c * k * k + 3 * 2 * (2 * n * c * 4 * c)  # depthwise conv, MLP c -> 4c -> c
    per_block += 2 * 2 * e * 2 * c  # FiLM mapper on the r embedding
    per_block += 6 * L * c * c  # the attention block's text mapper
    per_block += 6 * n * c * c * 2 + 6 * (n + L) * c * c * 2  # q and out on the image tokens, k and v on image + text
    per_block += 3 * 2 * (2 * n * (n + L) * c)  # scores and weighted sum
    return batch * (flops + config.depth * per_block)


def test_prior_flops_equal_the_analytic_count():
    config = PriorConfig(width=128, depth=2, heads=2, text_channels=64)
    diffusion = Diffusion(DiffusionConfig())
    batch, side = 2, 6

    def inputs(device):
        return torch.randn(batch, 16, side, side, device=device), {"text": torch.randn(batch, 77, 64, device=device)}

    counted = gpu_throughput.count_flops(lambda: Prior(config), inputs, diffusion)  # meta device
    assert counted == prior_training_flops(batch, side, config)
    # the same count on the CPU, where attention runs as one fused kernel
    assert gpu_throughput.count_flops(lambda: Prior(config), inputs, diffusion, "cpu") == counted


def test_main_tiny_run_reports_finite_positive_numbers(tmp_path):
    out = tmp_path / "results.json"
    argv = ["--preset", "tiny", "--strategy", "ddp", "--steps", "1", "--warmup", "0", "--matmul-sizes", "256"]
    results = gpu_throughput.main([*argv, "--json", str(out)])
    assert [row["case"] for row in results["cases"]] == ["C 8x8", "B 128px"]
    for row in results["cases"]:
        for key in (
            "step_s_median",
            "samples_per_s",
            "flops_per_step_per_process",
            "achieved_flops_per_s",
            "of_adjacent_probe_median",
        ):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert math.isfinite(row["final_loss"])
        assert row["achieved_flops_per_s"] == pytest.approx(row["flops_per_step_per_process"] / row["step_s_median"])
    assert results["meta"]["matmul_ceiling_flops"] > 0
    assert json.loads(out.read_text())["cases"][0]["case"] == "C 8x8"
    with pytest.raises(SystemExit, match="exists"):  # never overwrites without --overwrite
        gpu_throughput.main([*argv, "--json", str(out)])


def test_stage_c_projection_arithmetic():
    """GPU-hours of the recipe from per-GPU samples/s at 12x12 and 24x24; FLOP-scaled when 12x12 is missing."""
    args = gpu_throughput.parse_args(["--strategy", "ddp"])

    def row(side, samples_per_s, flops_per_sample):
        return {"stage": "C", "strategy": "ddp", "input_shapes": {"x0": [16, side, side]}, "processes": 8,
                "samples_per_s": samples_per_s, "batch_per_process": 4,
                "flops_per_step_per_process": 4 * flops_per_sample,
                "achieved_flops_per_s": samples_per_s / 8 * flops_per_sample}  # fmt: skip

    rows = [row(24, 80.0, 3.4e12), row(12, 320.0, 0.9e12)]
    (measured,) = gpu_throughput.project_stage_c(rows, args, peak=989.5e12)
    expected = (500_000 * 1536 / 40.0 + 364_000 * 1536 / 10.0) / 3600
    assert measured["gpu_hours"] == pytest.approx(expected)
    assert measured["a100_hours_at_same_mfu"] == pytest.approx(expected * 989.5 / 312)
    assert not measured["notes"]
    (scaled,) = gpu_throughput.project_stage_c(rows[:1], args, peak=None)
    # 12x12 not measured: the 24x24 FLOP/s on a quarter of the FLOPs, i.e. 4x the samples/s
    assert scaled["gpu_hours"] == pytest.approx((500_000 * 1536 / 40.0 + 364_000 * 1536 / 10.0) / 3600)
    assert scaled["notes"] and "a100_hours_at_same_mfu" not in scaled


def run_script(tmp_path: Path, *argv: str) -> tuple[str, dict]:
    """The script run as users run it (from benchmarks/, a subprocess), its output and --json results."""
    out = tmp_path / "results.json"
    command = [sys.executable, "gpu_throughput.py", *argv, "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIT_WUERSTCHEN_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO / "benchmarks", env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout, json.loads(out.read_text())


def table_rows(stdout: str, first: str) -> list[list[str]]:
    """The cells of the printed markdown table whose header starts with ``first``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def positive(cell: str) -> float:
    value = float(cell.rstrip("%").replace(",", ""))
    assert math.isfinite(value) and value > 0, cell
    return value


TINY = ["--preset", "tiny", "--strategy", "ddp", "--steps", "2", "--warmup", "1", "--matmul-sizes", "256"]


def test_fit_mode_times_the_training_loop_of_the_stage_module(tmp_path):
    stdout, results = run_script(tmp_path, *TINY, "--mode", "fit", "--stages", "C")
    (row,) = results["cases"]
    assert (row["mode"], row["case"]) == ("fit", "C 8x8 fit")
    assert len(row["step_s_all"]) == 2 and row["optimizer"] == "AdamW (torch's default)"  # the CPU's default
    # the stage's count, PerfMonitor's: the prior's forward + backward at the network mode's shapes
    config = PriorConfig(width=128, depth=2, heads=2, text_channels=64, dropout=0.1)
    diffusion = Diffusion(DiffusionConfig(t_sampler="official", target="eps", loss_weight="p2_official"))

    def inputs(device):
        return torch.randn(2, 16, 8, 8, device=device), {"text": torch.randn(2, 77, 64, device=device)}

    assert row["flops_per_step_per_process"] == gpu_throughput.count_flops(lambda: Prior(config), inputs, diffusion)
    assert row["perf_monitor"]["samples_per_sec"] > 0 and row["perf_monitor"]["tflops_per_sec"] > 0
    (cells,) = table_rows(stdout, "case")
    assert cells[0] == "C 8x8 fit"
    for index in (5, 6, 7, 8, 10, 11):  # step ms, samples/s, GFLOP/step, GFLOP/s, of ceiling, of adjacent matmul
        positive(cells[index])
    assert not results["framework_overhead"]  # no network row to compare with


def test_both_modes_print_the_framework_overhead(tmp_path):
    stdout, results = run_script(tmp_path, *TINY, "--mode", "both")
    assert [(r["mode"], r["case"]) for r in results["cases"]] == [
        ("network", "C 8x8"), ("fit", "C 8x8 fit"), ("network", "B 128px"), ("fit", "B 128px fit")
    ]  # fmt: skip
    assert [cells[0] for cells in table_rows(stdout, "case")] == ["C 8x8", "C 8x8 fit", "B 128px", "B 128px fit"]
    for cells in table_rows(stdout, "case"):
        for index in (5, 6, 7, 8, 10, 11):
            positive(cells[index])
    overhead = table_rows(stdout, "case | network step ms")
    assert [cells[0] for cells in overhead] == ["C 8x8", "B 128px"]
    for cells in overhead:
        for index in (1, 3, 4, 5):  # network step, fit step, FLOPs of each
            positive(cells[index])
        for index in (6, 7):  # the overheads: may be ~0 or below on a loaded machine
            assert math.isfinite(float(cells[index].rstrip("%")))
    assert overhead[0][2] == "-"  # Stage C: nothing beside the network
    positive(overhead[1][2])  # Stage B: its compressor's step alone, the part the network mode leaves out
    c, b = results["framework_overhead"]
    assert c["flops_per_step_network"] == c["flops_per_step_fit"]  # Stage C: the same work in both modes
    assert b["flops_per_step_fit"] > b["flops_per_step_network"]  # Stage B's fit also trains its compressor
