"""Our Stage C and Stage B networks against diffusers' Würstchen networks holding the same weights, fp32 on the CPU.

For each stage, builds ours (``Prior`` / ``DiffNeXt``), gives the zero-initialised tensors (output heads, FiLM
mappers, GRN gamma/beta, biases) small random values so that every layer counts, and builds diffusers'
``WuerstchenPrior`` / ``WuerstchenDiffNeXt`` from them with ``interop.export`` (the exact key maps). It checks that
both give the same output on the same inputs (eval; the max abs difference is printed, and must be <= 1e-4 of the
output's scale), then times, on the same inputs:

* forward: eval mode, ``torch.no_grad()``;
* train step: train mode (dropout 0.1 as released), forward + MSE to a random target + backward; no optimizer
  (the gradients are dropped after each step, so at most one model's gradients exist at a time).

Ours and diffusers' alternate (ours, theirs, ours, theirs, ...) for ``--rounds`` rounds after ``--warmup`` rounds
of each, so load drift on the machine hits both alike; the table gives medians and the ratio ours/diffusers
(< 1: ours is faster). One stage at a time is in memory: at the released sizes two 1B-parameter networks plus one
set of gradients peak at 14.1 GB (16.6 GB with ``--c-side 24``).

Configs: ``released`` (the released v2 prior, 993,636,896 parameters, and decoder, 1,055,365,280) at small latents
(Stage C 16x12x12 = a 512 px image, Stage B 4x32x32 = 128 px), and ``small`` (prior width 512, depth 8, 8 heads;
decoder widths [64, 128, 256, 256], blocks [2, 2, 4, 2]; the released text widths and options) to run fast.
The training step drops its gradients (``zero_grad(set_to_none=True)``, torch's default), so every step allocates
them anew, for both networks alike: at the released sizes ~4 GB per step (~600k page faults).

``--family cascade``: our Stable Cascade ``CascadeUNet`` against diffusers' ``StableCascadeUNet`` (built from
``cascade_config_to_diffusers``, weights moved with ``cascade_key_map``), the same checks and timing. Configs: ``lite``
(the released Stage C lite, 1.0B, and Stage B lite, 0.7B) and ``small`` (Stage C widths [256, 256], 4 heads, blocks
[2, 4]; Stage B widths [64, 128, 256, 256], heads [0, 0, 4, 4], blocks [1, 1, 2, 1]; the released conditioning widths).
Inputs: Stage C latent 16x12x12 (``--c-side``), pooled text [B, 1, 1280], text [B, 77, 1280], image [B, 1, 768];
Stage B latent 4x32x32 (``--b-side``), effnet 16x12x12 (``--semantic-side``), pixels 3x8x8, pooled text
[B, 1, 1280]; no sca / crp (diffusers reads them only at batch 1). ``lite`` peaks at 13.4 GiB and takes ~3.5 min
on a 2-core CPU with the default rounds, ``small`` ~20 s.

Usage: python benchmarks/vs_diffusers.py [--family v2|cascade] [--config released|lite|small] [--rounds N]
       [--warmup N] [--stages C B] [--modes forward train] [--batch 1] [--c-side 12] [--b-side 32]
       [--semantic-side N]
(defaults: 5 rounds after 1 warm-up at the released sizes, ~3.5 min on a 2-core CPU; 20 after 3 for ``small``, 25 s)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from machine import describe  # benchmarks/machine.py (scripts run from benchmarks/)

from lit_wuerstchen.interop.export import diffusers_decoder, diffusers_prior
from lit_wuerstchen.interop.keymaps import cascade_config_to_diffusers, cascade_key_map, rename
from lit_wuerstchen.models import CascadeUNet, CascadeUNetConfig, DiffNeXt, DiffNeXtConfig, Prior, PriorConfig

TEXT_TOKENS = 77
TOLERANCE = 1e-4  # of the output's max abs value


def configs(name: str) -> tuple[PriorConfig, DiffNeXtConfig]:
    if name == "released":
        return PriorConfig(), DiffNeXtConfig.released_v2()
    released = DiffNeXtConfig.released_v2()
    decoder = DiffNeXtConfig(
        widths=[64, 128, 256, 256],
        blocks=[2, 2, 4, 2],
        heads=[0, 2, 4, 4],  # 64 channels per head, as released
        semantic_proj_channels=released.semantic_proj_channels,
        semantic_mappers=released.semantic_mappers,
        semantic_align_corners=released.semantic_align_corners,
        text_channels=released.text_channels,
        dropout=released.dropout,
    )
    return PriorConfig(width=512, depth=8, heads=8), decoder


@torch.no_grad()
def fill_zeros(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Small random values for the tensors the init leaves at zero, so that the comparison sees every layer (the
    output heads stay small: the prior divides by ``|1 - b|``)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.named_parameters():
        if not tensor.any():
            scale = 1e-3 if name.startswith("out.") else 0.02
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
    return model


def stage_c(config: PriorConfig, batch: int, side: int):
    g = torch.Generator().manual_seed(1)
    ours = fill_zeros(Prior(config), 10).eval()
    inputs = (
        torch.randn(batch, config.latent_channels, side, side, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, TEXT_TOKENS, config.text_channels, generator=g),
    )
    theirs = diffusers_prior(ours)
    return ours, theirs, inputs, lambda model, x, r, text: model(x, r, text)


def stage_b(config: DiffNeXtConfig, batch: int, side: int, semantic_side: int):
    g = torch.Generator().manual_seed(2)
    ours = fill_zeros(DiffNeXt(config), 11).eval()
    inputs = (
        torch.randn(batch, config.latent_channels, side, side, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, config.semantic_channels, semantic_side, semantic_side, generator=g),
        torch.randn(batch, TEXT_TOKENS, config.text_channels, generator=g),
    )
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt

    # diffusers' init rescales every ResBlock once per module (112 s at the released size); ours replace its weights.
    with mock.patch.object(WuerstchenDiffNeXt, "_init_weights", lambda self, module: None):
        theirs = diffusers_decoder(ours)

    def call(model, x, r, semantic, text):
        return model(x, r, semantic, text) if model is ours else model(x, r, semantic, clip=text)

    return ours, theirs, inputs, call


def cascade_configs(name: str) -> tuple[CascadeUNetConfig, CascadeUNetConfig]:
    c, b = CascadeUNetConfig.released_stage_c_lite(), CascadeUNetConfig.released_stage_b_lite()
    if name == "lite":
        return c, b
    # smaller widths and depths, the released conditioning widths and options, to run fast
    c = dataclasses.replace(c, widths=[256, 256], heads=[4, 4], down_blocks=[2, 4], up_blocks=[2, 4], cond_channels=256)
    b = dataclasses.replace(
        b, widths=[64, 128, 256, 256], heads=[0, 0, 4, 4], down_blocks=[1, 1, 2, 1], up_blocks=[1, 1, 2, 1]
    )
    return c, b


def cascade_stage(config: CascadeUNetConfig, inputs: dict[str, torch.Tensor], seed: int):
    """Ours and diffusers' ``StableCascadeUNet`` with the same weights, as tests/test_cascade_models.py moves them."""
    from diffusers import StableCascadeUNet

    ours = fill_zeros(CascadeUNet(config), seed).eval()
    # built on meta and filled from ours: PyTorch's default init of ~1B parameters would only be overwritten
    with torch.device("meta"):
        theirs = StableCascadeUNet(**cascade_config_to_diffusers(config))
    theirs = theirs.to_empty(device="cpu")
    state = rename(ours.state_dict(), cascade_key_map(config), theirs.state_dict(), "ours", "CascadeUNet")
    theirs.load_state_dict(state, strict=True)
    theirs.eval()
    names = list(inputs)
    renamed = {"x": "sample", "r": "timestep_ratio", "clip_image": "clip_img"}

    def call(model, *args):
        kwargs = dict(zip(names, args))
        if model is ours:
            return model(**kwargs)
        return model(**{renamed.get(k, k): v for k, v in kwargs.items()}, return_dict=False)[0]

    return ours, theirs, tuple(inputs.values()), call


def cascade_stage_c(config: CascadeUNetConfig, batch: int, side: int):
    g = torch.Generator().manual_seed(1)
    inputs = {
        "x": torch.randn(batch, config.latent_channels, side, side, generator=g),
        "r": torch.rand(batch, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_channels, generator=g),
        "clip_text": torch.randn(batch, TEXT_TOKENS, config.clip_text_channels, generator=g),
        "clip_image": torch.randn(batch, 1, config.clip_image_channels, generator=g),
    }
    return cascade_stage(config, inputs, 10)


def cascade_stage_b(config: CascadeUNetConfig, batch: int, side: int, semantic_side: int):
    g = torch.Generator().manual_seed(2)
    inputs = {
        "x": torch.randn(batch, config.latent_channels, side, side, generator=g),
        "r": torch.rand(batch, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_channels, generator=g),
        "effnet": torch.randn(batch, config.effnet_channels, semantic_side, semantic_side, generator=g),
        "pixels": torch.randn(batch, config.pixel_channels, 8, 8, generator=g),
    }
    return cascade_stage(config, inputs, 11)


def interleaved(step_ours, step_theirs, rounds: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per call, ours and theirs alternating, after ``warmup`` calls of each."""
    for _ in range(warmup):
        step_ours()
        step_theirs()
    times = ([], [])
    for _ in range(rounds):
        for step, out in ((step_ours, times[0]), (step_theirs, times[1])):
            start = time.perf_counter()
            step()
            out.append(time.perf_counter() - start)
    return times


def benchmark(stage: str, built, modes: list[str], rounds: int, warmup: int) -> list[dict]:
    ours, theirs, inputs, call = built
    with torch.no_grad():
        reference = call(theirs, *inputs)
        diff = (call(ours, *inputs) - reference).abs().max().item()
    relative = diff / reference.abs().max().item()
    print(f"stage {stage}: max abs diff ours vs diffusers {diff:.3e} ({relative:.2e} of the output's max)")
    if relative > TOLERANCE:
        raise SystemExit(f"stage {stage}: outputs differ by {relative:.2e} of their scale: not equal work")
    target = torch.randn_like(reference)
    del reference

    def forward(model):
        def step():
            with torch.no_grad():
                call(model, *inputs)

        return step

    def train_step(model):
        def step():
            F.mse_loss(call(model, *inputs), target).backward()
            model.zero_grad(set_to_none=True)

        return step

    rows = []
    for mode in modes:
        for model in (ours, theirs):
            model.train(mode == "train")
        make = forward if mode == "forward" else train_step
        ours_times, their_times = interleaved(make(ours), make(theirs), rounds, warmup)
        rows.append(
            {
                "stage": stage,
                "mode": mode,
                "input": " / ".join("x".join(map(str, t.shape[1:])) for t in inputs if t.ndim > 1),
                "ours": statistics.median(ours_times),
                "theirs": statistics.median(their_times),
                "ours_all": ours_times,
                "theirs_all": their_times,
                "diff": diff,
            }
        )
        print(f"  {mode}: ours {_ms(ours_times)} ms, diffusers {_ms(their_times)} ms", flush=True)
    return rows


def _ms(times: list[float]) -> str:
    return " / ".join(f"{1000 * t:.0f}" for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["v2", "cascade"], default="v2")
    parser.add_argument(
        "--config",
        choices=["released", "lite", "small"],
        help="v2: released|small; cascade: lite|small (default: the first)",
    )
    parser.add_argument("--rounds", type=int, help="timed rounds (default: 5 released, 20 small)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default: 1 released, 3 small)")
    parser.add_argument("--stages", nargs="+", choices=["C", "B"], default=["C", "B"])
    parser.add_argument("--modes", nargs="+", choices=["forward", "train"], default=["forward", "train"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--c-side", type=int, default=12, help="Stage C latent side (12: a 512 px image)")
    parser.add_argument("--b-side", type=int, default=32, help="Stage B latent side (32: a 128 px image)")
    parser.add_argument("--semantic-side", type=int, help="side of Stage B's semantic latent (v2: 3, cascade: 12)")
    args = parser.parse_args()
    cascade = args.family == "cascade"
    args.config = args.config or ("lite" if cascade else "released")
    if args.config != "small" and (args.config == "lite") != cascade:
        parser.error(f"--config {args.config} is not a {args.family} config")
    args.semantic_side = args.semantic_side or (12 if cascade else 3)
    released = args.config != "small"
    args.rounds = args.rounds or (5 if released else 20)
    args.warmup = (1 if released else 3) if args.warmup is None else args.warmup
    import diffusers

    torch.manual_seed(0)
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {describe()}")
    threads = torch.get_num_threads()
    print(f"versions  torch {torch.__version__} ({threads} threads) | diffusers {diffusers.__version__}")
    rounds = f"{args.warmup} warm-up + {args.rounds} timed rounds"
    print(f"config    {args.family} {args.config}, batch {args.batch}, fp32, {rounds}\n")
    prior_config, decoder_config = (cascade_configs if cascade else configs)(args.config)
    rows = []
    for stage in args.stages:
        start = time.perf_counter()
        if stage == "C":
            built = (cascade_stage_c if cascade else stage_c)(prior_config, args.batch, args.c_side)
        else:
            build = cascade_stage_b if cascade else stage_b
            built = build(decoder_config, args.batch, args.b_side, args.semantic_side)
        millions = sum(p.numel() for p in built[0].parameters()) / 1e6
        built_in = time.perf_counter() - start
        print(f"stage {stage}: {millions:,.1f}M parameters; ours and diffusers' built in {built_in:.0f} s")
        rows += benchmark(stage, built, args.modes, args.rounds, args.warmup)
        del built
        gc.collect()  # one stage's two networks in memory at a time
        print(f"stage {stage}: {time.perf_counter() - start:.0f} s in all", flush=True)
    print(
        "\n| stage | config | mode | input (per sample) | ours, ms (median) | diffusers, ms (median) "
        "| ours / diffusers | max abs diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['stage']} | {args.config} | {r['mode']} | {r['input']} | {1000 * r['ours']:.1f} "
            f"| {1000 * r['theirs']:.1f} | **{r['ours'] / r['theirs']:.2f}** | {r['diff']:.1e} |"
        )


if __name__ == "__main__":
    main()
