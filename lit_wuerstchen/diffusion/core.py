"""The diffusion process as one object: :class:`Diffusion` (schedule + target + t sampler + loss weight) built from
a :class:`DiffusionConfig`, with ``loss`` for training and ``sample`` for inference; :class:`SamplingConfig` says how
a stage samples (sampler, steps or t list, guidance)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .sampling import ModelFn, ProgressFn, linear_t_list, make_sampler, stage_c_default_t_list
from .schedule import CosineSchedule
from .training import diffusion_loss, make_loss_weight, make_t_sampler, make_target


@dataclass
class DiffusionConfig:
    """The swappable diffusion pieces of docs/design.md "Diffusion" (defaults: the official Würstchen choices)."""

    schedule_s: float = 0.008
    logsnr_shift: float = 1.0
    """Stable Cascade's logSNR shift (1: none; 2 for its Stage C)."""
    t_sampler: Literal["official", "uniform"] = "official"
    target: Literal["eps", "v"] = "eps"
    loss_weight: Literal["none", "p2_official", "p2_paper"] = "p2_official"


@dataclass
class SamplingConfig:
    """How a stage samples: sampler, number of model evaluations, classifier-free guidance scale."""

    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: int = 12
    guidance_scale: float = 1.0
    """1: conditional prediction only (no unconditional pass)."""
    t_list: list[float] | Literal["stage_c_default"] | None = None
    """Explicit descending t values (N+1 values = N evaluations), or "stage_c_default" (29 evaluations);
    overrides ``steps``."""

    def resolved_t_list(self) -> list[float]:
        if self.t_list == "stage_c_default":
            return stage_c_default_t_list()
        return list(self.t_list) if self.t_list is not None else linear_t_list(self.steps)

    def used(self) -> dict:
        """What sampling with this config really does (for manifests): ``steps`` is ignored when a t list is given,
        so the record gives the evaluations and the t list instead."""
        t_list = self.resolved_t_list()
        return {"sampler": self.sampler, "guidance_scale": self.guidance_scale, "evaluations": len(t_list) - 1,
                "t_list": t_list}  # fmt: skip


# The sampling defaults of the two diffusion stages (validation, `sample`, the exported pipeline), written once.
def prior_sampling() -> SamplingConfig:
    """Stage C: the official 29-step t list with guidance 4."""
    return SamplingConfig(t_list="stage_c_default", guidance_scale=4.0)


def decoder_sampling() -> SamplingConfig:
    """Stage B: 12 steps, no guidance (Würstchen v2)."""
    return SamplingConfig(steps=12)


class Diffusion:
    """Schedule, prediction target, training t sampler and loss weight of one diffusion stage."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config = config or DiffusionConfig()
        self.schedule = CosineSchedule(s=config.schedule_s, logsnr_shift=config.logsnr_shift)
        self.target = make_target(config.target)
        self.t_sampler = make_t_sampler(config.t_sampler)
        self.loss_weight = make_loss_weight(config.loss_weight)

    def __repr__(self) -> str:
        return f"Diffusion({self.config})"

    def loss(self, model_fn: ModelFn, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Weighted denoising loss of ``model_fn(x_t, t)`` on clean samples ``x0`` [B, ...]: draws t, then the
        noise (from ``generator`` when given: a fixed validation loss), and compares the prediction with the target.
        """
        t = self.t_sampler(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        prediction = model_fn(self.schedule.add_noise(x0, t, noise), t)
        target = self.target.target(x0, noise, t, self.schedule)
        return diffusion_loss(prediction, target, self.loss_weight(t, self.schedule))

    def sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        sampling: SamplingConfig,
        uncond_fn: ModelFn | None = None,
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
    ) -> Tensor:
        """Denoise ``noise`` (the start sample at t = 1) with ``sampling``'s sampler, t list and guidance;
        ``uncond_fn`` is only evaluated when the guidance scale is not 1."""
        guided = sampling.guidance_scale != 1.0
        sampler: Callable[..., Tensor] = make_sampler(sampling.sampler)
        return sampler(
            model_fn,
            noise,
            sampling.resolved_t_list(),
            self.schedule,
            target=self.target,
            guidance_scale=sampling.guidance_scale,
            uncond_fn=uncond_fn if guided else None,
            generator=generator,
            progress=progress,
        )
