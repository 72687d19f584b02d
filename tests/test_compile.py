"""``compile=True``: the trained networks go through torch.compile (inductor, CPU), train step for step like the eager
ones and save the same checkpoint keys (``nn.Module.compile`` in place: no ``_orig_mod.``).

Compiling is most of the cost here (a cold inductor cache: tens of seconds per stage on a 2-core CPU), so each stage
runs only STEPS steps."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
import torch._dynamo
from helpers import datamodule, tiny_stage_b, trainer
from test_stage_c import FAST_DECODER, FAST_PRIOR, TINY_TEXT
from torch._dynamo.utils import counters

from lit_wuerstchen.checkpoints import read_checkpoint
from lit_wuerstchen.models import PriorConfig
from lit_wuerstchen.stages import OptimizerConfig, StageC

STEPS = 3


def dropout_free_stage_c(stage_b_checkpoint, **kwargs) -> StageC:
    """test_stage_c's tiny Stage C without dropout (the prior's default is 0.1; the tiny Stage B's DiffNeXt has none):
    eager and compiled dropout draw different masks (inductor has its own random streams), so with dropout the
    losses part from the second step on (measured: 9% and 3% apart at steps 2 and 3)."""
    return StageC(
        stage_b_checkpoint=str(stage_b_checkpoint),
        network=PriorConfig(width=32, depth=2, heads=2, text_channels=64, dropout=0.0),
        text_encoder=TINY_TEXT,
        validation_sampling=FAST_PRIOR,
        decoder_sampling=FAST_DECODER,
        optimizer=OptimizerConfig(lr=2e-3),
        **kwargs,
    )


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train(build, shapes_dir, path) -> tuple[L.LightningModule, list[float], set[str]]:
    """Build a model and train it STEPS steps, both from seed 0: the model, its per-step losses, its checkpoint's
    state_dict keys."""
    torch.manual_seed(0)
    model = build()
    recorder = LossRecorder()
    fit = trainer(max_steps=STEPS, limit_val_batches=0, callbacks=[recorder])
    torch.manual_seed(0)
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=STEPS))
    fit.save_checkpoint(path)
    return model, recorder.losses, set(read_checkpoint(path)["state_dict"])


def assert_compiled_trains_like_eager(build, networks: list[str], shapes_dir, tmp_path) -> None:
    torch._dynamo.reset()
    counters.clear()
    try:
        model, losses, keys = train(lambda: build(compile=True), shapes_dir, tmp_path / "compiled.ckpt")
        frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()  # no compiled code or guards left for later tests
    eager_model, eager_losses, eager_keys = train(build, shapes_dir, tmp_path / "eager.ckpt")

    # Really compiled: configure_model wrapped every trained network, and dynamo captured graphs during fit (at
    # least one per network; graph breaks would only add some). Both fail if compiling were silently skipped.
    for name in networks:
        assert getattr(model, name)._compiled_call_impl is not None, name
        assert getattr(eager_model, name)._compiled_call_impl is None, name
    assert frames >= len(networks) and graphs >= len(networks), dict(counters["frames"])

    # Inductor may fuse and reorder float32 reductions, so only rounding may separate the losses. Measured here
    # (torch 2.14, x86 CPU): bitwise equal at every step for both stages; perturbing every weight by a relative 1e-6
    # moves the losses by at most 1e-7 relative. rtol 1e-4 leaves 1000x room for other CPUs and compiler versions,
    # while a real difference is far larger (the prior's dropout: 9e-2; another draw or a skipped step: more).
    assert len(losses) == len(eager_losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=0.0)

    assert keys == eager_keys
    assert not any("_orig_mod" in key for key in keys)


def test_compiled_stage_c_trains_like_eager(shapes_dir, stage_b_checkpoint, tmp_path):
    build = partial(dropout_free_stage_c, stage_b_checkpoint)
    assert_compiled_trains_like_eager(build, ["prior"], shapes_dir, tmp_path)


@pytest.mark.slow  # ~1 min of inductor compiling on a 2-core CPU: `make test-all`; Stage C covers the option in CI
def test_compiled_stage_b_trains_like_eager(shapes_dir, stage_a_checkpoint, tmp_path):
    build = partial(tiny_stage_b, stage_a_checkpoint)
    assert_compiled_trains_like_eager(build, ["decoder", "compressor"], shapes_dir, tmp_path)
