"""Save a checkpoint into the run's own folder when training dies, and say how to resume.

Lightning's ``OnExceptionCheckpoint`` is not used on purpose: when its file exists, every later ``fit`` of the
experiment silently resumes from it. Here resuming stays explicit (``--ckpt_path``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


class CrashCheckpoint(Callback):
    def __init__(self, filename: str = "crash.ckpt"):
        self.filename = filename

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.sanity_checking or trainer.global_step == 0 or not trainer.log_dir:
            return
        path = Path(trainer.log_dir) / "checkpoints" / self.filename
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # the original exception matters more than this one
            log.error("could not save a crash checkpoint to %s: %s", path, error)
            return
        log.warning(
            "%s at step %d: saved %s; resume with --ckpt_path %s",
            type(exception).__name__,
            trainer.global_step,
            path,
            path,
        )
