"""Writes image grids from ``pl_module.log_images(batch)`` to TensorBoard (and PNG files) during training."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lit_wuerstchen.strategies import is_sharded

from .schedule import EveryNSteps


class ImageLogger(Callback):
    """Every ``every_n_steps`` training steps, and on the first batch of each validation, log one grid:
    one row per entry of ``log_images`` (for Stage A: inputs over reconstructions). Rank 0 only (under FSDP every
    rank generates its batch's images, rank 0 writes its own).
    """

    def __init__(self, every_n_steps: int = 1000, on_validation: bool = True, save_png: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._schedule = EveryNSteps(every_n_steps)
        self.on_validation = on_validation
        self.save_png = save_png

    @staticmethod
    def make_grid(images: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = [img.detach().float().cpu().clamp(0, 1) for img in images.values()]
        count = min(row.shape[0] for row in rows)
        size = max(row.shape[-2] for row in rows), max(row.shape[-1] for row in rows)
        rows = [
            F.interpolate(row[:count], size=size, mode="nearest") if row.shape[-2:] != size else row[:count]
            for row in rows
        ]
        return torchvision.utils.make_grid(torch.cat(rows), nrow=count, padding=2, pad_value=1.0)

    @torch.no_grad()
    def _log(self, trainer: Trainer, pl_module: LightningModule, batch: dict, split: str) -> None:
        # Trainer.log_dir is a collective (a broadcast from rank 0): every rank asks, before any rank returns.
        out = Path(trainer.log_dir) / "images" if self.save_png and trainer.loggers and trainer.log_dir else None
        if not hasattr(pl_module, "log_images") or not (trainer.is_global_zero or is_sharded(trainer)):
            return  # sharded networks: every rank generates (each forward is a collective), rank 0 writes
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.log_images(batch)
        finally:
            pl_module.train(was_training)
        if not images or not trainer.is_global_zero:
            return
        grid = self.make_grid(images)
        tag = f"{split}/{'_vs_'.join(images)}"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, grid, global_step=trainer.global_step)
        if out is not None:  # no logger: no run folder to write into
            out.mkdir(parents=True, exist_ok=True)
            torchvision.utils.save_image(grid, out / f"{split}_step{trainer.global_step:07d}.png")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._schedule.due(trainer.global_step):
            self._log(trainer, pl_module, batch, "train")

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.on_validation and batch_idx == 0 and not trainer.sanity_checking:
            self._log(trainer, pl_module, batch, "val")
