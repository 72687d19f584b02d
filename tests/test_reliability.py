"""Runs never lie and never lose work: divergence, preemption, exact resume, atomic data, errors at the door,
input limits, no overwriting. Each test is a row of docs/reliability.md."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TINY, datamodule, tiny_stage_a

from lit_wuerstchen.callbacks import EMA, RunLifecycle
from lit_wuerstchen.checkpoints import read_checkpoint
from lit_wuerstchen.errors import DivergenceError
from lit_wuerstchen.stages import OptimizerConfig, StageA


class KeyRecorder(L.Callback):
    """The sample keys each training step consumed, by global step (a resumed run overwrites redone steps)."""

    def __init__(self):
        self.keys: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys[trainer.global_step] = list(batch["key"])


class StopAt(L.Callback):
    """Ends fit gracefully after ``step`` (as a preempted run that saved its checkpoint does)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _resumable_fit(shapes_dir, root, max_steps, callbacks, ckpt_path=None, workers=2):
    torch.manual_seed(0)
    model = tiny_stage_a(optimizer=OptimizerConfig(lr=2e-3, warmup_steps=2, decay="cosine"))
    dm = datamodule(shapes_dir, batches=4)
    dm.num_workers = workers
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True)
    fit = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=1, val_check_interval=3, limit_val_batches=1,
        callbacks=[checkpoint, EMA(decay=0.9), *callbacks],
    )  # fmt: skip
    fit.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, fit


def test_a_resumed_run_continues_exactly_where_it_stopped(shapes_dir, tmp_path):
    """Stopped after step 5 (mid-epoch, an odd batch of 2 workers) and resumed: the same batches in the same order,
    the same noise, the same weights and EMA as the uninterrupted run."""
    straight_keys = KeyRecorder()
    straight, _ = _resumable_fit(shapes_dir, tmp_path / "straight", 10, [straight_keys])

    resumed_keys = KeyRecorder()
    _resumable_fit(shapes_dir, tmp_path / "resumed", 10, [resumed_keys, StopAt(5)])
    assert sorted(resumed_keys.keys) == list(range(5))
    resumed, fit = _resumable_fit(
        shapes_dir, tmp_path / "resumed", 10, [resumed_keys], ckpt_path=tmp_path / "resumed" / "last.ckpt"
    )
    assert fit.global_step == 10
    assert resumed_keys.keys == straight_keys.keys  # no sample seen twice or skipped, same order
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    ema_straight = read_checkpoint(tmp_path / "straight" / "last.ckpt")["ema_state_dict"]
    ema_resumed = read_checkpoint(tmp_path / "resumed" / "last.ckpt")["ema_state_dict"]
    assert all(torch.equal(ema_straight[k], ema_resumed[k]) for k in ema_straight)


class Poison(L.Callback):
    """Makes the training loss non-finite at the given steps (a NaN in the inputs)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["image"][0, 0, 0, 0] = float("nan")


def test_divergence_stops_at_the_step_and_writes_no_non_finite_checkpoint(shapes_dir, tmp_path):
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    lifecycle = RunLifecycle()
    fit = L.Trainer(accelerator="cpu", devices=1, max_steps=8, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0,
                    callbacks=[checkpoint, EMA(decay=0.9), lifecycle, Poison([3])])  # fmt: skip
    model = tiny_stage_a()
    with pytest.raises(DivergenceError, match=r"diverged: non-finite training at step 3: gradient norm nan, loss nan"):
        fit.fit(model, datamodule=datamodule(shapes_dir, batches=8))
    last = read_checkpoint(tmp_path / "last.ckpt")
    assert last["global_step"] == 3  # the last good state
    for section in ("state_dict", "ema_state_dict"):
        assert all(torch.isfinite(v).all() for v in last[section].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never touched the weights
    assert not (tmp_path / "crash.ckpt").exists()


def test_bad_steps_can_be_skipped_up_to_a_budget(shapes_dir):
    model = StageA(vqgan=TINY, optimizer=OptimizerConfig(lr=2e-3, max_skipped_steps=2))
    fit = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_progress_bar=False,
                    enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                    callbacks=[Poison([1, 4])])  # fmt: skip
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=6))
    assert fit.global_step == 6 and model.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(fit.callback_metrics["train/skipped_steps"]) == 2
    model = StageA(vqgan=TINY, optimizer=OptimizerConfig(lr=2e-3, max_skipped_steps=1))
    with pytest.raises(DivergenceError, match="2 bad step"):
        L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_progress_bar=False,
                  enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                  callbacks=[Poison([1, 4])]).fit(model, datamodule=datamodule(shapes_dir, batches=6))  # fmt: skip
