"""Prompt alignment of generated images on the synthetic shapes set, logged at the end of every validation."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_wuerstchen.evaluation.shapes_alignment import ShapesAlignment


class ShapesAlignmentEvaluation(Callback):
    """Generates an image for every validation caption (``pl_module.evaluation_images``, EMA weights when the EMA
    callback runs) and logs the share that shows what its caption asks: ``val/align_background``, ``_colour``,
    ``_shape``, ``_position``, ``_size`` and ``_all`` (see :mod:`lit_wuerstchen.evaluation.shapes_alignment`).

    Only captions of the synthetic shapes grammar are scored; with none, nothing is logged. The noise of batch
    ``i`` comes from a generator seeded ``seed + i``, so every validation draws the same noise and the global
    random stream (the training's) is untouched.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.metric = ShapesAlignment()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + batch_idx)
        self.metric.update(pl_module.evaluation_images(batch, generator), batch["caption"])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        scores = self.metric.compute()
        if scores.pop("count") > 0:
            for name, value in scores.items():
                pl_module.log(f"val/align_{name}", value)
        self.metric.reset()

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end
