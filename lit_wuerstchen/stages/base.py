"""What every stage's LightningModule shares: optimiser settings, the EMA contract, data-health logging."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import lightning as L
import torch
from torch import nn

from ..diffusion import (
    CosineSchedule,
    linear_t_list,
    make_loss_weight,
    make_sampler,
    make_t_sampler,
    make_target,
)


@dataclass
class OptimizerConfig:
    """AdamW with a linear warm-up, then a constant or cosine learning rate.

    Paper recipes: lr 1e-4, constant, 10k warm-up steps for Stages B and C. Short runs (toy scale) profit
    from the cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    """Gradient-norm clipping (None disables)."""

    def lr_factor(self, step: int, total_steps: int | None) -> float:
        warmup = max(self.warmup_steps, 0)
        if step < warmup:
            return (step + 1) / warmup
        if self.decay == "constant" or not total_steps or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def build(
        self, parameters, lr: float | None = None, total_steps: int | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW and its per-step scheduler; ``total_steps`` (trainer.max_steps) is needed for cosine decay."""
        if self.decay == "cosine" and (total_steps is None or total_steps <= 0):
            raise ValueError("optimizer.decay: cosine needs trainer.max_steps to be set")
        optimizer = torch.optim.AdamW(parameters, lr=lr or self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total_steps))
        return optimizer, scheduler


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
    t_list: list[float] | None = None
    """Explicit descending t values (N+1 values = N evaluations); overrides ``steps``."""

    def sample(self, cond_fn, uncond_fn, shape, schedule, target, generator=None, device=None, progress=None):
        t_list = self.t_list if self.t_list is not None else linear_t_list(self.steps)
        return make_sampler(self.sampler)(
            cond_fn, shape, t_list, schedule, generator=generator, device=device,
            guidance_scale=self.guidance_scale, uncond_fn=uncond_fn if self.guidance_scale != 1.0 else None,
            progress=progress, target=target,
        )


def as_dataclass(cls, value):
    """Accept a config dataclass or its dict form (how checkpoints store hyper-parameters)."""
    return cls(**value) if isinstance(value, dict) else value


class Stage(L.LightningModule):
    """Base of the stage LightningModules.

    Subclasses implement ``ema_network`` (the one trained network the EMA callback averages: never frozen
    encoders or metric networks) and ``log_images`` (named image grids in [0, 1] for the image logger).
    """

    def store_plain_hparams(self, **configs) -> None:
        """Keep config dataclasses as plain dicts in ``hparams``: checkpoints then load with ``weights_only``."""
        self.hparams.update({name: asdict(config) for name, config in configs.items()})

    def ema_network(self) -> nn.Module:
        raise NotImplementedError

    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        return {}

    def log_data_errors(self, split: str) -> None:
        """Log the skipped-sample counters that the ShardDataModule gathers from its workers (host ints: no sync)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "error_counts"):
            return
        for name, count in datamodule.error_counts(split).items():
            self.log(f"data/{split}_{name}", float(count), on_step=split == "train", on_epoch=split != "train",
                     reduce_fx="max", batch_size=1)
