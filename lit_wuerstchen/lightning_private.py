"""Every private Lightning API lit_wuerstchen relies on, in one place.

Lightning has no public way to do these; each is used through this module only, and each has a test in
``tests/test_lightning_private.py`` that checks the behaviour we rely on, so a Lightning release that moves one fails
there, loudly, instead of in the middle of a week-long run. ``pyproject.toml`` bounds Lightning below the next minor
release for the same reason: a new minor version is adopted after this module's tests pass on it.

| private API | used by | for |
| --- | --- | --- |
| ``trainer._accelerator_connector.cluster_environment`` | ``callbacks.lifecycle`` | is SLURM requeueing on? |
| ``trainer._signal_connector.received_sigterm`` | ``callbacks.lifecycle`` | SIGUSR1 stops the run as SIGTERM does |
| ``trainer.fit_loop._should_accumulate()`` | ``callbacks.perf`` | no optimiser step on this batch |
| ``trainer._logger_connector.should_update_logs`` | ``callbacks.perf`` | the logger writes on this step |
| ``ModelSummary._max_depth``, ``._summarize_kwargs``, ``._summary()`` | ``callbacks.perf`` | the summary with FLOPs |
| ``ModelSummary(...)._get_summary_data()`` (the summary object's) | ``callbacks.perf`` | its table rows |
| ``LightningCLI._run_subcommand`` | ``cli.WuerstchenCLI`` | a preempted fit exits with one line |
| ``_MultiProcessingLauncher._collect_rank_zero_results``, ``_WorkerOutput`` | ``strategies`` | FSDP on CPU spawn |
| ``fabric.strategies.fsdp._distributed_checkpoint_save`` / ``_load`` | ``strategies.FSDP`` | EMA shards saved |
| ``fabric.utilities.load._load_distributed_checkpoint`` | ``strategies.read_sharded`` | a sharded folder, whole |
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load, _distributed_checkpoint_save
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.plugins.environments import ClusterEnvironment
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput

MultiProcessingLauncher = _MultiProcessingLauncher
"""Lightning's fork/spawn launcher; subclassed to override ``_collect_rank_zero_results(trainer, results)``."""
WorkerOutput = _WorkerOutput
"""What a spawned rank 0 hands back: ``(best_model_path, weights_path, trainer_state, trainer_results, extra)``."""
CLI_RUN_SUBCOMMAND = "_run_subcommand"
"""The ``LightningCLI`` method (``self, subcommand``) that runs ``fit``/``validate``/...: overridden to turn a
``SIGTERMException`` into a one-line preemption error."""


def cluster_environment(trainer: Trainer) -> ClusterEnvironment:
    """The cluster environment the trainer detected (SLURM, torchelastic, LSF, ... or the plain one)."""
    return trainer._accelerator_connector.cluster_environment


def stop_as_on_sigterm(trainer: Trainer) -> None:
    """Stop after the current batch exactly as on SIGTERM: Lightning agrees on it across ranks, then raises
    ``SIGTERMException`` from the loop."""
    trainer._signal_connector.received_sigterm = True


def accumulating(trainer: Trainer) -> bool:
    """Whether the current training batch only accumulates gradients (no optimiser step after it)."""
    return trainer.fit_loop._should_accumulate()


def logs_written_now(trainer: Trainer) -> bool:
    """Whether the loggers write this step's metrics (``log_every_n_steps``)."""
    return trainer._logger_connector.should_update_logs


def summary_settings(callback: ModelSummary) -> tuple[int, dict[str, Any]]:
    """A model summary callback's ``(max_depth, summarize keyword options)``, to rebuild it or print as it would."""
    return callback._max_depth, dict(callback._summarize_kwargs)


def summary_table(callback: ModelSummary, trainer: Trainer, pl_module: Any) -> tuple[Any, list[tuple[str, list]]]:
    """The summary object a model summary callback builds for ``pl_module`` and its table rows (``(column, values)``
    pairs), as its ``on_fit_start`` prints them."""
    summary = callback._summary(trainer, pl_module)
    return summary, summary._get_summary_data()


def distributed_checkpoint_save(state: dict[str, Any], path: Any) -> None:
    """``torch.distributed.checkpoint.save`` of ``state`` into the folder ``path`` (every rank writes its shards)."""
    _distributed_checkpoint_save(state, path)


def distributed_checkpoint_load(state: dict[str, Any], path: Any) -> None:
    """Load a sharded folder into ``state``'s tensors in place (sharded as they are)."""
    _distributed_checkpoint_load(state, path)


def load_distributed_checkpoint(path: Any) -> dict[str, Any]:
    """A sharded checkpoint folder, whole, in this process (no process group needed)."""
    return _load_distributed_checkpoint(path)
