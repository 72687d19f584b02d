"""FSDP (lit_wuerstchen.strategies.FSDP) against DDP on 2 CPU processes (gloo, forked): the same seed gives the same
losses, weights and EMA; a sharded checkpoint resumes exactly and exports; evaluation and image logging keep the
ranks in step (a rank left out of a collective would hang the test until its timeout)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO, datamodule, tiny_stage_b, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_stage_c import tiny_stage_c

from lit_wuerstchen.callbacks import EMA, CLIPScoreEvaluation, ImageLogger
from lit_wuerstchen.checkpoints import load_pipeline, read_checkpoint
from lit_wuerstchen.cli import main
from lit_wuerstchen.stages import OptimizerConfig
from lit_wuerstchen.strategies import FSDP, blocks_of, is_sharded_checkpoint

pytestmark = pytest.mark.timeout(300)


class Record(L.Callback):
    """Per rank: the training losses and a fingerprint of the full EMA averages as the last validation used them,
    written to ``<out>.<rank>.json``."""

    def __init__(self, out: Path):
        self.out = out
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_validation_start(self, trainer, pl_module):  # after the EMA callback swapped the averages in
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in ema.averages.items()}
        self.ema = {k: float(v.double().sum()) for k, v in full.items() if v.is_floating_point()}

    def on_train_end(self, trainer, pl_module):
        record = {"losses": self.losses, "ema": self.ema}
        Path(f"{self.out}.{trainer.global_rank}.json").write_text(json.dumps(record))


def fit(build, shapes_dir, root: Path, strategy, steps: int = 4, ckpt_path=None, callbacks=()):
    torch.manual_seed(0)  # the same initial weights and random streams for every run
    model = build()
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=2, save_top_k=-1, save_last=True)
    run = trainer(
        devices=2,
        strategy=strategy,
        max_steps=steps,
        limit_val_batches=1,
        val_check_interval=2,
        enable_checkpointing=True,
        callbacks=[EMA(decay=0.5), checkpoints, Record(root / "record"), *callbacks],
        default_root_dir=root,
    )
    run.fit(model, datamodule=datamodule(shapes_dir, batches=steps), ckpt_path=ckpt_path)
    return [json.loads((root / f"record.{rank}.json").read_text()) for rank in range(2)]


def fsdp():
    return FSDP(start_method="fork")


def assert_same_run(ddp_root: Path, fsdp_root: Path, ddp: list[dict], sharded: list[dict], step: int) -> None:
    for rank in range(2):
        torch.testing.assert_close(sharded[rank]["losses"], ddp[rank]["losses"], rtol=1e-5, atol=1e-7)
        assert sharded[rank]["ema"].keys() == ddp[rank]["ema"].keys()
        for key, value in ddp[rank]["ema"].items():
            assert sharded[rank]["ema"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert ddp[0]["ema"] == ddp[1]["ema"], "DDP ranks hold different EMA weights"
    # The sharded folder, read whole, holds what the DDP run's one file holds.
    folder = fsdp_root / "checkpoints" / f"epoch=0-step={step}.ckpt"
    assert is_sharded_checkpoint(folder)
    sharded_ckpt = read_checkpoint(folder)
    ddp_ckpt = read_checkpoint(ddp_root / "checkpoints" / f"epoch=0-step={step}.ckpt")
    for section in ("state_dict", "ema_state_dict"):
        assert sharded_ckpt[section].keys() == ddp_ckpt[section].keys(), section
        for key, value in ddp_ckpt[section].items():
            torch.testing.assert_close(sharded_ckpt[section][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert sharded_ckpt["global_step"] == ddp_ckpt["global_step"] == step


def test_stage_c_under_fsdp_matches_ddp_and_resumes_and_exports(shapes_dir, stage_b_checkpoint, tmp_path, capsys):
    def generating_callbacks():  # under FSDP these generate on every rank, in step (else the run would hang)
        evaluation = CLIPScoreEvaluation(model_name="wuerstchen-tiny-clip", pretrained=None, num_images=6,
                                         every_n_steps=2, batch_size=2)  # fmt: skip
        return [evaluation, ImageLogger(every_n_steps=2, save_png=False)]

    build = lambda: tiny_stage_c(stage_b_checkpoint)  # noqa: E731
    ddp = fit(build, shapes_dir, tmp_path / "ddp", "ddp_fork", callbacks=generating_callbacks())
    sharded = fit(build, shapes_dir, tmp_path / "fsdp", fsdp(), callbacks=generating_callbacks())
    assert_same_run(tmp_path / "ddp", tmp_path / "fsdp", ddp, sharded, step=4)
    torch.manual_seed(0)
    initial = tiny_stage_c(stage_b_checkpoint).prior.state_dict()
    final = read_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(not torch.equal(final[f"prior.{k}"], v) for k, v in initial.items()), "nothing was trained"

    # Resume the sharded step-2 folder: steps 3 and 4 repeat the uninterrupted run's.
    resumed = fit(build, shapes_dir, tmp_path / "resumed", fsdp(), callbacks=generating_callbacks(),
                  ckpt_path=tmp_path / "fsdp" / "checkpoints" / "epoch=0-step=2.ckpt")  # fmt: skip
    for rank in range(2):
        torch.testing.assert_close(resumed[rank]["losses"], sharded[rank]["losses"][2:], rtol=1e-6, atol=1e-8)
        assert resumed[rank]["ema"] == pytest.approx(sharded[rank]["ema"], rel=1e-6)

    # export and consolidate read the folder; the consolidated file equals it.
    folder = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert main(["export", "--ckpt", str(folder), "--out", str(tmp_path / "export")]) == 0
    pipeline = load_pipeline(tmp_path / "export")
    ema = read_checkpoint(folder)["ema_state_dict"]
    for key, value in pipeline.prior.state_dict().items():
        torch.testing.assert_close(value, ema[f"prior.{key}"], msg=key)
    assert main(["consolidate", str(folder)]) == 0
    consolidated = torch.load(folder.with_name("last.consolidated.ckpt"), weights_only=True)
    assert consolidated["ema_state_dict"].keys() == ema.keys()
    assert main(["consolidate", str(folder)]) != 0  # never replaces the file it wrote before
    # another strategy cannot restore the folder: one line that says what to do, before anything is built
    configs = ["-c", str(REPO / "experiments/stage_c.yaml"), "-c", str(REPO / "experiments/toy/stage_c.yaml")]
    configs += ["--model.init_args.stage_b_checkpoint", str(stage_b_checkpoint)]
    assert main(["validate", *configs, "--ckpt_path", str(folder)]) != 0
    assert "sharded checkpoint (an FSDP run's): add -c experiments/strategies/fsdp.yaml" in capsys.readouterr().err


def test_stage_b_under_fsdp_matches_ddp(shapes_dir, stage_a_checkpoint, tmp_path):
    # A clip far below the gradient norm: every step is clipped, so the sharded norm must be the whole model's.
    build = lambda: tiny_stage_b(stage_a_checkpoint, optimizer=OptimizerConfig(lr=2e-3, grad_clip=1e-3))  # noqa: E731
    ddp = fit(build, shapes_dir, tmp_path / "ddp", "ddp_fork")
    sharded = fit(build, shapes_dir, tmp_path / "fsdp", fsdp())
    assert_same_run(tmp_path / "ddp", tmp_path / "fsdp", ddp, sharded, step=4)


def test_blocks_are_the_sharding_units(stage_b_checkpoint, stage_a_checkpoint):
    prior = tiny_stage_c(stage_b_checkpoint).prior
    units = blocks_of(prior)
    assert len(units) == 2 * prior.config.depth  # a ResBlock and an AttnBlock per depth step
    decoder = tiny_stage_b(stage_a_checkpoint).decoder
    assert len(blocks_of(decoder)) == 2 * sum(decoder.config.blocks)  # the down and up paths' blocks, not their parts


def test_frozen_parts_run_in_bf16_and_are_saved_in_float32(shapes_dir, stage_b_checkpoint, tmp_path):
    torch.manual_seed(0)
    model = tiny_stage_c(stage_b_checkpoint)  # its random tiny text encoder is persistent: saved in the checkpoint
    saved_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    run = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, precision="bf16-mixed")
    run.fit(model, datamodule=datamodule(shapes_dir, batches=2))
    for name, module in model.frozen_modules().items():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
    assert {p.dtype for p in model.prior.parameters()} == {torch.float32}
    images = model.evaluation_images(next(iter(datamodule(shapes_dir).val_dataloader())))  # outside autocast
    assert torch.isfinite(images).all()
    run.save_checkpoint(tmp_path / "c.ckpt")
    state = read_checkpoint(tmp_path / "c.ckpt")["state_dict"]
    for key, value in saved_before.items():
        assert state[f"text_encoder.{key}"].dtype == value.dtype
        assert torch.equal(state[f"text_encoder.{key}"], value), key
    # a resumed bf16 run saves the float32 weights it loaded, not those it was built with
    other = tiny_stage_c(stage_b_checkpoint)
    with torch.no_grad():  # built differently from what the checkpoint holds
        for parameter in other.text_encoder.parameters():
            parameter.add_(1.0)
    resumed = trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed")
    resumed.fit(other, datamodule=datamodule(shapes_dir, batches=3), ckpt_path=tmp_path / "c.ckpt")
    resumed.save_checkpoint(tmp_path / "resumed.ckpt")
    state = read_checkpoint(tmp_path / "resumed.ckpt")["state_dict"]
    for key, value in saved_before.items():
        assert torch.equal(state[f"text_encoder.{key}"], value), key
