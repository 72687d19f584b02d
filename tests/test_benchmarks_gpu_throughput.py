"""benchmarks/gpu_throughput.py: its FLOP count against analytic counts, and one tiny run of its main() on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

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
