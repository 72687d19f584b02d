"""What every stage's LightningModule shares: optimiser settings, the EMA contract, data-health logging."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import lightning as L
import torch
from torch import nn



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


def as_dataclass(cls, value):
    """Accept a config dataclass or its dict form (how checkpoints store hyper-parameters)."""
    return cls(**value) if isinstance(value, dict) else value


class Stage(L.LightningModule):
    """Base of the stage LightningModules.

    Subclasses implement ``ema_network`` (the one trained network the EMA callback averages: never frozen
    encoders or metric networks) and ``log_images`` (named image grids in [0, 1] for the image logger).
    """

    def hold_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Keep a frozen network (text encoder, LPIPS, earlier stages) *outside* the module tree.

        It stays out of checkpoints, the EMA, the optimiser and FSDP wrapping, yet moves with the LightningModule
        (``.to()``) and is always in eval mode. Access it as ``self.<name>``.
        """
        module.requires_grad_(False).eval()
        if "_frozen" not in self.__dict__:
            object.__setattr__(self, "_frozen", {})
        self._frozen[name] = module
        object.__setattr__(self, name, module)
        return module

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self.__dict__.get("_frozen", {})

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for module in self.frozen_modules().values():
            module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules().values():
            module.eval()
        return self

    def store_plain_hparams(self, **configs) -> None:
        """Keep config dataclasses as plain dicts in ``hparams``: checkpoints then load with ``weights_only``."""
        self.hparams.update({name: asdict(config) for name, config in configs.items()})

    def ema_network(self) -> nn.Module:
        raise NotImplementedError

    def configure_optimizers(self):
        """AdamW over exactly the trained network (``ema_network``), stepped per step (``self.optimizer_config``)."""
        optimizer, scheduler = self.optimizer_config.build(self.ema_network().parameters(),
                                                           total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.optimizer_config.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        return {}

    def evaluation_images(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] that evaluation callbacks (FID, CLIP score) compare with ``batch``: reconstructions of
        ``batch["image"]`` for Stages A and B, generations from ``batch["caption"]`` for Stage C."""
        raise NotImplementedError

    def log_data_errors(self, split: str) -> None:
        """Log the skipped-sample counters that the ShardDataModule gathers from its workers (host ints: no sync)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "error_counts"):
            return
        for name, count in datamodule.error_counts(split).items():
            self.log(f"data/{split}_{name}", float(count), on_step=split == "train", on_epoch=split != "train",
                     reduce_fx="max", batch_size=1)
