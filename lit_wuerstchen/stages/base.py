"""What every stage's LightningModule shares: optimiser settings, the EMA contract, data-health logging."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import lightning as L
import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """AdamW with a linear warm-up (paper recipes: lr 1e-4, 10k warm-up steps for Stages B and C)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    """Gradient-norm clipping (None disables)."""


def as_dataclass(cls, value):
    """Accept a config dataclass or its dict form (how checkpoints store hyper-parameters)."""
    return cls(**value) if isinstance(value, dict) else value


def make_optimizer(
    parameters, config: OptimizerConfig, lr: float | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        parameters, lr=lr or config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
    )
    warmup = max(config.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


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
