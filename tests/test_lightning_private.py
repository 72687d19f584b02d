"""Each private Lightning API of lit_wuerstchen.lightning_private does what we rely on: a Lightning upgrade that moves
or changes one fails here, by name."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import trainer
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_wuerstchen import lightning_private as private


def boring_trainer(tmp_path, **kwargs) -> Trainer:
    return trainer(limit_val_batches=0, default_root_dir=tmp_path, **kwargs)


class Record(Callback):
    """What a private hook answers on every training batch."""

    def __init__(self, ask):
        self.ask, self.answers = ask, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.answers.append(self.ask(trainer))


def test_cluster_environment_is_the_detected_one(tmp_path, monkeypatch):
    assert isinstance(private.cluster_environment(boring_trainer(tmp_path)), LightningEnvironment)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")  # not "bash": a batch job, so Lightning takes SLURM's word
    environment = private.cluster_environment(boring_trainer(tmp_path, plugins=[SLURMEnvironment(auto_requeue=False)]))
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False


def test_stop_as_on_sigterm_stops_after_the_current_batch(tmp_path):
    class StopAtThird(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                private.stop_as_on_sigterm(trainer)

    trainer = boring_trainer(tmp_path, max_steps=10, callbacks=[StopAtThird()])
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel())
    assert trainer.global_step == 3


def test_accumulating_is_true_on_the_batches_without_an_optimiser_step(tmp_path):
    record = Record(private.accumulating)
    boring_trainer(tmp_path, max_steps=2, accumulate_grad_batches=3, callbacks=[record]).fit(BoringModel())
    assert record.answers == [True, True, False, True, True, False]


def test_logs_written_now_follows_log_every_n_steps(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    record = Record(private.logs_written_now)
    trainer = boring_trainer(
        tmp_path, max_steps=6, log_every_n_steps=3, callbacks=[record], logger=CSVLogger(tmp_path / "logs")
    )
    trainer.fit(BoringModel())
    assert record.answers == [False, False, True, False, False, True]


def test_the_launcher_and_cli_hooks_we_override_keep_their_signatures():
    parameters = list(inspect.signature(private.MultiProcessingLauncher._collect_rank_zero_results).parameters)
    assert parameters == ["self", "trainer", "results"]
    assert private.WorkerOutput._fields == (
        "best_model_path",
        "weights_path",
        "trainer_state",
        "trainer_results",
        "extra",
    )
    run = getattr(LightningCLI, private.CLI_RUN_SUBCOMMAND)
    assert list(inspect.signature(run).parameters) == ["self", "subcommand"]
    from lit_wuerstchen.cli import WuerstchenCLI

    assert private.CLI_RUN_SUBCOMMAND in vars(WuerstchenCLI)  # our override is still the one that runs


def test_distributed_checkpoint_save_and_load_round_trip_in_one_process(tmp_path):
    torch.manual_seed(23)
    state = {"state_dict": {"w": torch.randn(4, 3)}, "ema_state_dict": {"w": torch.randn(4, 3)}}
    private.distributed_checkpoint_save(state, tmp_path / "ckpt")
    whole = private.load_distributed_checkpoint(tmp_path / "ckpt")
    assert torch.equal(whole["state_dict"]["w"], state["state_dict"]["w"])
    into = {"ema_state_dict": {"w": torch.zeros(4, 3)}}
    private.distributed_checkpoint_load(into, tmp_path / "ckpt")
    assert torch.equal(into["ema_state_dict"]["w"], state["ema_state_dict"]["w"])


def test_summary_settings_and_table_are_what_the_summary_callback_prints(tmp_path):
    from lightning.pytorch.callbacks import ModelSummary

    callback = ModelSummary(max_depth=3)
    max_depth, options = private.summary_settings(callback)
    assert max_depth == 3 and isinstance(options, dict)
    fit = boring_trainer(tmp_path, max_steps=1)
    model = BoringModel()
    fit.fit(model)
    summary, rows = private.summary_table(callback, fit, model)
    columns = dict(rows)
    assert {"Name", "Type", "Params"} <= set(columns) and columns["Name"] == ["layer"]
    assert summary.total_parameters == sum(p.numel() for p in model.parameters())
