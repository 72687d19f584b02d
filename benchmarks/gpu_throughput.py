"""Training throughput of the released-scale Stage C prior and Stage B decoder: samples/s, TFLOP/s, MFU, memory.

Two modes (``--mode``), each case a table row; ``--mode both`` runs both, one after the other per case, and prints
the framework's overhead beside them:

* ``network`` (the default): one training step, as the framework trains (``DiffusionStage.diffusion_loss``):
  ``Diffusion.loss`` of the network on random *precomputed-style* inputs (no text encoder, no Stage A, no
  compressor: random latents and text hidden states of the training shapes, made once), backward, optional gradient
  clipping, the stages' AdamW (``OptimizerConfig.build``: fused on CUDA, torch's default on a CPU;
  ``--optimizer-fused`` sets ``optimizer.fused``) and ``zero_grad``.
* ``fit``: our own training loop: ``Trainer.fit`` of the stage LightningModule (``StageC`` / ``StageB``, built as a
  run builds them, the trained network the network mode's) for ``--warmup`` + ``--steps`` steps, with the callbacks
  of every run that work on every step (``EMA``, ``PerfMonitor``, ``LearningRateMonitor``), the stage's own
  finiteness check and clipping, and a DataLoader repeating one batch of *precomputed* inputs of the same shapes (a
  ``data precompute`` cache's entries: Stage C reads latents and text states; Stage B reads its Stage A latents and
  still runs its compressor, trained with it, and its frozen text encoder on every batch). Each step is timed as in
  the network mode (device synchronised), from the end of the previous step, so Lightning's work between steps
  counts. The frozen parts are random (the text encoders the released architectures on the released preset).
  One process, beside the ``ddp`` rows only; the FLOPs are the stage's ``training_flops`` (what PerfMonitor logs).
  The framework's overhead: 1 - (the same work outside the framework) / (the fit step), the same work being the
  network mode's step, plus for Stage B its compressor's training step timed alone (``--mode both``), and also with
  every step time in units of its adjacent matmul probes (load from other jobs cancels out).

On a GPU under ``torch.autocast(bfloat16)`` with fp32 weights (Lightning's ``bf16-mixed``); on a CPU in fp32.

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

Usage: python benchmarks/gpu_throughput.py [--mode network|fit|both] [--stages C B] [--strategy ddp fsdp]
       [--steps 20] [--warmup 5] [--batch-size N | --batch-c N --batch-b N] [--activation-checkpointing] [--compile]
       [--optimizer-fused true|false|null] [--preset released|medium|tiny] [--profile] [--json PATH [--overwrite]]
Results: docs/benchmarks.md "GPU throughput (benchmarks/gpu_throughput.py)".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import Logger
from machine import cpu_name, describe  # benchmarks/machine.py (scripts run from benchmarks/)
from torch import nn

from lit_wuerstchen.diffusion import Diffusion, DiffusionConfig
from lit_wuerstchen.flops import device_peak_flops, flop_counter
from lit_wuerstchen.models import (
    CompressorConfig,
    DiffNeXt,
    DiffNeXtConfig,
    Prior,
    PriorConfig,
    TextEncoderConfig,
    VQGANConfig,
)
from lit_wuerstchen.stages.base import OptimizerConfig

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
def optimizer_config(args) -> OptimizerConfig:
    """The stages' AdamW (lr 1e-4, weight decay 0.01; ``optimizer.fused`` from ``--optimizer-fused``) with
    ``--grad-clip``: both modes build their optimizer from it."""
    return OptimizerConfig(lr=1e-4, weight_decay=0.01, grad_clip=args.grad_clip, fused=args.optimizer_fused)


def make_optimizer(parameters, args) -> tuple[torch.optim.Optimizer, str]:
    """AdamW as the stages build it (``OptimizerConfig.build``: fused on CUDA by default), and which kernel it uses."""
    optimizer, _ = optimizer_config(args).build(parameters)
    return optimizer, optimizer_kind(optimizer)


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    defaults = optimizer.defaults
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "torch's default"


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
    optimizer, kind = make_optimizer(parameters, args)
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
        "mode": "network",
        "stage": case.stage,
        "case": case.name,
        "strategy": case.strategy,
        "parameters": sum(p.numel() for p in network.parameters()),  # DTensor shards report the global size
        "batch_per_process": case.batch,
        "processes": env.world,
        "input_shapes": {k: list(v) for k, v in case.shapes().items()},
        "optimizer": f"AdamW ({kind})",
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


# --- fit mode: the framework's own training loop ---------------------------------------------------------------------
class MetricsLogger(Logger):
    """What the callbacks log (PerfMonitor's perf/, train/loss), kept in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "gpu_throughput"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def values(self, name: str) -> list[float]:
        return [float(m[name]) for _, m in self.metrics if name in m]


class StepClock(L.Callback):
    """Each training step's wall time inside ``Trainer.fit``, measured as the network mode measures its steps: from
    the end of the previous step (after the matmul probe that follows it) to the end of this one, the device
    synchronised. The loop's own work between steps (the next batch and its copy to the device, Lightning's hooks,
    the EMA update, the finiteness check, logging) is inside. Listed last: the other callbacks' work of a step
    happens before its end is stamped."""

    def __init__(self, device: torch.device, warmup: int, probe: Callable[[], float]):
        self.device, self.warmup, self.probe = device, warmup, probe
        self.times: list[float] = []
        self.probes: list[float] = []
        self.resume: float | None = None
        self.window_start = self.cpu_start = 0.0
        self.window = self.cpu_time = 0.0
        self.last_loss: torch.Tensor | None = None
        self.peak_memory: int | None = None

    def _start_window(self) -> None:
        self.probes.append(self.probe())
        self.window_start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.resume is None:  # the first step is timed from its own start
            if self.warmup == 0:
                self._start_window()
            sync(self.device)
            self.resume = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        sync(self.device)
        end = time.perf_counter()
        self.times.append(end - self.resume)
        self.last_loss = outputs["loss"].detach() if isinstance(outputs, dict) else None
        done = len(self.times)
        if done == self.warmup:  # the probe before the first timed step
            self._start_window()
        elif done > self.warmup:
            self.probes.append(self.probe())
            self.window = time.perf_counter() - self.window_start
            self.cpu_time = time.process_time() - self.cpu_start
        self.resume = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.device.type == "cuda":  # since PerfMonitor's last reset (it logs the peaks before)
            self.peak_memory = torch.cuda.max_memory_allocated(self.device)


def text_tower(width: int, layers: int, workdir: Path) -> TextEncoderConfig:
    """A randomly initialised open_clip text tower of ``width`` with ``layers`` blocks and 77 tokens (a model config
    written to ``workdir``): the frozen text encoder of the medium and tiny presets."""
    name = f"gpu-throughput-text-{width}x{layers}"
    path = workdir / f"{name}.json"
    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}  # never built
    text = {"context_length": TEXT_TOKENS, "vocab_size": 49408, "width": width, "heads": max(1, width // 64),
            "layers": layers}  # fmt: skip
    path.write_text(json.dumps({"embed_dim": width, "vision_cfg": vision, "text_cfg": text}))
    return TextEncoderConfig(model_name=name, pretrained=None, model_config_file=str(path))


def save_stage_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """``module`` saved as a run saves it (Lightning's checkpoint with the stage's record), without training it."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.save_checkpoint(path, weights_only=True)
    module.trainer = None
    return path


FIT_FROZEN_VQGAN = VQGANConfig(channels=[16, 32], encoder_blocks=[1, 1], decoder_blocks=[1, 1], codebook_size=64)
TINY_COMPRESSOR = CompressorConfig(backbone="tiny", pretrained=False, tiny_widths=[8, 16])
RELEASED_COMPRESSOR = CompressorConfig(affine_norm=True, latent_rounding="ceil", pretrained=False)


def fit_stage(case: Case, args, workdir: Path) -> tuple[L.LightningModule, dict]:
    """The stage LightningModule of ``case`` (its trained network exactly the network mode's) and one batch of
    *precomputed* inputs of the network mode's shapes, as a ``data precompute`` cache gives them (float16 cache
    entries): no text encoder, Stage A or compressor runs for the inputs of the prior; Stage B reads its Stage A
    latents from the cache and still runs its compressor (trained with it) and its text encoder on every batch.

    The frozen parts are random: Stage A (f4) tiny; the text encoder the released architecture on the released
    preset (ViT-bigG-14 for C, only for the empty prompt of dropped captions; ViT-H-14 for B), else one block of the
    preset's width; the Stage B that Stage C holds for its validation samples tiny (a released one is ~2 GiB more in
    bf16)."""
    from lit_wuerstchen.stages import StageA, StageB, StageC

    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the helper Trainers' "GPU available" lines
    try:
        stage_a = workdir / "stage_a.ckpt"
        if not stage_a.exists():
            save_stage_checkpoint(StageA(vqgan=FIT_FROZEN_VQGAN), stage_a)
        released = args.preset == "released"
        diffusion = DiffusionConfig(t_sampler="official", target="eps", loss_weight="p2_official")
        optimizer = optimizer_config(args)
        batch_size = case.batch
        shapes = case.shapes()
        captions = [f"a photo of thing {i}" for i in range(batch_size)]
        batch = {"key": [f"{i:08d}" for i in range(batch_size)], "caption": captions}
        if case.stage == "C":
            stage_b = workdir / "stage_b_for_c.ckpt"
            if not stage_b.exists():
                tiny_decoder = DiffNeXtConfig(
                    widths=[16, 32], blocks=[1, 1], heads=[0, 2], semantic_levels=[0, 1], r_embedding_dim=16
                )
                tiny_b = StageB(stage_a_checkpoint=str(stage_a), compression=COMPRESSION, network=tiny_decoder,
                                compressor=TINY_COMPRESSOR)  # fmt: skip
                save_stage_checkpoint(tiny_b, stage_b)
            width = case.config.text_channels  # ViT-bigG-14 (random weights) at the released width
            text = TextEncoderConfig(pretrained=None) if released and width == 1280 else text_tower(width, 1, workdir)
            module = StageC(stage_b_checkpoint=str(stage_b), network=case.config, text_encoder=text,
                            diffusion=diffusion, optimizer=optimizer, compile=args.compile)  # fmt: skip
            batch["cache"] = {  # what Stage C reads of its cache entries
                "semantic": torch.randn(batch_size, *shapes["x0"]).half(),
                "text_hidden": torch.randn(batch_size, *shapes["text"]).half(),
            }
        else:
            config = case.config
            text = None
            if config.text_channels:
                released_text = released and config.text_channels == 1024
                text = (TextEncoderConfig(model_name="ViT-H-14", pretrained=None) if released_text
                        else text_tower(config.text_channels, 1, workdir))  # fmt: skip
            # the released EfficientNetV2-S (random weights); tiny: a small convnet
            compressor = TINY_COMPRESSOR if args.preset == "tiny" else RELEASED_COMPRESSOR
            compressor = dataclasses.replace(compressor, latent_channels=config.semantic_channels)
            module = StageB(stage_a_checkpoint=str(stage_a), compression=COMPRESSION, network=config,
                            compressor=compressor, diffusion=diffusion, optimizer=optimizer, text_encoder=text,
                            compile=args.compile)  # fmt: skip
            batch["image"] = torch.rand(batch_size, 3, case.side, case.side)
            batch["cache"] = {"latent": torch.randn(batch_size, *shapes["x0"]).half()}
    finally:
        quiet.setLevel(level)
    return module, batch


class RepeatedBatch(torch.utils.data.Dataset):
    """The same batch ``length`` times: a DataLoader with no work of its own (as one that keeps up)."""

    def __init__(self, batch: dict, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


def time_compressor(module: L.LightningModule, batch: dict, env: Env, args, autocast, dtype: torch.dtype) -> dict:
    """Stage B's fit step also trains its compressor, which the network mode leaves out: that part alone, timed as
    the network mode times its steps (forward + backward of a loss on the semantic latent, AdamW, ``zero_grad``;
    the matmul probes around each step), for the overhead's reference."""
    import copy

    device = env.device
    compressor = copy.deepcopy(module.compressor).to(device).train()
    optimizer, _ = make_optimizer(compressor.parameters(), args)
    images = batch["image"].to(device)

    def step() -> None:
        with autocast():
            loss = compressor(images).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    probe = MatmulProbe(device, dtype, min(args.matmul_sizes))
    probes, times = [probe()], []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        probes.append(probe())
    return {"step_s_median": statistics.median(times), "step_s_all": times, "probe_flops_per_s": probes}


def matmul_cost(row: dict) -> float:
    """Median over steps of the step's time x the better of its two adjacent matmul probes: the step in units of
    matmul work, so that load from other jobs (which slows steps and probes alike) cancels out of comparisons."""
    times, probes = row["step_s_all"], row["probe_flops_per_s"]
    return statistics.median(t * max(probes[i], probes[i + 1]) for i, t in enumerate(times))


def run_fit_case(case: Case, env: Env, args, dtype: torch.dtype, workdir: Path, autocast) -> dict:
    """``Trainer.fit`` of the stage module on ``case``'s inputs for ``--warmup`` + ``--steps`` steps, with the
    callbacks every run has that work on every step (EMA, PerfMonitor, LearningRateMonitor; the stage's finiteness
    check and clipping are its own), timed per step (:class:`StepClock`)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lit_wuerstchen.callbacks import EMA, PerfMonitor
    from lit_wuerstchen.callbacks.perf import training_flops

    device = env.device
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)  # the same weights in every run (timing does not depend on them)
    started = time.perf_counter()
    module, batch = fit_stage(case, args, workdir)
    if device.type == "cuda":  # pinned once, as a DataLoader's pin-memory thread hands batches over
        batch = {k: ({n: t.pin_memory() for n, t in v.items()} if isinstance(v, dict) else
                     v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}  # fmt: skip
    total = args.warmup + args.steps
    loader = torch.utils.data.DataLoader(RepeatedBatch(batch, total), batch_size=None, num_workers=0)
    compressor = None
    if case.stage == "B" and args.mode == "both":  # the reference of the overhead needs this part too
        compressor = time_compressor(module, batch, env, args, autocast, dtype)
    probe = MatmulProbe(device, dtype, min(args.matmul_sizes))
    clock = StepClock(device, args.warmup, probe)
    logger = MetricsLogger()
    monitor = PerfMonitor(peak_tflops=args.peak_tflops)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision="bf16-mixed" if args.precision == "bf16-mixed" else "32-true",
        max_steps=total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, args.steps)),  # 50: experiments/common/defaults.yaml
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EMA(decay=0.999), LearningRateMonitor(logging_interval="step"), monitor, clock],
    )
    log(env, f"fit {case.name}: building took {time.perf_counter() - started:.1f} s; {args.warmup} warm-up steps + "
             f"{args.steps} timed, batch {case.batch}")  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    del probe
    if len(clock.times) != total:
        raise RuntimeError(f"fit {case.name}: {len(clock.times)} steps ran, not {total}")
    times = clock.times[args.warmup :]
    flops = training_flops(module, batch)  # PerfMonitor's count (the stage's training_flops)
    of_probe = statistics.median(flops / t / max(clock.probes[i], clock.probes[i + 1]) for i, t in enumerate(times))
    memory = None
    if device.type == "cuda":  # PerfMonitor resets the peak at each log: the peaks it logged and the last one
        logged = [gib * 2**30 for gib in logger.values("perf/peak_memory_gb")]
        memory = max([float(clock.peak_memory or 0), *logged])
    step_s = statistics.median(times)
    network = module.denoiser()
    perf = {name.removeprefix("perf/"): values[-1] for name in ("perf/samples_per_sec", "perf/tflops_per_sec",
            "perf/mfu", "perf/peak_memory_gb") if (values := logger.values(name))}  # fmt: skip
    return {
        "mode": "fit",
        "stage": case.stage,
        "case": f"{case.name} fit",
        "strategy": case.strategy,
        "parameters": sum(p.numel() for p in network.parameters()),
        "trained_parameters": sum(p.numel() for p in module.trained_parameters()),
        "batch_per_process": case.batch,
        "processes": env.world,
        "input_shapes": {k: list(v) for k, v in case.shapes().items()},
        "optimizer": f"AdamW ({optimizer_kind(trainer.optimizers[0])})",
        "step_s_median": step_s,
        "step_s_all": times,
        "window_s": clock.window,
        "cpu_share": clock.cpu_time / (clock.window * torch.get_num_threads()) if clock.window else 1.0,
        "probe_flops_per_s": clock.probes,
        "of_adjacent_probe_median": of_probe,
        "samples_per_s": env.world * case.batch / step_s,
        "flops_per_step_per_process": flops,
        "achieved_flops_per_s": flops / step_s,
        "peak_memory_bytes": memory,
        "final_loss": float(clock.last_loss.float()) if clock.last_loss is not None else float("nan"),
        "perf_monitor": perf,  # what TensorBoard shows for the last logging interval
        "compressor_alone": compressor,
    }


def overhead_rows(rows: list[dict]) -> list[dict]:
    """Per case with both modes: the framework's overhead, 1 - (the same work's time outside the framework) / (the fit
    step's time). The same work: the network mode's step, plus for Stage B its compressor's training step timed alone
    (the fit trains it; the network mode does not). Also with each time in units of matmul work (:func:`matmul_cost`),
    which cancels load from other jobs."""
    out = []
    for fit in (r for r in rows if r["mode"] == "fit"):
        name = fit["case"].removesuffix(" fit")
        bare = next((r for r in rows if r["mode"] == "network" and r["case"] == name and r["strategy"] == "ddp"
                     and r["batch_per_process"] == fit["batch_per_process"]), None)  # fmt: skip
        if bare is None:
            continue
        reference_s, reference_cost = bare["step_s_median"], matmul_cost(bare)
        compressor = fit.get("compressor_alone")
        if compressor is not None:
            reference_s += compressor["step_s_median"]
            reference_cost += matmul_cost(compressor)
        out.append({
            "case": name,
            "samples_per_s_network": bare["samples_per_s"],
            "samples_per_s_fit": fit["samples_per_s"],
            "flops_per_step_network": bare["flops_per_step_per_process"],
            "flops_per_step_fit": fit["flops_per_step_per_process"],
            "step_s_network": bare["step_s_median"],
            "step_s_compressor_alone": None if compressor is None else compressor["step_s_median"],
            "step_s_fit": fit["step_s_median"],
            "framework_overhead": 1 - reference_s / fit["step_s_median"],
            "framework_overhead_matmul_units": 1 - reference_cost / matmul_cost(fit),
        })  # fmt: skip
    return out


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


def print_overhead(overhead: list[dict], rows: list[dict], meta: dict, cpu: bool) -> None:
    """The fit rows beside the network rows: the framework's overhead, and what PerfMonitor logged in the fit."""
    fits = [r for r in rows if r["mode"] == "fit"]
    if not fits:
        return
    unit, unit_name = (1e9, "GFLOP") if cpu else (1e12, "TFLOP")
    if overhead:
        print(f"\n| case | network step ms | + compressor alone ms | fit step ms | network {unit_name}/step "
              f"| fit {unit_name}/step | framework overhead | in matmul units |")  # fmt: skip
        print("|" + " --- |" * 8)
        for o in overhead:
            compressor = o["step_s_compressor_alone"]
            print(
                f"| {o['case']} | {1000 * o['step_s_network']:,.1f} "
                f"| {'-' if compressor is None else f'{1000 * compressor:,.1f}'} | {1000 * o['step_s_fit']:,.1f} "
                f"| {fmt_flops(o['flops_per_step_network'], unit)} | {fmt_flops(o['flops_per_step_fit'], unit)} "
                f"| {o['framework_overhead']:.1%} | {o['framework_overhead_matmul_units']:.1%} |"
            )
        print(
            "framework overhead = 1 - (network step [+ Stage B's compressor step alone]) / fit step; in matmul units: "
            "each step's time x its adjacent matmul probe (load from other jobs cancels)"
        )
    for r in fits:
        perf = r["perf_monitor"]
        if perf:
            shown = ", ".join(f"{k} {v:,.4g}" for k, v in perf.items())
            print(f"{r['case']}: PerfMonitor logged (last interval) {shown}; optimizer {r['optimizer']}")


# --- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mode",
        choices=["network", "fit", "both"],
        default="network",
        help="network: the bare training step; fit: Trainer.fit of the stage module (EMA, finiteness check, "
        "PerfMonitor; one process, --strategy ddp only); both: both rows and the framework's overhead",
    )
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
    parser.add_argument(
        "--optimizer-fused",
        type=lambda v: {"true": True, "false": False, "null": None}[v.lower()],
        default=None,
        metavar="{true,false,null}",
        help="optimizer.fused of both modes (null: the stages' default, fused on CUDA only)",
    )
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
    if args.mode != "network":
        if args.activation_checkpointing or args.profile:
            raise SystemExit("error: --mode fit/both: no --activation-checkpointing or --profile (network mode only)")
        if "ddp" not in args.strategy:
            raise SystemExit("error: --mode fit/both runs on one device: include --strategy ddp")
        if args.mode == "fit":  # fit rows exist for the single-device case only
            args.strategy = ["ddp"]
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
    if args.mode != "network" and env.world > 1:
        raise SystemExit("error: --mode fit/both runs in one process (Lightning's single-device strategy): no torchrun")
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
    modes = {"network": ["network"], "fit": ["fit"], "both": ["network", "fit"]}[args.mode]
    workdir = tempfile.TemporaryDirectory(prefix="gpu_throughput_") if "fit" in modes else None
    for i, case in enumerate(cases):
        if i:  # the ceiling before every case: other jobs on the machine come and go
            ceilings.append(matmul_ceiling(env.device, dtype, args.matmul_sizes, repeats=3 if cpu else 10))
        # fit runs on one device with Lightning's single-device strategy: beside the ddp rows only
        for mode in modes if case.strategy == "ddp" else ["network"]:
            row = None
            while row is None:
                try:
                    if mode == "fit":
                        row = run_fit_case(case, env, args, dtype, Path(workdir.name), autocast)
                    else:
                        key = (case.stage, case.side, case.batch)
                        if key not in flop_cache:
                            flop_cache[key] = count_flops(case.build, lambda d, c=case: c.inputs(d), diffusion)
                        row = run_case(case, env, args, flop_cache[key], autocast, dtype)
                except torch.OutOfMemoryError:
                    if env.world > 1 or case.batch == 1:  # ranks cannot agree on a retry: stop (torchrun ends the rest)
                        raise SystemExit(
                            f"error: {case.strategy} {case.name} ran out of GPU memory at batch {case.batch} per "
                            "GPU: pass a smaller --batch-c / --batch-b (or --activation-checkpointing, --strategy fsdp)"
                        ) from None
                    log(env, f"{case.strategy} {case.name} ({mode}): out of memory at batch {case.batch}; retrying "
                             f"at {case.batch // 2}")  # fmt: skip
                    case = dataclasses.replace(case, batch=case.batch // 2)  # both modes then run at this batch
                finally:
                    gc.collect()
                    if env.device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            log(env, f"{case.strategy} {row['case']}: {1000 * row['step_s_median']:.1f} ms/step, "
                     f"{row['samples_per_s']:.2f} samples/s, loss {row['final_loss']:.4f}")  # fmt: skip
    if workdir is not None:
        workdir.cleanup()

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
        "mode": args.mode,
        "optimizer_fused": args.optimizer_fused,
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
    network_rows = [r for r in rows if r["mode"] == "network"]
    projection = project_stage_c(network_rows, args, peak) if released and network_rows else []
    overhead = overhead_rows(rows)
    results = {"meta": meta, "cases": rows, "framework_overhead": overhead, "stage_c_projection": projection}
    if env.main:
        print_table(rows, meta, cpu)
        print_overhead(overhead, rows, meta, cpu)
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
