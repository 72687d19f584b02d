"""Stage B: frozen Stage A, the compressor's compression ratio, joint training, and the decoder overfit test."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TINY_COMPRESSOR, TINY_NETWORK, datamodule, tiny_stage_b, toy_data_args, trainer

from lit_wuerstchen.callbacks import EMA
from lit_wuerstchen.checkpoints import CheckpointError, load_stage_b, read_checkpoint
from lit_wuerstchen.cli import main
from lit_wuerstchen.diffusion import SamplingConfig
from lit_wuerstchen.generation import sample_stage_b
from lit_wuerstchen.models import DiffNeXtConfig
from lit_wuerstchen.stages import OptimizerConfig, StageB


def test_missing_or_mismatched_stage_a_is_a_clear_error(tmp_path, stage_a_checkpoint):
    with pytest.raises(CheckpointError, match="Stage A checkpoint not found: .*nope.ckpt .Stage B needs"):
        tiny_stage_b(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="latent_channels"):
        StageB(
            stage_a_checkpoint=str(stage_a_checkpoint),
            network=DiffNeXtConfig(latent_channels=8, widths=[16], blocks=[1], heads=[0], semantic_levels=[0]),
            compressor=TINY_COMPRESSOR,
        )
    with pytest.raises(ValueError, match="semantic_channels"):
        StageB(
            stage_a_checkpoint=str(stage_a_checkpoint),
            network=TINY_NETWORK,
            compressor=dataclasses.replace(TINY_COMPRESSOR, latent_channels=8),
        )


@pytest.mark.parametrize("compression, side", [(4, 8), (8, 4), (16, 2), (10.67, 3), (64, 1)])
def test_compression_ratio_sets_the_semantic_latent_shape(stage_a_checkpoint, compression, side):
    model = StageB(
        stage_a_checkpoint=str(stage_a_checkpoint),
        compression=compression,
        network=TINY_NETWORK,
        compressor=TINY_COMPRESSOR,
    ).eval()
    # documented rule: latent side = max(1, round-half-up(image side / compression))
    assert model.compressor(torch.rand(2, 3, 32, 32)).shape == (2, 16, side, side)


def test_frozen_stage_a_is_bit_identical_after_training(shapes_dir, stage_a_checkpoint):
    model = tiny_stage_b(stage_a_checkpoint)
    frozen_before = {k: v.clone() for k, v in model.stage_a.state_dict().items()}
    trained_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=datamodule(shapes_dir, batches=3))
    for key, value in model.stage_a.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, frozen_before[key]), key
    assert not model.stage_a.training
    assert any(not torch.equal(v, trained_before[k]) for k, v in model.decoder.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.stage_a.parameters())
    # out of the optimiser (and of the module tree), but in the checkpoint: later stages need only Stage B's file
    optimized = {id(p) for group in model.optimizers().optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert not optimized & {id(p) for p in model.stage_a.parameters()}
    assert {k.removeprefix("stage_a.") for k in model.state_dict() if k.startswith("stage_a.")} == set(frozen_before)


def test_validation_decodes_images_and_logs_psnr(shapes_dir, stage_a_checkpoint):
    model = tiny_stage_b(stage_a_checkpoint)
    metrics = trainer(limit_val_batches=1).validate(model, datamodule=datamodule(shapes_dir), verbose=False)[0]
    assert {"val/psnr", "val/ssim", "val/psnr_stage_a", "val/loss"} <= metrics.keys()
    images = torch.rand(2, 3, 32, 32)
    assert model.reconstruct(images).shape == images.shape
    with pytest.raises(ValueError, match="multiples of 16"):
        sample_stage_b(
            model.decoder, model.stage_a, torch.zeros(1, 16, 4, 4), (24, 32), model.diffusion, model.sampling_config
        )


def test_overfits_a_handful_of_images_far_better_than_a_constant(shapes_dir, stage_a_checkpoint):
    """Trained on 4 fixed images, sampling from their semantic latents lands near their Stage A latents."""
    torch.manual_seed(0)
    model = tiny_stage_b(
        stage_a_checkpoint,
        semantic_drop_prob=0.0,
        semantic_noise_prob=0.0,
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=0),
    )
    dm = datamodule(shapes_dir)
    dm.setup("fit")
    images = next(iter(dm.val_dataloader()))["image"][:4]
    optimizer = torch.optim.AdamW(model.trained_parameters(), lr=3e-3)
    model.train()
    for _ in range(600):  # 300 left it at 0.12-0.42 of the baseline, depending on the 20-step Stage A
        loss = model.diffusion_loss({"image": images}, train=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    target = model.encode_stage_a(images)
    sampled = sample_stage_b(
        model.decoder,
        model.stage_a,
        model.compressor(images),
        (32, 32),
        model.diffusion,
        SamplingConfig(sampler="ddim", steps=20),
        generator=torch.Generator().manual_seed(0),
        decode=False,
    )
    error = torch.mean((sampled - target) ** 2)
    constant_baseline = torch.mean((target - target.mean(dim=0, keepdim=True)) ** 2)
    assert error < 0.25 * constant_baseline, (error.item(), constant_baseline.item())


def test_checkpoint_loads_for_downstream_stages(shapes_dir, stage_a_checkpoint, tmp_path):
    model = tiny_stage_b(stage_a_checkpoint)
    ema = EMA(decay=0.5)
    fit = trainer(max_steps=2, limit_val_batches=0, callbacks=[ema])
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=2))
    fit.save_checkpoint(tmp_path / "b.ckpt")
    parts = load_stage_b(tmp_path / "b.ckpt")
    assert parts.compression == 8 and parts.decoder.config == TINY_NETWORK
    for key, value in model.stage_a.state_dict().items():
        assert torch.equal(parts.stage_a.state_dict()[key], value)
    for key, value in parts.decoder.state_dict().items():  # the EMA weights
        assert torch.equal(value, ema.averages[f"decoder.{key}"])
    images = torch.rand(1, 3, 32, 32)
    assert parts.compressor(images).shape == (1, 16, 4, 4)
    assert read_checkpoint(tmp_path / "b.ckpt")["lit_wuerstchen"]["stage"] == "B"
    with pytest.raises(CheckpointError, match="not found"):
        load_stage_b(tmp_path / "missing.ckpt")


def test_cli_fast_dev_run(shapes_dir, stage_a_checkpoint, in_tmp_cwd):
    code = main(
        [
            "fit",
            "-c",
            "experiments/stage_b.yaml",
            "-c",
            "experiments/toy/stage_b.yaml",
            "--trainer.fast_dev_run=1",
            f"--model.init_args.stage_a_checkpoint={stage_a_checkpoint}",
            "--model.init_args.network.widths=[16,32,64]",
            *toy_data_args(shapes_dir),
        ]
    )
    assert code == 0


def test_gradient_norm_is_computed_once_per_step_and_clips_as_lightning_does(
    shapes_dir, stage_a_checkpoint, monkeypatch
):
    """The finiteness check's norm is reused by the clipping: one get_total_norm per step, and the trained weights
    equal those of Lightning's own clipping (which computes the norm a second time)."""
    from lit_wuerstchen.stages.base import Stage

    def fit(steps: int = 3) -> dict[str, torch.Tensor]:
        torch.manual_seed(11)
        model = tiny_stage_b(stage_a_checkpoint, optimizer=OptimizerConfig(lr=2e-3, warmup_steps=0, grad_clip=1e-3))
        trainer(max_steps=steps, limit_val_batches=0).fit(model, datamodule=datamodule(shapes_dir, batches=steps))
        return {k: v.clone() for k, v in model.decoder.state_dict().items()}

    norms, lightning_clips = [], []
    total_norm, clip_gradients = torch.nn.utils.get_total_norm, Stage.clip_gradients

    def counting_norm(*args, **kwargs):
        norms.append(1)
        return total_norm(*args, **kwargs)

    def counting_clip(self, *args, **kwargs):  # Lightning's clipping computes the norm again (clip_grad_norm_)
        lightning_clips.append(1)
        return clip_gradients(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counting_norm)
    monkeypatch.setattr(Stage, "clip_gradients", counting_clip)
    reused = fit()
    assert (len(norms), len(lightning_clips)) == (3, 0)

    def lightning_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self._gradient_norm = None
        clip = self.optimizer_config.grad_clip
        self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    monkeypatch.setattr(Stage, "configure_gradient_clipping", lightning_clipping)
    norms.clear()
    reference = fit()
    assert (len(norms), len(lightning_clips)) == (3, 3)
    for key, value in reference.items():
        assert torch.equal(reused[key], value), key
