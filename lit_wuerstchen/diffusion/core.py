"""The diffusion process as one object: :class:`Diffusion` (schedule + target + t sampler + noise condition + loss
weight) built from a :class:`DiffusionConfig`, with ``loss`` for training and ``sample`` for inference;
:class:`SamplingConfig` says how a stage samples (sampler, steps or t list, guidance)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .sampling import ModelFn, ProgressFn, linear_t_list, make_sampler, stage_c_default_t_list
from .schedule import CosineSchedule
from .training import (
    diffusion_loss,
    make_loss_weight,
    make_noise,
    make_noise_cond,
    make_t_sampler,
    make_target,
    per_sample_mse,
)


@dataclass
class DiffusionConfig:
    """The swappable diffusion pieces of docs/design.md "Diffusion" (defaults: the official Würstchen v2 choices;
    :func:`cascade_stage_c_diffusion` / :func:`cascade_stage_b_diffusion` give Stable Cascade's)."""

    schedule_s: float = 0.008
    logsnr_shift: float = 1.0
    """Stable Cascade's logSNR shift (1: none; its released Stage C is sampled with 2, trained with 1)."""
    shift_mode: Literal["keep_ends", "gdf"] = "keep_ends"
    """How a shift meets the clamp range (see ``CosineSchedule``); "gdf" as Stable Cascade. No effect at shift 1."""
    t_sampler: Literal["official", "uniform", "gdf"] = "official"
    target: Literal["eps", "v"] = "eps"
    noise: Literal["gaussian", "pyramid"] = "gaussian"
    """Training noise: Gaussian, or Stable Cascade Stage B's pyramid noise (``pyramid_noise``; [B, C, H, W] only)."""
    noise_cond: Literal["t", "cosine_t"] = "t"
    """What the network gets as its noise level: t itself, or Stable Cascade's cosine-t of the logSNR."""
    loss_weight: Literal["none", "p2_official", "p2_paper", "adaptive"] = "p2_official"
    adaptive_buckets: int = 300
    """"adaptive" only: number of logSNR bins (official 300)."""
    adaptive_logsnr_range: list[float] = field(default_factory=lambda: [-10.0, 10.0])
    """"adaptive" only: logSNR span of the bin edges (official [-10, 10])."""
    adaptive_beta: float = 0.99
    """"adaptive" only: EMA factor of the per-bin loss (official 0.99)."""


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


# Stable Cascade's training settings (Stability-AI/StableCascade: train/train_c.py, train/train_b.py, gdf/,
# configs/training/finetune_{c,b}_*.yaml). Both stages build the same GDF:
#   CosineSchedule(clamp_range=[1e-4, 0.9999]) (s 0.008)     -> schedule_s 0.008 (our clamp range is the same)
#   diffuse(shift=1, loss_shift=1) in training               -> logsnr_shift 1 (Stage B's yaml sets `shift: 4`, but
#                                                               the released train_b.py never passes it on)
#   the schedule draws t itself: (1-U)+0.001 clamped          -> t_sampler "gdf"
#   VPScaler (x_t = sqrt(sigmoid(logSNR))·x0 + sqrt(sigmoid(-logSNR))·eps) -> our add_noise (same maths)
#   EpsilonTarget                                             -> target "eps"
#   CosineTNoiseCond() fed to the network                    -> noise_cond "cosine_t"
#   AdaptiveLossWeight() as the yamls set adaptive_loss_weight: True (P2LossWeight() = 1/(1+SNR) otherwise,
#   which is our "p2_official")                               -> loss_weight "adaptive" (300 bins, [-10, 10], 0.99)
#   Stage B only: eps = _pyramid_noise(randn, size_range=[1, 16]) is both the noise and the target -> noise "pyramid"
def cascade_stage_c_diffusion(adaptive: bool = True) -> DiffusionConfig:
    """Stable Cascade Stage C training diffusion (``adaptive=False``: its P2 fallback ``1/(1+SNR)``)."""
    return DiffusionConfig(
        schedule_s=0.008,
        logsnr_shift=1.0,
        shift_mode="gdf",
        t_sampler="gdf",
        target="eps",
        noise_cond="cosine_t",
        loss_weight="adaptive" if adaptive else "p2_official",
    )


def cascade_stage_b_diffusion(adaptive: bool = True) -> DiffusionConfig:
    """Stable Cascade Stage B training diffusion: the same GDF as Stage C (train_b.py builds it identically), with
    the pyramid noise train_b.py feeds it."""
    config = cascade_stage_c_diffusion(adaptive)
    config.noise = "pyramid"
    return config


class Diffusion:
    """Schedule, prediction target, training t sampler, noise condition and loss weight of one diffusion stage.

    State: only the "adaptive" loss weight has any (its per-bin running losses); :meth:`state_dict` /
    :meth:`load_state_dict` return / restore it (empty otherwise), and the stage must put it in its checkpoint.
    """

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config = config or DiffusionConfig()
        self.schedule = CosineSchedule(
            s=config.schedule_s, logsnr_shift=config.logsnr_shift, shift_mode=config.shift_mode
        )
        self.target = make_target(config.target)
        self.t_sampler = make_t_sampler(config.t_sampler)
        self.noise_cond = make_noise_cond(config.noise_cond)
        self.noise_fn = make_noise(config.noise)
        if config.loss_weight == "adaptive":
            self.loss_weight = make_loss_weight(
                "adaptive",
                logsnr_range=config.adaptive_logsnr_range,
                buckets=config.adaptive_buckets,
                beta=config.adaptive_beta,
            )
        else:
            self.loss_weight = make_loss_weight(config.loss_weight)

    def __repr__(self) -> str:
        return f"Diffusion({self.config})"

    @property
    def stateful_loss_weight(self) -> bool:
        return getattr(self.loss_weight, "stateful", False)

    def state_dict(self) -> dict:
        """The training state of the diffusion pieces: ``{"loss_weight": {...}}`` for "adaptive", else ``{}``."""
        return {"loss_weight": self.loss_weight.state_dict()} if self.stateful_loss_weight else {}

    def load_state_dict(self, state: dict) -> None:
        if self.stateful_loss_weight:
            if "loss_weight" not in state:
                raise KeyError("diffusion state has no 'loss_weight' entry for the adaptive loss weight")
            self.loss_weight.load_state_dict(state["loss_weight"])
        elif state:
            raise KeyError(f"diffusion {self.config.loss_weight!r} has no state, got {sorted(state)}")

    def network_fn(self, model_fn: ModelFn) -> ModelFn:
        """``model_fn`` as the samplers call it, ``(x_t, t)``, fed the configured noise condition instead of t."""
        if self.config.noise_cond == "t":
            return model_fn
        return lambda x_t, t: model_fn(x_t, self.noise_cond(t, self.schedule))

    def loss(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        generator: torch.Generator | None = None,
        update_loss_weight: bool | None = None,
    ) -> Tensor:
        """Weighted denoising loss of ``model_fn(x_t, cond)`` on clean samples ``x0`` [B, ...]: draws t, then the
        noise (from ``generator`` when given: a fixed validation loss), and compares the prediction with the target.
        ``cond`` is the noise condition of t (t itself by default).

        A stateful loss weight ("adaptive") is updated with the unweighted per-sample losses after the weights are
        taken, when ``update_loss_weight`` is True, or, when None, when autograd is on (a training step; validation
        runs under ``no_grad`` and leaves the state alone).
        """
        t = self.t_sampler(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.noise_fn is not None:  # the shaped noise is also the eps target, as in train_b.py
            noise = self.noise_fn(noise, generator=generator).to(x0.dtype)
        cond = self.noise_cond(t, self.schedule)
        prediction = model_fn(self.schedule.add_noise(x0, t, noise), cond)
        target = self.target.target(x0, noise, t, self.schedule)
        weight = self.loss_weight(t, self.schedule)
        if not self.stateful_loss_weight:
            return diffusion_loss(prediction, target, weight)
        per_sample = per_sample_mse(prediction, target)
        loss = (per_sample * weight.to(per_sample.device, torch.float32)).mean()
        if torch.is_grad_enabled() if update_loss_weight is None else update_loss_weight:
            self.loss_weight.update(t, self.schedule, per_sample.detach())
        return loss

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
            self.network_fn(model_fn),
            noise,
            sampling.resolved_t_list(),
            self.schedule,
            target=self.target,
            guidance_scale=sampling.guidance_scale,
            uncond_fn=self.network_fn(uncond_fn) if guided and uncond_fn is not None else None,
            generator=generator,
            progress=progress,
        )
