"""Training throughput of the released-scale Stage C prior and Stage B decoder: samples/s, TFLOP/s, MFU, memory.

One training step, as the framework trains (``DiffusionStage.diffusion_loss``): ``Diffusion.loss`` of the network on
random *precomputed-style* inputs (no text encoder, no Stage A, no compressor: random latents and text hidden
states of the training shapes, made once), backward, optional gradient clipping, an AdamW step (fused where
available, else foreach) and ``zero_grad``. On a GPU under ``torch.autocast(bfloat16)`` with fp32 weights
(Lightning's ``bf16-mixed``); on a CPU in fp32.

Cases (one table row each), per ``--strategy``:

* Stage C: ``Prior(PriorConfig())`` (released v2: width 1536, depth 32, 24 heads, text 1280, dropout 0.1) on
  16x24x24 semantic latents (a 1024 px image at compression 42.67) with 77 text tokens of width 1280; on a GPU also at
  16x12x12 (the first phase of the paper's recipe), with 4x the batch, for the GPU-hour projection.
* Stage B: ``DiffNeXt(DiffNeXtConfig.released_v2())`` at the paper's second phase, 1024 px images: Stage A latents
  4x256x256, semantic latents 16x24x24, 77 text tokens of width 1024 (``--b-image-size 512``: the first phase,
  4x128x128 and 16x12x12). The EfficientNetV2-S compressor trained jointly with Stage B is not part of the step.

Strategies: ``ddp`` (torch ``DistributedDataParallel`` over the processes; on one process the plain module) and
``fsdp`` (``lit_wuerstchen.strategies.shard_network``: FSDP2 ``fully_shard`` per block, parameters gathered in bf16
on a GPU, gradients reduced in fp32). FSDP over a world of one process is allowed (it measures the sharding
overhead). ``--activation-checkpointing`` recomputes each block in the backward pass (both strategies);
``--compile`` compiles the network (``network.compile()``; per block under FSDP, as the stages do).

FLOPs: one training step (forward + backward) counted once per case with ``torch.utils.flop_counter`` on a copy of
the network on the meta device, as ``lightning.fabric.utilities.throughput.measure_flops`` does, but with torch's
grouped-convolution weight-gradient formula corrected (``lit_wuerstchen.flops``; torch's counts the depthwise convs
``width`` times over: +23% on the released prior, +16% on the decoder): matmuls, convolutions and attention;
activation-checkpointing recomputation is *not* counted (model FLOPs, as MFU is defined). MFU = achieved FLOP/s per
GPU / peak: the dense bf16 peak from Lightning's table (``get_available_flops``), or ``--peak-tflops``;
Lightning's table lists the H200 at 2.0e15, the with-sparsity figure, and finds it only for names with "sxm1"/"nvl1"
in them, so an H200 counts here as an H100 SXM: 989.5 TFLOP/s dense bf16 (same tensor cores). Every run also
measures a matmul ceiling in the same process (large square ``torch.mm`` in the compute dtype, before every case and
after the last; the best of all counts, since other jobs only lower it) and reports the achieved FLOP/s as a share
of it.

On a CPU (no CUDA) the same code runs a MEDIUM config (``--preset medium``; ``--width --depth --batch-size`` etc.
override it) in fp32: the released prior's width, heads and inputs (24x24 latents, 77 text tokens) with 2 of its 32
blocks, about 2 s a step on 2 cores; the decoder at a quarter of the released widths. ``--preset tiny`` is for smoke
tests. On a CPU, glibc malloc is told to keep freed memory (:func:`tune_malloc`; ``--no-malloc-tuning`` to compare),
and each case reports the share of its threads' time the process really got (below ~95%: other jobs took cores).
``--profile`` profiles one more step per case and lists the top ops by self time and the GEMM / conv / attention
shares.

Multi-GPU: ``torchrun --nproc_per_node=8 benchmarks/gpu_throughput.py`` (nccl; gloo on CPU). Without torchrun on a
machine with several GPUs it runs on GPU 0 and prints the torchrun command.

Usage: python benchmarks/gpu_throughput.py [--stages C B] [--strategy ddp fsdp] [--steps 20] [--warmup 5]
       [--batch-size N | --batch-c N --batch-b N] [--activation-checkpointing] [--compile]
       [--preset released|medium|tiny] [--profile] [--json PATH [--overwrite]]
Results: docs/benchmarks.md "GPU throughput (benchmarks/gpu_throughput.py)".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from machine import cpu_name, describe  # benchmarks/machine.py (scripts run from benchmarks/)
from torch import nn

from lit_wuerstchen.diffusion import Diffusion, DiffusionConfig
from lit_wuerstchen.flops import device_peak_flops, flop_counter
from lit_wuerstchen.models import DiffNeXt, DiffNeXtConfig, Prior, PriorConfig

TEXT_TOKENS = 77
COMPRESSION = 42.67  # image side / semantic latent side (1024 px -> 24)
STAGE_A_DOWNSAMPLING = 4  # 1024 px -> 4x256x256
# Würstchen paper (v2): Stage C took 24,602 A100-hours. Recipe (../shared/DESIGN.md, experiments/stage_c.yaml):
# 500k iterations at 12x12 latents with batch 1536, then 364k at 24x24 (its batch is not stated: --recipe-batch-24).
PAPER_STAGE_C_A100_HOURS = 24_602
RECIPE_12 = (12, 500_000, 1536)
RECIPE_24_ITERATIONS = 364_000
A100_BF16 = 312e12
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation")
CONV_OPS = ("conv", "mkldnn_convolution")
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


# --- configs ---------------------------------------------------------------------------------------------------------
PRESETS = {
    # width/depth/heads/text: the prior; b_*: the decoder; batches per GPU (per process).
    "released": dict(
        width=1536, depth=32, heads=24, text_c=1280, batch_c=32, sides_c=[24, 12],
        b_widths=[320, 640, 1280, 1280], b_blocks=[4, 4, 14, 4], b_heads=[0, 10, 20, 20], b_proj=1024, text_b=1024,
        b_image=1024, batch_b=8,
    ),
    # CPU: the released prior's width, heads and inputs with 2 of its 32 blocks (~2 s a step on 2 cores); the decoder
    # at a quarter of the released widths (heads of 64 channels) on 512 px images.
    "medium": dict(
        width=1536, depth=2, heads=24, text_c=1280, batch_c=2, sides_c=[24],
        b_widths=[128, 256, 512, 512], b_blocks=[2, 2, 4, 2], b_heads=[0, 4, 8, 8], b_proj=384, text_b=1024,
        b_image=512, batch_b=1,
    ),
    "tiny": dict(
        width=128, depth=2, heads=2, text_c=64, batch_c=2, sides_c=[8],
        b_widths=[16, 32, 32, 32], b_blocks=[1, 1, 1, 1], b_heads=[0, 1, 1, 1], b_proj=16, text_b=64,
        b_image=128, batch_b=2,
    ),
}  # fmt: skip


@dataclass
class Case:
    stage: str  # "C" or "B"
    strategy: str  # "ddp" or "fsdp"
    batch: int  # per process
    side: int  # Stage C: semantic latent side; Stage B: image side in px
    config: PriorConfig | DiffNeXtConfig = field(repr=False)

    @property
    def name(self) -> str:
        return f"C {self.side}x{self.side}" if self.stage == "C" else f"B {self.side}px"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample input shapes: x0 (what is denoised) and the conditioning."""
        if self.stage == "C":
            c = self.config
            return {"x0": (c.latent_channels, self.side, self.side), "text": (TEXT_TOKENS, c.text_channels)}
        c, latent = self.config, self.side // STAGE_A_DOWNSAMPLING
        semantic = math.ceil(self.side / COMPRESSION)  # the released pipeline's rounding (latent_rounding: ceil)
        shapes = {"x0": (c.latent_channels, latent, latent), "semantic": (c.semantic_channels, semantic, semantic)}
        if c.text_channels:
            shapes["text"] = (TEXT_TOKENS, c.text_channels)
        return shapes

    def build(self) -> nn.Module:
        return Prior(self.config) if self.stage == "C" else DiffNeXt(self.config)

    def inputs(self, device, batch: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = batch or self.batch
        tensors = {k: torch.randn((batch, *s), device=device) for k, s in self.shapes().items()}
        return tensors.pop("x0"), tensors


def prior_config(args) -> PriorConfig:
    return PriorConfig(width=args.width, depth=args.depth, heads=args.heads, text_channels=args.text_c, dropout=0.1)


def decoder_config(args) -> DiffNeXtConfig:
    released = DiffNeXtConfig.released_v2()
    return DiffNeXtConfig(
        widths=list(args.b_widths), blocks=list(args.b_blocks), heads=list(args.b_heads),
        semantic_proj_channels=args.b_proj, semantic_mappers=released.semantic_mappers,
        semantic_align_corners=released.semantic_align_corners, text_channels=args.text_b, dropout=released.dropout,
    )  # fmt: skip


# --- processes -------------------------------------------------------------------------------------------------------
@dataclass
class Env:
    device: torch.device
    rank: int
    world: int
    torchrun: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_processes(need_group: bool) -> Env:
    """Device and (when needed) the process group: nccl on GPUs, gloo on CPUs; a world of one without torchrun."""
    torchrun = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1")) if torchrun else 1
    rank = int(os.environ.get("RANK", "0")) if torchrun else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if torchrun else 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if (need_group or world > 1) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if torchrun:
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # FSDP over a world of one process: an in-process store, no rendezvous
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Env(device, rank, world, torchrun)


def log(env: Env, message: str) -> None:
    if env.main:
        print(f"[gpu_throughput] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_max(env: Env, values: list[float]) -> list[float]:
    """Element-wise maximum over the ranks (step times, memory: the slowest / fullest rank counts)."""
    if env.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


# --- peaks -----------------------------------------------------------------------------------------------------------
def matmul_ceiling(device: torch.device, dtype: torch.dtype, sizes: list[int], repeats: int) -> tuple[float, int]:
    """The best FLOP/s of ``repeats`` square ``torch.mm`` of each size (after one untimed), and its size."""
    best, best_n = 0.0, 0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.mm(a, b)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            sync(device)
            rate = 2 * n**3 / (time.perf_counter() - start)
            if rate > best:
                best, best_n = rate, n
        del a, b, out
    return best, best_n


def tune_malloc() -> bool:
    """CPU: keep freed memory in the heap (glibc ``mallopt``: no mmap for large blocks, no trimming), so the
    activations and gradients every step allocates anew reuse pages instead of faulting in fresh zeroed ones (~160k
    page faults a step on the medium prior, ~10% of its time; what jemalloc/tcmalloc do in torch's CPU tuning guide).
    Process-wide; the network code is unchanged. False where it does not apply (not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1))


class MatmulProbe:
    """One square ``torch.mm`` of size ``n`` (best of two), FLOP/s: a quick reading of what the device gives now."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        self.device, self.n = device, n
        self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        self.out = torch.mm(self.a, self.b)

    def __call__(self) -> float:
        best = 0.0
        for _ in range(2):
            sync(self.device)
            start = time.perf_counter()
            torch.mm(self.a, self.b, out=self.out)
            sync(self.device)
            best = max(best, 2 * self.n**3 / (time.perf_counter() - start))
        return best


# --- FLOPs -----------------------------------------------------------------------------------------------------------
def training_loss_fn(
    network: nn.Module, diffusion: Diffusion, x0: torch.Tensor, cond: dict
) -> Callable[[], torch.Tensor]:
    """The loss of one training step, as ``DiffusionStage.diffusion_loss`` computes it."""
    return lambda: diffusion.loss(lambda x_t, t: network(x_t, t, **cond), x0)


def count_flops(
    build: Callable[[], nn.Module],
    make_inputs: Callable[[torch.device], tuple],
    diffusion: Diffusion,
    device: torch.device | str = "meta",
) -> int:
    """FLOPs of one training step (forward + backward of the diffusion loss), counted on a copy of the network on
    the meta device (what ``lightning.fabric.utilities.throughput.measure_flops`` does, with
    ``lit_wuerstchen.flops.flop_counter``)."""
    device = torch.device(device)
    with device:
        network = build()
    network.train()
    x0, cond = make_inputs(device)
    loss_fn = training_loss_fn(network, diffusion, x0, cond)
    with flop_counter() as counter:
        loss_fn().backward()
    return counter.get_total_flops()


# --- one case --------------------------------------------------------------------------------------------------------
def make_optimizer(parameters, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW as the stages configure it (lr 1e-4, weight decay 0.01), fused where this torch has it for the device."""
    parameters = list(parameters)
    for kind in ("fused", "foreach"):
        try:
            return torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01, **{kind: True}), kind
        except (RuntimeError, TypeError, ValueError):
            continue
    return torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01), "for-loop"


def prepare(case: Case, env: Env, args, param_dtype: torch.dtype | None) -> nn.Module:
    """The network on the device, checkpointed / sharded / wrapped / compiled as the case says."""
    from lit_wuerstchen.stages.base import compile_networks
    from lit_wuerstchen.strategies import blocks_of, shard_network

    torch.manual_seed(0)  # the same initial weights on every rank
    with env.device:
        network = case.build()
    network.train()
    if case.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(env.device.type, (env.world,))
        shard_network(
            network, mesh, param_dtype=param_dtype, reduce_dtype=torch.float32,
            activation_checkpointing=args.activation_checkpointing,
        )  # fmt: skip
        if args.compile:
            compile_networks([network], per_block=True)
        return network
    if args.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in blocks_of(network):
            checkpoint(block)
    if args.compile:
        compile_networks([network], per_block=False)  # as the stages do, before the DDP wrapper
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=device_ids)  # Lightning's DDPStrategy defaults
    return network


def run_case(case: Case, env: Env, args, flops: int, autocast, dtype: torch.dtype) -> dict:
    device = env.device
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    param_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else None
    started = time.perf_counter()
    network = prepare(case, env, args, param_dtype)
    parameters = [p for p in network.parameters() if p.requires_grad]
    optimizer, optimizer_kind = make_optimizer(parameters, device)
    diffusion = Diffusion(DiffusionConfig(t_sampler="official", target="eps", loss_weight="p2_official"))
    x0, cond = case.inputs(device)
    loss_fn = training_loss_fn(network, diffusion, x0, cond)

    def step() -> torch.Tensor:
        with autocast():
            loss = loss_fn()
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    what = "compiling and warming up" if args.compile else "warming up"
    log(env, f"{case.strategy} {case.name}: {what} ({args.warmup} steps, batch {case.batch} per process)")
    for i in range(args.warmup):
        step()
        if i == 0:
            sync(device)
            log(env, f"{case.strategy} {case.name}: first step done {time.perf_counter() - started:.1f} s after build")
    sync(device)
    log(env, f"{case.strategy} {case.name}: timing {args.steps} steps")
    # A short matmul probe before the first timed step and after each: the achieved FLOP/s of a step over the better
    # of its two neighbouring probes is robust to load that comes and goes (shared VMs, other jobs).
    probe = MatmulProbe(device, dtype, min(args.matmul_sizes))
    probes = [probe()]
    times = []
    cpu_time = time.process_time()  # all threads of this process: below threads x wall time, others took cores
    window = time.perf_counter()
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
        probes.append(probe())
    window = time.perf_counter() - window
    cpu_share = (time.process_time() - cpu_time) / (window * torch.get_num_threads())
    del probe
    final_loss = float(loss.detach().float())
    of_probe = statistics.median(flops / t / max(probes[i], probes[i + 1]) for i, t in enumerate(times))
    of_probe = -all_max(env, [-of_probe])[0]  # the worst rank's
    times = all_max(env, times)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if memory is not None:
        memory = all_max(env, [float(memory)])[0]
    step_s = statistics.median(times)
    row = {
        "stage": case.stage,
        "case": case.name,
        "strategy": case.strategy,
        "parameters": sum(p.numel() for p in network.parameters()),  # DTensor shards report the global size
        "batch_per_process": case.batch,
        "processes": env.world,
        "input_shapes": {k: list(v) for k, v in case.shapes().items()},
        "optimizer": f"AdamW ({optimizer_kind})",
        "step_s_median": step_s,
        "step_s_all": times,
        "window_s": window,
        "cpu_share": cpu_share,
        "probe_flops_per_s": probes,
        "of_adjacent_probe_median": of_probe,
        "samples_per_s": env.world * case.batch / step_s,
        "flops_per_step_per_process": flops,
        "achieved_flops_per_s": flops / step_s,
        "peak_memory_bytes": memory,
        "final_loss": final_loss,
    }
    if args.profile:
        row["profile"] = profile_step(step, env, args.profile_rows)
    return row


def profile_step(step: Callable[[], torch.Tensor], env: Env, rows: int) -> dict:
    """One more step under torch.profiler: the top ops by self time, and the GEMM / conv / attention shares."""
    from torch.profiler import ProfilerActivity, profile

    cuda = env.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync(env.device)
    from torch.autograd import DeviceType

    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # The ops (their kernels' time is attributed to them on a GPU), not the kernel events themselves: counted once.
    events = [e for e in prof.key_averages() if getattr(e, key) > 0 and e.device_type == DeviceType.CPU]
    total = sum(getattr(e, key) for e in events)
    share = {"gemm": 0.0, "conv": 0.0, "attention": 0.0}
    for e in events:
        name = e.key.lower()
        if e.key in GEMM_OPS:
            share["gemm"] += getattr(e, key)
        elif any(s in name for s in CONV_OPS):
            share["conv"] += getattr(e, key)
        elif any(s in name for s in ATTENTION_OPS):
            share["attention"] += getattr(e, key)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return {
        "time": "self device (GPU kernel) time" if cuda else "self CPU time",
        "total_ms": total / 1e3,
        "share": {k: v / total for k, v in share.items()} if total else share,
        "top": [{"op": e.key, "ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
                for e in top],
    }  # fmt: skip


# --- the recipe projection -------------------------------------------------------------------------------------------
def project_stage_c(rows: list[dict], args, peak: float | None) -> list[dict]:
    """GPU-hours of the paper's Stage C recipe at the measured per-GPU throughput, per strategy."""
    out = []
    phases = [RECIPE_12, (24, RECIPE_24_ITERATIONS, args.recipe_batch_24)]
    for strategy in args.strategy:
        by_side = {r["input_shapes"]["x0"][-1]: r for r in rows if r["stage"] == "C" and r["strategy"] == strategy}
        if 24 not in by_side:
            continue
        hours, notes = 0.0, []
        for side, iterations, batch in phases:
            row = by_side.get(side)
            if row is not None:
                per_gpu = row["samples_per_s"] / row["processes"]
            else:  # not measured: the 24x24 achieved FLOP/s applied to this side's FLOPs (an assumption)
                ref = by_side[24]
                flops_side = ref["flops_per_step_per_process"] / ref["batch_per_process"] * (side / 24) ** 2
                per_gpu = ref["achieved_flops_per_s"] / flops_side
                notes.append(f"{side}x{side} not measured: assumed the 24x24 FLOP/s at (side/24)^2 of its FLOPs")
            hours += iterations * batch / per_gpu / 3600
        entry = {
            "strategy": strategy,
            "gpu_hours": hours,
            "paper_a100_hours": PAPER_STAGE_C_A100_HOURS,
            "recipe": [{"side": s, "iterations": i, "batch": b} for s, i, b in phases],
            "notes": notes,
        }
        if peak:
            entry["a100_hours_at_same_mfu"] = hours * peak / A100_BF16
        out.append(entry)
    return out


# --- output ----------------------------------------------------------------------------------------------------------
def fmt_flops(value: float | None, unit: float) -> str:
    return "n/a" if value is None else f"{value / unit:,.1f}"


def print_table(rows: list[dict], meta: dict, cpu: bool) -> None:
    unit, unit_name = (1e9, "GFLOP") if cpu else (1e12, "TFLOP")
    peak, ceiling = meta["peak_flops"], meta["matmul_ceiling_flops"]
    per = "proc" if cpu else "GPU"
    head = (
        f"| case | strategy | params | batch/{per} | {per}s | step ms (median) | samples/s (all) "
        f"| {unit_name}/step/{per} | achieved {unit_name}/s/{per} | MFU | of matmul ceiling | of adjacent matmul "
        f"| peak mem/{per} GiB |"
    )
    print("\n" + head)
    print("|" + " --- |" * 13)
    for r in rows:
        mfu = f"{r['achieved_flops_per_s'] / peak:.1%}" if peak else "n/a"
        memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        print(
            f"| {r['case']} | {r['strategy']} | {r['parameters'] / 1e6:,.1f}M | {r['batch_per_process']} "
            f"| {r['processes']} | {1000 * r['step_s_median']:,.1f} | {r['samples_per_s']:,.2f} "
            f"| {fmt_flops(r['flops_per_step_per_process'], unit)} | {fmt_flops(r['achieved_flops_per_s'], unit)} "
            f"| {mfu} | {r['achieved_flops_per_s'] / ceiling:.1%} | {r['of_adjacent_probe_median']:.1%} | {memory} |"
        )
    print(
        f"\nmatmul ceiling measured here: {ceiling / unit:,.1f} {unit_name}/s per {'process' if cpu else 'GPU'} "
        f"({meta['matmul_ceiling_size']}^2 {meta['dtype']} torch.mm; the best of the measurements before each case "
        f"and after: {' / '.join(f'{c / unit:,.0f}' for c in meta['matmul_ceilings_measured'])}); peak for MFU: "
        f"{fmt_flops(peak, unit)} {unit_name}/s ({meta['peak_source']})"
    )
    load = ", ".join(f"{x:.2f}" for x in meta["load_average"])
    print(
        f"{meta['date']} | {meta['machine']} | {meta['threads']} threads | torch {meta['torch']} | load average "
        f"{load} | glibc malloc tuned: {meta['malloc_tuned']}"
    )
    for r in rows:
        if "profile" not in r:
            continue
        p = r["profile"]
        s = p["share"]
        print(
            f"\nprofile {r['strategy']} {r['case']} ({p['time']}, {p['total_ms']:.0f} ms): GEMM {s['gemm']:.0%}, "
            f"conv {s['conv']:.0%}, attention {s['attention']:.0%}, rest {1 - sum(s.values()):.0%}"
        )
        for op in p["top"]:
            print(f"  {op['op']:<48} {op['ms']:9.1f} ms {op['share']:6.1%} {op['calls']:6d} calls")


def print_projection(projection: list[dict], meta: dict) -> None:
    for p in projection:
        recipe = " + ".join(
            f"{r['iterations'] // 1000}k at {r['side']}x{r['side']} (batch {r['batch']})" for r in p["recipe"]
        )
        line = (
            f"\nStage C recipe ({recipe}), {p['strategy']}: {p['gpu_hours']:,.0f} GPU-hours on {meta['device_name']} "
            f"against the paper's {p['paper_a100_hours']:,} A100-hours"
        )
        if "a100_hours_at_same_mfu" in p:
            line += f" ({p['a100_hours_at_same_mfu']:,.0f} A100-hours at the same MFU, 312 TFLOP/s bf16)"
        print(line)
        for note in p["notes"]:
            print(f"  note: {note}")
    if projection:
        print("  assumption: the batch at 24x24 is not stated in our sources: --recipe-batch-24 (default 1536)")


# --- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=["C", "B"], default=["C", "B"])
    parser.add_argument("--strategy", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on a GPU, 5 on a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 GPU, 2 CPU)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: released on a GPU, medium on a CPU")
    parser.add_argument("--batch-size", type=int, help="per process, every case (overrides --batch-c / --batch-b)")
    parser.add_argument(
        "--batch-c",
        type=int,
        help="Stage C batch per process at the first of --sides-c (x (first/side)^2 at the others)",
    )
    parser.add_argument("--batch-b", type=int, help="Stage B batch per process")
    parser.add_argument("--width", type=int, help="Stage C width")
    parser.add_argument("--depth", type=int, help="Stage C depth (blocks)")
    parser.add_argument("--heads", type=int, help="Stage C heads (default: width / 64)")
    parser.add_argument("--text-c", type=int, help="Stage C text width")
    parser.add_argument("--sides-c", type=int, nargs="+", help="Stage C latent sides (released: 24 12)")
    parser.add_argument("--b-widths", type=int, nargs=4)
    parser.add_argument("--b-blocks", type=int, nargs=4)
    parser.add_argument("--b-heads", type=int, nargs=4)
    parser.add_argument("--b-proj", type=int, help="Stage B semantic projection channels")
    parser.add_argument("--text-b", type=int, help="Stage B text width")
    parser.add_argument("--b-image-size", dest="b_image", type=int, help="Stage B image side in px (released: 1024)")
    parser.add_argument("--precision", choices=["bf16-mixed", "fp32"], help="default: bf16-mixed on GPU, fp32 on CPU")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (the recipe: 1.0)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per GPU for MFU (default: from the GPU name)")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", help="default: 2048 3072 4096 CPU, 8192 16384 GPU")
    parser.add_argument("--recipe-batch-24", type=int, default=1536, help="Stage C recipe batch at 24x24 (assumed)")
    parser.add_argument("--profile", action="store_true", help="profile one more step per case")
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--no-malloc-tuning", action="store_true", help="CPU: leave glibc malloc as it is (see tune_malloc)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    args.preset = args.preset or ("released" if cuda else "medium")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.heads is None:  # the preset's heads at its width, else heads of 64 channels as released
        preset = PRESETS[args.preset]
        args.heads = preset["heads"] if args.width == preset["width"] else max(1, args.width // 64)
    if args.batch_size:
        args.batch_c = args.batch_b = args.batch_size
    args.precision = args.precision or ("bf16-mixed" if cuda else "fp32")
    args.steps = args.steps if args.steps is not None else (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.matmul_sizes = args.matmul_sizes or ([8192, 16384] if cuda else [2048, 3072, 4096])
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("error: --steps must be >= 1 and --warmup >= 0")
    if args.json is not None and args.json.exists() and not args.overwrite:
        raise SystemExit(f"error: {args.json} exists; pass --overwrite to replace it")
    return args


def build_cases(args) -> list[Case]:
    cases = []
    for strategy in args.strategy:
        for stage in args.stages:
            if stage == "C":
                config = prior_config(args)
                for side in args.sides_c:
                    # the same number of latent tokens per step at every side as --batch-c at the first side
                    batch = args.batch_size or max(1, round(args.batch_c * (args.sides_c[0] / side) ** 2))
                    cases.append(Case("C", strategy, batch, side, config))
            else:
                cases.append(Case("B", strategy, args.batch_b, args.b_image, decoder_config(args)))
    return cases


def main(argv: list[str] | None = None) -> dict:
    try:
        args = resolve(parse_args(argv))
        cases = build_cases(args)  # validates the configs (one-line errors) before any process group
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    env = setup_processes(need_group="fsdp" in args.strategy)
    cpu = env.device.type == "cpu"
    malloc_tuned = cpu and not args.no_malloc_tuning and tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    if cpu and dtype == torch.bfloat16:
        log(env, "note: bf16-mixed on a CPU: autocast to bf16 (the matmul ceiling is measured in bf16 too)")
    if env.device.type == "cuda" and not env.torchrun and torch.cuda.device_count() > 1:
        command = shlex.join(["torchrun", f"--nproc_per_node={torch.cuda.device_count()}", *sys.argv])
        log(env, f"{torch.cuda.device_count()} GPUs but no torchrun: measuring GPU 0 alone; for all of them:\n"
                 f"    {command}")  # fmt: skip

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(env.device.type, dtype=torch.bfloat16)

    device_name = torch.cuda.get_device_name(env.device) if not cpu else cpu_name()
    log(env, f"{device_name}, {env.world} process(es), {torch.get_num_threads()} CPU threads, {args.precision}, "
             f"preset {args.preset}; measuring the {dtype} matmul ceiling")  # fmt: skip
    ceilings = [matmul_ceiling(env.device, dtype, args.matmul_sizes, repeats=3 if cpu else 10)]
    ceiling = ceilings[0][0]
    peak, peak_source = device_peak_flops(env.device, dtype, args.peak_tflops)
    log(env, f"matmul ceiling {ceiling / 1e9:,.1f} GFLOP/s ({ceilings[0][1]}^2); counting FLOPs on the meta device")

    diffusion = Diffusion(DiffusionConfig(t_sampler="official", target="eps", loss_weight="p2_official"))
    flop_cache: dict[tuple, int] = {}
    rows = []
    for i, case in enumerate(cases):
        if i:  # the ceiling before every case: other jobs on the machine come and go
            ceilings.append(matmul_ceiling(env.device, dtype, args.matmul_sizes, repeats=3 if cpu else 10))
        row = None
        while row is None:
            key = (case.stage, case.side, case.batch)
            if key not in flop_cache:
                flop_cache[key] = count_flops(case.build, lambda d, c=case: c.inputs(d), diffusion)
            try:
                row = run_case(case, env, args, flop_cache[key], autocast, dtype)
            except torch.OutOfMemoryError:
                if env.world > 1 or case.batch == 1:  # ranks cannot agree on a retry: stop (torchrun ends the rest)
                    raise SystemExit(
                        f"error: {case.strategy} {case.name} ran out of GPU memory at batch {case.batch} per GPU: "
                        "pass a smaller --batch-c / --batch-b (or --activation-checkpointing, --strategy fsdp)"
                    ) from None
                log(env, f"{case.strategy} {case.name}: out of memory at batch {case.batch}; retrying at "
                         f"{case.batch // 2}")  # fmt: skip
                case = dataclasses.replace(case, batch=case.batch // 2)
            finally:
                gc.collect()
                if env.device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        log(env, f"{case.strategy} {case.name}: {1000 * row['step_s_median']:.1f} ms/step, "
                 f"{row['samples_per_s']:.2f} samples/s, loss {row['final_loss']:.4f}")  # fmt: skip

    # The ceiling once more after the cases. It is a peak: the best of all measurements (load from other jobs only
    # lowers it); over ranks, the slowest rank's.
    log(env, "measuring the matmul ceiling again")
    ceilings.append(matmul_ceiling(env.device, dtype, args.matmul_sizes, repeats=3 if cpu else 10))
    ceiling, ceiling_n = max(ceilings)
    ceiling = -all_max(env, [-ceiling])[0]
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": describe(),
        "device_name": device_name,
        "device_type": env.device.type,
        "processes": env.world,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": args.precision,
        "dtype": str(dtype).replace("torch.", ""),
        "preset": args.preset,
        "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
        "grad_clip": args.grad_clip,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_flops": peak,
        "peak_source": peak_source,
        "matmul_ceiling_flops": ceiling,
        "matmul_ceiling_size": ceiling_n,
        "matmul_ceilings_measured": [c for c, _ in ceilings],
        "malloc_tuned": malloc_tuned,
        "load_average": os.getloadavg(),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    released = args.preset == "released" and env.device.type == "cuda"
    projection = project_stage_c(rows, args, peak) if released else []
    results = {"meta": meta, "cases": rows, "stage_c_projection": projection}
    if env.main:
        print_table(rows, meta, cpu)
        if cpu:
            for r in rows:
                ratio = r["achieved_flops_per_s"] / ceiling
                aim = "; aim for Stage C: >= 60%" if r["stage"] == "C" else ""
                print(
                    f"{r['strategy']} {r['case']}: {r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {ratio:.1%} "
                    f"of the measured matmul ceiling, {r['of_adjacent_probe_median']:.1%} of the adjacent matmul "
                    f"probes (this process got {r['cpu_share']:.0%} of its {meta['threads']} threads' time{aim})"
                )
            if min(r["cpu_share"] for r in rows) < 0.95:
                print("note: under 95%: other jobs took cores during the timed steps; rerun on an idle machine")
        print_projection(projection, meta)
        if not released:
            print("(the Stage C GPU-hour projection is made for the released preset on a GPU only)")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print(f"results written to {args.json}")
    if dist.is_initialized() and not env.torchrun:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
