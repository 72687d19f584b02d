"""Config dataclasses that pick the diffusion pieces (used as typed YAML groups by the stages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .sampling import linear_t_list, make_sampler, stage_c_default_t_list
from .schedule import CosineSchedule
from .training import make_loss_weight, make_t_sampler, make_target


@dataclass
class DiffusionConfig:
    """The swappable diffusion pieces of DESIGN.md §3 (defaults: the official Würstchen choices)."""

    schedule_s: float = 0.008
    logsnr_shift: float = 1.0
    """Stable Cascade's logSNR shift (1: none; 2 for its Stage C)."""
    t_sampler: Literal["official", "uniform"] = "official"
    target: Literal["eps", "v"] = "eps"
    loss_weight: Literal["none", "p2_official", "p2_paper"] = "p2_official"

    def build(self):
        """(schedule, t sampler, target, loss weight)."""
        schedule = CosineSchedule(s=self.schedule_s, logsnr_shift=self.logsnr_shift)
        return schedule, make_t_sampler(self.t_sampler), make_target(self.target), make_loss_weight(self.loss_weight)


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

    def sample(self, cond_fn, uncond_fn, shape, schedule, target, generator=None, device=None, progress=None):
        """Run the sampler; ``uncond_fn`` is only evaluated when guidance_scale != 1."""
        t_list = self.resolved_t_list()
        return make_sampler(self.sampler)(
            cond_fn, shape, t_list, schedule, generator=generator, device=device,
            guidance_scale=self.guidance_scale, uncond_fn=uncond_fn if self.guidance_scale != 1.0 else None,
            progress=progress, target=target,
        )
