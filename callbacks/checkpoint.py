"""Lightning's ModelCheckpoint, with ``last.ckpt`` written at the step training ends on."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """``checkpoint:`` of every run. Lightning saves ``last`` at the end of training only if it never saved one, so
    a run whose ``max_steps`` is not a multiple of ``every_n_train_steps`` ended with ``last.ckpt`` up to
    ``every_n_train_steps - 1`` steps behind the trained model (what ``sample`` and ``--ckpt_path last`` then read)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
