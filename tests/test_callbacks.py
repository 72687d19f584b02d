"""EMA (math, evaluation swap, checkpoint round trip, resume) and the image logger."""

from __future__ import annotations

import lightning as L
import torch
from helpers import datamodule, tiny_stage_a, trainer
from torch import nn

from lit_wuerstchen.callbacks import EMA, ImageLogger
from lit_wuerstchen.checkpoints import load_stage_a, read_checkpoint


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)

    def trained_networks(self):
        return {"net": self.net}


class _FakeTrainer:
    global_step = 0


def test_ema_math_start_step_and_interval():
    module, fake = _Holder(), _FakeTrainer()
    ema = EMA(decay=0.5, start_step=2, update_every=2)
    history = []
    for step in range(1, 7):
        with torch.no_grad():
            module.net.weight.fill_(float(step))
        fake.global_step = step
        ema.on_train_batch_end(fake, module, None, None, step)
        history.append(None if ema.averages is None else ema.averages["net.weight"][0, 0].item())
    # step 1: not an update step, so no average exists yet
    # step 2: update -> at/after start_step: lerp from the copy made when the average was created (weights=2)
    # step 4: 0.5*2 + 0.5*4 = 3; step 6: 0.5*3 + 0.5*6 = 4.5
    assert history[0] is None
    assert history[1] == 2.0 and history[3] == 3.0 and history[5] == 4.5
    assert history[2] == history[1] and history[4] == history[3]


def test_ema_tracks_the_weights_before_start_step():
    module, fake = _Holder(), _FakeTrainer()
    ema = EMA(decay=0.9, start_step=10)
    for step in range(1, 4):
        with torch.no_grad():
            module.net.weight.fill_(float(step))
        fake.global_step = step
        ema.on_train_batch_end(fake, module, None, None, step)
        assert ema.averages["net.weight"][0, 0].item() == float(step)


def test_ema_checkpoint_round_trip_resume_and_validation_swap(shapes_dir, tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay=0.9)
    checkpoint_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = tiny_stage_a()
    trainer(max_steps=6, limit_val_batches=0, callbacks=[ema, checkpoint_cb], enable_checkpointing=True).fit(
        model, datamodule=datamodule(shapes_dir, batches=6)
    )
    checkpoint = read_checkpoint(tmp_path / "last.ckpt")
    saved_ema = checkpoint["ema_state_dict"]
    # the average is keyed like the LightningModule's own state dict
    assert set(saved_ema) == {k for k in checkpoint["state_dict"] if k.startswith("vqgan.")}
    for key, value in ema.averages.items():
        assert torch.equal(saved_ema[key], value)
    # the model's own weights in the checkpoint are the trained ones, not the average
    key = "vqgan.encoder.0.mlp.0.weight"
    trained = checkpoint["state_dict"]
    assert torch.equal(trained[key], model.state_dict()[key])
    assert not torch.equal(trained[key], saved_ema[key])
    # downstream loaders take the EMA weights
    assert torch.equal(load_stage_a(tmp_path / "last.ckpt").state_dict()["encoder.0.mlp.0.weight"], saved_ema[key])

    observed = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            observed["resumed"] = {k: v.clone() for k, v in resumed_ema._ensure_averages(pl_module).items()}

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            observed["validated_with"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            observed["average_then"] = {k: v.clone() for k, v in resumed_ema.averages.items()}

        def on_validation_end(self, trainer, pl_module):
            observed["after_validation"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            observed["training_weights"] = (
                {k: v.clone() for k, v in resumed_ema._backup.items()} if resumed_ema._backup else None
            )

    resumed_ema = EMA(decay=0.9)
    resumed_model = tiny_stage_a()
    trainer(max_steps=8, limit_val_batches=1, val_check_interval=2, callbacks=[resumed_ema, Probe()]).fit(
        resumed_model, datamodule=datamodule(shapes_dir, batches=2), ckpt_path=tmp_path / "last.ckpt"
    )
    for key, value in saved_ema.items():
        assert torch.equal(observed["resumed"][key], value), key
    # validation ran on the average, and training resumed on the trained weights afterwards
    for key, value in observed["average_then"].items():
        assert torch.equal(observed["validated_with"][key], value), key
    final_trained = resumed_model.state_dict()
    assert not torch.equal(final_trained[key], resumed_ema.averages[key])


def test_image_logger_grid_and_files(shapes_dir, tmp_path):
    model = tiny_stage_a()
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run", version="v")
    trainer(
        max_steps=3, limit_val_batches=1, val_check_interval=3, logger=logger, callbacks=[ImageLogger(every_n_steps=2)]
    ).fit(model, datamodule=datamodule(shapes_dir, batches=3))
    images = sorted(p.name for p in (tmp_path / "run" / "v" / "images").iterdir())
    assert images == ["train_step0000002.png", "val_step0000003.png"]
    grid = ImageLogger.make_grid({"a": torch.zeros(4, 3, 8, 8), "b": torch.ones(4, 3, 4, 4)})
    assert grid.shape == (3, 2 * 8 + 3 * 2, 4 * 8 + 5 * 2)  # two rows of four, resized to the largest entry


def test_last_checkpoint_holds_the_final_step_when_max_steps_is_off_the_interval(shapes_dir, tmp_path):
    """every_n_train_steps=3, max_steps=7: Lightning's own callback leaves last.ckpt at step 6; ours at step 7, and
    a second run stopping on the interval (step 6) saves once, at 6."""
    from lit_wuerstchen.callbacks import ModelCheckpoint
    from lit_wuerstchen.cli import NAMED_CALLBACKS

    assert NAMED_CALLBACKS["checkpoint"] is ModelCheckpoint  # what every `fit` uses
    for name, callback_class, max_steps, expected in (
        ("lightning", L.pytorch.callbacks.ModelCheckpoint, 7, 6),
        ("ours", ModelCheckpoint, 7, 7),
        ("ours_on_interval", ModelCheckpoint, 6, 6),
    ):
        folder = tmp_path / name
        callback = callback_class(dirpath=folder, every_n_train_steps=3, save_last=True, save_top_k=-1)
        torch.manual_seed(1)
        trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[callback], enable_checkpointing=True).fit(
            tiny_stage_a(), datamodule=datamodule(shapes_dir, batches=max_steps)
        )
        assert read_checkpoint(folder / "last.ckpt")["global_step"] == expected, name
        assert sorted(p.name for p in folder.iterdir() if p.name != "last.ckpt") == [
            f"epoch=0-step={step}.ckpt" for step in range(3, max_steps + 1, 3)
        ], name


def test_ema_averaged_swaps_in_and_back_and_is_a_no_op_when_already_swapped():
    module, fake = _Holder(), _FakeTrainer()
    ema = EMA(decay=0.5)
    for step, value in ((1, 2.0), (2, 6.0)):  # average: 2, then 0.5 * 2 + 0.5 * 6 = 4
        with torch.no_grad():
            module.net.weight.fill_(value)
        fake.global_step = step
        ema.on_train_batch_end(fake, module, None, None, step)
    assert not ema.swapped_in
    with ema.averaged(module):
        assert ema.swapped_in and module.net.weight[0, 0].item() == 4.0
        with ema.averaged(module):  # nested (an evaluation inside validation): nothing more happens
            assert module.net.weight[0, 0].item() == 4.0
        assert ema.swapped_in and module.net.weight[0, 0].item() == 4.0
    assert not ema.swapped_in and module.net.weight[0, 0].item() == 6.0
    try:
        with ema.averaged(module):
            raise RuntimeError("a failing evaluation")
    except RuntimeError:
        pass
    assert not ema.swapped_in and module.net.weight[0, 0].item() == 6.0  # the trained weights are back


def test_every_n_steps_acts_once_per_crossed_multiple():
    """The rule of the image logger and the evaluations: a standing global_step (gradient accumulation) acts once,
    a jump over a multiple acts once, a resumed process does not catch up, and N = 0 never acts."""
    from lit_wuerstchen.callbacks.schedule import EveryNSteps

    schedule = EveryNSteps(3)
    steps = [1, 2, 3, 3, 3, 4, 5, 7, 8, 9, 9, 13]  # 3 repeated (accumulation), 5 -> 7 and 9 -> 13 jump
    assert [step for step in steps if schedule.due(step)] == [3, 7, 9, 13]
    resumed = EveryNSteps(3)  # a run stopped at step 6 (and acted there); the resumed one's first batch is step 7
    assert [step for step in (7, 8, 9) if resumed.due(step)] == [9]
    assert not any(EveryNSteps(0).due(step) for step in range(10))
