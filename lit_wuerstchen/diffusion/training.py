"""Training-side diffusion pieces: t samplers, prediction targets, noise conditions, loss weights and the loss.

Every piece is small and selected by name through a registry (``make_t_sampler``, ``make_target``,
``make_noise_cond``, ``make_loss_weight``); unknown names raise a ``ValueError`` listing the valid ones.
The Stable Cascade pieces (``gdf`` in its training code) are the "gdf" t sampler, the "cosine_t" noise condition
and the "adaptive" loss weight (:class:`AdaptiveLossWeight`, the only piece with state).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from .schedule import CosineSchedule, expand_like


def _lookup(registry: dict, name: str, kind: str):
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {sorted(registry)}")
    return registry[name]


# --------------------------------------------------------------------------------------------------
# t samplers: (batch, generator=None, device=None) -> float32 tensor [batch]
# --------------------------------------------------------------------------------------------------
TSampler = Callable[..., Tensor]


def _rand(batch: int, generator: torch.Generator | None, device) -> Tensor:
    if generator is not None and device is None:
        device = generator.device
    return torch.rand(batch, generator=generator, device=device, dtype=torch.float32)


def sample_t_official(
    batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Official Würstchen t: ``(1 - U)·1.08 + 0.001`` clamped to [0.001, 1] (≈7.5% mass at t=1)."""
    u = _rand(batch, generator, device)
    return ((1 - u) * 1.08 + 0.001).clamp(0.001, 1.0)


def sample_t_uniform(
    batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Uniform t in [0, 1) (diffusers' training example)."""
    return _rand(batch, generator, device)


def sample_t_gdf(
    batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Stable Cascade (``gdf.CosineSchedule`` drawing its own t): ``(1 - U) + 0.001`` clamped to [0.001, 1]
    (≈0.1% mass at t=1; no 1.08 stretch as in Würstchen)."""
    u = _rand(batch, generator, device)
    return ((1 - u) + 0.001).clamp(0.001, 1.0)


T_SAMPLERS: dict[str, TSampler] = {
    "official": sample_t_official,
    "uniform": sample_t_uniform,
    "gdf": sample_t_gdf,
}


def make_t_sampler(name: str) -> TSampler:
    return _lookup(T_SAMPLERS, name, "t sampler")


# --------------------------------------------------------------------------------------------------
# Training noise: "gaussian" (eps ~ N(0, I)) or Stable Cascade Stage B's "pyramid"
# --------------------------------------------------------------------------------------------------
def pyramid_noise(
    eps: Tensor,
    generator: torch.Generator | None = None,
    size_range: Sequence[int] | None = (1, 16),
    levels: int = 10,
) -> Tensor:
    """Stable Cascade Stage B's pyramid noise (``train_b.py`` ``_pyramid_noise``): to the Gaussian ``eps`` [B, C, H, W]
    add, for level i = 1..levels-1, Gaussian noise on a grid of side ``H // 2**i`` upsampled (nearest) to H×W and
    scaled by ``0.75**i`` — only levels whose side lies in ``size_range`` — and stop after the level whose side is
    <= 1; then divide by ``sqrt(sum of squared scales, 1 included)`` so every element stays unit-variance.  Low
    frequencies get extra energy.  As in the official code both grid sides come from the height (square grids).
    The offsets are drawn from ``generator`` level by level after ``eps``; returns float32 (eps is not modified)."""
    if eps.ndim != 4:
        raise ValueError(f"pyramid noise needs [B, C, H, W], got shape {list(eps.shape)}")
    out = eps.float()
    scales = [1.0]
    batch, channels, height = eps.shape[0], eps.shape[1], eps.shape[-2]
    for i in range(1, levels):
        m = 0.75**i
        side = height // (2**i)  # the official code takes the width from the height too
        if size_range is None or size_range[0] <= side <= size_range[1]:
            offset = torch.randn(batch, channels, side, side, generator=generator, device=eps.device)
            out = out + nn.functional.interpolate(offset, size=eps.shape[-2:], mode="nearest") * m
            scales.append(m)
        if side <= 1:
            break
    return out / sum(m**2 for m in scales) ** 0.5


NOISES: dict[str, Callable[..., Tensor] | None] = {"gaussian": None, "pyramid": pyramid_noise}


def make_noise(name: str) -> Callable[..., Tensor] | None:
    """None for plain Gaussian noise, else ``fn(eps, generator=...)`` reshaping the Gaussian draw."""
    return _lookup(NOISES, name, "training noise")


# --------------------------------------------------------------------------------------------------
# Prediction targets
# --------------------------------------------------------------------------------------------------
def x0_from_eps(eps: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor:
    """x0 = (x_t - sqrt(1-abar)·eps) / sqrt(abar) (float32)."""
    a, b = schedule.coefficients(t.to(x_t.device))
    return (x_t.float() - expand_like(b, x_t) * eps.float()) / expand_like(a, x_t)


def eps_from_x0(x0: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor:
    """eps = (x_t - sqrt(abar)·x0) / sqrt(1-abar) (float32)."""
    a, b = schedule.coefficients(t.to(x_t.device))
    return (x_t.float() - expand_like(a, x_t) * x0.float()) / expand_like(b, x_t)


class Target(Protocol):
    name: str

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor: ...

    def to_eps(self, prediction: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor: ...

    def to_x0(self, prediction: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor: ...


class EpsTarget:
    """The network predicts the noise eps (Würstchen default)."""

    name = "eps"

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor:
        return noise

    def to_eps(self, prediction: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor:
        return prediction.float()

    def to_x0(self, prediction: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor:
        return x0_from_eps(prediction, x_t, t, schedule)


class VTarget:
    """v-prediction: ``v = sqrt(abar)·eps - sqrt(1-abar)·x0``."""

    name = "v"

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor:
        a, b = schedule.coefficients(t.to(x0.device))
        v = expand_like(a, x0) * noise.float() - expand_like(b, x0) * x0.float()
        return v.to(x0.dtype)

    def to_eps(self, prediction: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor:
        a, b = schedule.coefficients(t.to(x_t.device))
        return expand_like(a, x_t) * prediction.float() + expand_like(b, x_t) * x_t.float()

    def to_x0(self, prediction: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule) -> Tensor:
        a, b = schedule.coefficients(t.to(x_t.device))
        return expand_like(a, x_t) * x_t.float() - expand_like(b, x_t) * prediction.float()


TARGETS: dict[str, type] = {"eps": EpsTarget, "v": VTarget}


def make_target(name: str | Target) -> Target:
    """Target object by name ("eps", "v"); a target object is passed through."""
    if not isinstance(name, str) and hasattr(name, "to_eps"):
        return name
    return _lookup(TARGETS, name, "target")()


def eps_from_prediction(
    prediction: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule, target: str | Target = "eps"
) -> Tensor:
    """Convert a network prediction of kind ``target`` to eps (float32)."""
    return make_target(target).to_eps(prediction, x_t, t, schedule)


def x0_from_prediction(
    prediction: Tensor, x_t: Tensor, t: Tensor, schedule: CosineSchedule, target: str | Target = "eps"
) -> Tensor:
    """Convert a network prediction of kind ``target`` to x0 (float32)."""
    return make_target(target).to_x0(prediction, x_t, t, schedule)


# --------------------------------------------------------------------------------------------------
# Noise conditions: what the network is given for the noise level, (t [B], schedule) -> [B]
# --------------------------------------------------------------------------------------------------
NoiseCond = Callable[[Tensor, CosineSchedule], Tensor]


def t_noise_cond(t: Tensor, schedule: CosineSchedule) -> Tensor:
    """The sampled t itself (Würstchen v2: the network's ``r`` is t); returned unchanged, the same tensor."""
    return t


def cosine_t_from_logsnr(logsnr: Tensor, s: float = 0.008) -> Tensor:
    """Stable Cascade's ``CosineTNoiseCond``: the t at which the *unshifted, unclamped* cosine schedule has this
    logSNR, ``r = acos(sqrt(sigmoid(logSNR)·c0)) / (π/2) · (1 + s) - s`` with ``c0 = cos²(s/(1+s)·π/2)``, clamped
    to [0, 1] (float32).  Under a logSNR shift the network thus sees the noise level, not the step index."""
    s32 = torch.tensor(s, dtype=torch.float32)
    min_var = float(torch.cos(s32 / (1 + s32) * math.pi * 0.5) ** 2)
    var = torch.sigmoid(logsnr.float()).clamp(0, 1)
    r = torch.acos((var * min_var).sqrt()) / (math.pi * 0.5) * (1 + float(s32)) - float(s32)
    return r.clamp(0, 1)


def cosine_t_noise_cond(t: Tensor, schedule: CosineSchedule) -> Tensor:
    """``cosine_t_from_logsnr`` of the schedule's (clamped, shifted) logSNR at t: equal to t inside the clamp range
    without a shift; pinned at the clamp ends (≈0.0026 and ≈0.995); the unshifted-equivalent t under a shift."""
    return cosine_t_from_logsnr(schedule.logsnr(t), s=schedule.s)


NOISE_CONDS: dict[str, NoiseCond] = {"t": t_noise_cond, "cosine_t": cosine_t_noise_cond}


def make_noise_cond(name: str) -> NoiseCond:
    return _lookup(NOISE_CONDS, name, "noise condition")


# --------------------------------------------------------------------------------------------------
# Loss weights: (t [B], schedule) -> float32 [B]
# --------------------------------------------------------------------------------------------------
LossWeight = Callable[[Tensor, CosineSchedule], Tensor]


def no_weight(t: Tensor, schedule: CosineSchedule) -> Tensor:
    return torch.ones_like(torch.as_tensor(t), dtype=torch.float32)


def p2_official_weight(t: Tensor, schedule: CosineSchedule) -> Tensor:
    """Official Würstchen code: ``1 / (1 + SNR) = 1 - abar``."""
    return 1 - schedule.alpha_bar(t)


def p2_paper_weight(t: Tensor, schedule: CosineSchedule) -> Tensor:
    """Würstchen paper: ``(1 - abar) / (1 + abar)``."""
    abar = schedule.alpha_bar(t)
    return (1 - abar) / (1 + abar)


class AdaptiveLossWeight(nn.Module):
    """Stable Cascade's adaptive loss weight (``gdf.AdaptiveLossWeight``, used by its Stage C and B fine-tuning).

    logSNR is cut into ``buckets`` bins by ``buckets - 1`` evenly spaced edges over ``logsnr_range``
    (``bucket_ranges``; bin ``i`` = ``searchsorted(edges, logSNR)``, the two outer bins are open-ended).  Each bin
    keeps a running estimate of the unweighted per-sample loss, ``bucket_losses`` (starting at 1), and a sample's
    weight is ``clamp(1 / bucket_losses[bin], *weight_range)``: every noise level contributes about equally.
    After a training step :meth:`update` moves each hit bin by an EMA,
    ``L[bin] <- beta·L[bin] + (1 - beta)·loss``, with all right-hand sides read before any write; when several
    samples of a batch fall in one bin the last one's update is kept (what the official CPU index assignment
    does), here made deterministic.

    State: ``bucket_ranges`` and ``bucket_losses`` are registered buffers, so :meth:`state_dict` /
    :meth:`load_state_dict` save and restore them (the official trainer saves the same two lists in its info
    file).  :class:`~lit_wuerstchen.diffusion.Diffusion` is not an ``nn.Module``: a stage that trains with this
    weight must keep its state in the checkpoint itself, either by registering ``diffusion.loss_weight`` as a
    submodule (then it is in the stage's ``state_dict`` and moves with ``.to(device)``) or by saving
    ``diffusion.state_dict()`` in ``on_save_checkpoint`` and restoring it in ``on_load_checkpoint``.  Each
    data-parallel rank updates its own copy from its own losses (as officially); rank 0's copy is what gets saved.
    The buffers live on whatever device the module is on; inputs are moved to it and weights moved back.
    """

    stateful = True

    def __init__(
        self,
        logsnr_range: Sequence[float] = (-10.0, 10.0),
        buckets: int = 300,
        weight_range: Sequence[float] = (1e-7, 1e7),
        beta: float = 0.99,
    ) -> None:
        super().__init__()
        if buckets < 2:
            raise ValueError(f"buckets must be >= 2, got {buckets}")
        lo, hi = float(logsnr_range[0]), float(logsnr_range[1])
        self.register_buffer("bucket_ranges", torch.linspace(lo, hi, buckets - 1))
        self.register_buffer("bucket_losses", torch.ones(buckets))
        self.weight_range = (float(weight_range[0]), float(weight_range[1]))
        self.beta = float(beta)

    def extra_repr(self) -> str:
        return f"buckets={self.bucket_losses.numel()}, weight_range={self.weight_range}, beta={self.beta}"

    def bucket_index(self, logsnr: Tensor) -> Tensor:
        edges = self.bucket_ranges
        return torch.searchsorted(edges, logsnr.detach().to(edges.device, torch.float32).contiguous())

    def weight_from_logsnr(self, logsnr: Tensor) -> Tensor:
        w = (1 / self.bucket_losses[self.bucket_index(logsnr)]).clamp(*self.weight_range)
        return w.to(logsnr.device)

    def forward(self, t: Tensor, schedule: CosineSchedule) -> Tensor:
        return self.weight_from_logsnr(schedule.logsnr(t))

    @torch.no_grad()
    def update_from_logsnr(self, logsnr: Tensor, loss: Tensor) -> None:
        losses = self.bucket_losses
        idx = self.bucket_index(logsnr)
        new = losses[idx] * self.beta + loss.detach().to(losses.device, torch.float32) * (1 - self.beta)
        # The last sample of each hit bin wins, deterministically: the largest batch position per bin.
        last = torch.full_like(losses, -1, dtype=torch.long)
        last = last.scatter_reduce(0, idx, torch.arange(idx.numel(), device=idx.device), reduce="amax")
        hit = last >= 0
        losses[hit] = new[last[hit]]

    def update(self, t: Tensor, schedule: CosineSchedule, loss: Tensor) -> None:
        """EMA update of the bins hit by ``t`` with the *unweighted* per-sample losses ``loss`` [B]."""
        self.update_from_logsnr(schedule.logsnr(t), loss)


LOSS_WEIGHTS: dict[str, LossWeight | type] = {
    "none": no_weight,
    "p2_official": p2_official_weight,
    "p2_paper": p2_paper_weight,
    "adaptive": AdaptiveLossWeight,
}


def make_loss_weight(name: str, **kwargs) -> LossWeight:
    """The loss weight ``name``; a stateful one ("adaptive") is a new instance, built with ``kwargs``."""
    weight = _lookup(LOSS_WEIGHTS, name, "loss weight")
    if isinstance(weight, type):
        return weight(**kwargs)
    if kwargs:
        raise ValueError(f"loss weight {name!r} takes no options, got {sorted(kwargs)}")
    return weight


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """MSE per sample (mean over non-batch dims), float32 [B]."""
    err = (prediction.float() - target.float()) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


def diffusion_loss(prediction: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample MSE (mean over non-batch dims, float32), times ``weight`` [B], mean over the batch."""
    per_sample = per_sample_mse(prediction, target)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.device, torch.float32)
    return per_sample.mean()
