"""Training-side diffusion pieces: t samplers, prediction targets, loss weights and the loss.

Every piece is small and selected by name through a registry (``make_t_sampler``, ``make_target``,
``make_loss_weight``); unknown names raise a ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

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


T_SAMPLERS: dict[str, TSampler] = {"official": sample_t_official, "uniform": sample_t_uniform}


def make_t_sampler(name: str) -> TSampler:
    return _lookup(T_SAMPLERS, name, "t sampler")


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


LOSS_WEIGHTS: dict[str, LossWeight] = {
    "none": no_weight,
    "p2_official": p2_official_weight,
    "p2_paper": p2_paper_weight,
}


def make_loss_weight(name: str) -> LossWeight:
    return _lookup(LOSS_WEIGHTS, name, "loss weight")


def diffusion_loss(prediction: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample MSE (mean over non-batch dims, float32), times ``weight`` [B], mean over the batch."""
    err = (prediction.float() - target.float()) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.device, torch.float32)
    return per_sample.mean()
