"""How a run ends: finished (a ``DONE`` marker), preempted (a resumable checkpoint, then a non-zero exit) or crashed.

- **Finished**: when ``fit`` reaches its end (``max_steps``/``max_epochs``, early stopping), rank 0 writes ``DONE`` into
  the run folder. Nothing else writes it: ``sweep run`` trusts only this marker.
- **Preempted**: SIGTERM (what SLURM and Kubernetes send before preemption) and SIGUSR1 make Lightning stop after the
  current batch on every rank; this callback then saves ``checkpoints/last.ckpt`` (the state after that batch: resuming
  from it continues exactly there) and the command exits with 143. Under SLURM with auto-requeue, Lightning's own
  SIGUSR1 handler (checkpoint + ``scontrol requeue``) is left in charge.
- **Crashed**: any other exception saves ``checkpoints/crash.ckpt`` for inspection (the state may be mid-step) and
  says how to resume from it; a diverged run saves nothing (its last checkpoint is the last good one), nor does a
  crashed FSDP run (a sharded save needs every rank, and the crashed one is gone).

Lightning's ``OnExceptionCheckpoint`` is not used: once its file exists, every later ``fit`` of the experiment resumes
from it silently.
"""

from __future__ import annotations

import datetime
import logging
import signal
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_wuerstchen.errors import DivergenceError
from lit_wuerstchen.lightning_private import cluster_environment, stop_as_on_sigterm
from lit_wuerstchen.strategies import is_sharded

log = logging.getLogger(__name__)

DONE_MARKER = "DONE"


class RunLifecycle(Callback):
    def __init__(self, crash_filename: str = "crash.ckpt", preempt_filename: str = "last.ckpt"):
        self.crash_filename = crash_filename
        self.preempt_filename = preempt_filename
        self._previous_sigusr1 = None

    # --- preemption signals ---------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        environment = cluster_environment(trainer)
        slurm_requeue = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if stage == "fit" and not slurm_requeue and hasattr(signal, "SIGUSR1"):
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, lambda signum, frame: self._stop(trainer))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None

    @staticmethod
    def _stop(trainer: Trainer) -> None:
        # SIGUSR1 takes SIGTERM's path: Lightning agrees on it across ranks and stops after the current batch.
        log.warning("received SIGUSR1: stopping after the current batch")
        stop_as_on_sigterm(trainer)

    # --- the end of a run -----------------------------------------------------------------------------------------
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective (a broadcast from rank 0): asked on every rank
        if trainer.is_global_zero and log_dir and not trainer.fast_dev_run and trainer.loggers:
            marker = Path(log_dir) / DONE_MARKER
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"finished at step {trainer.global_step}, {datetime.datetime.now().isoformat()}\n")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.sanity_checking or trainer.global_step == 0 or not trainer.log_dir:
            return
        if isinstance(exception, DivergenceError):
            return
        preempted = isinstance(exception, SIGTERMException)
        if not preempted and is_sharded(trainer):
            # A sharded save is a collective: every rank must take part, and after a crash on one rank the others
            # are not here (they would wait forever). The last periodic checkpoint is the one to resume from.
            log.warning("%s at step %d: no crash checkpoint under FSDP", type(exception).__name__, trainer.global_step)
            return
        path = Path(trainer.log_dir) / "checkpoints" / (self.preempt_filename if preempted else self.crash_filename)
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # the original exception matters more than this one
            log.error("could not save a checkpoint to %s: %s", path, error)
            return
        if preempted:
            log.warning("stopped by a signal after step %d: saved %s", trainer.global_step, path)
        else:
            log.warning(
                "%s at step %d: saved %s; resume with --ckpt_path %s",
                type(exception).__name__,
                trainer.global_step,
                path,
                path,
            )
