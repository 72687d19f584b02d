"""Stage A trains under real DDP: 2 CPU processes, gloo, forked by Lightning (ddp_fork)."""

from __future__ import annotations

import pytest
import torch
from helpers import datamodule, tiny_stage_a, trainer


@pytest.mark.timeout(300)
def test_stage_a_with_discriminator_trains_under_ddp(shapes_dir, tmp_path):
    torch.manual_seed(0)
    model = tiny_stage_a(adversarial_weight=0.1, adversarial_start_step=2, discriminator_channels=8)
    ddp = trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=4,
        limit_val_batches=2,
        val_check_interval=4,
        default_root_dir=tmp_path,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ddp.fit(model, datamodule=datamodule(shapes_dir, batches=4))
    assert ddp.world_size == 2
    # the forked workers hand rank 0's weights and metrics back to this process
    changed = [not torch.equal(v, before[f"discriminator.{k}"]) for k, v in model.discriminator.state_dict().items()]
    assert any(changed)
    metrics = ddp.callback_metrics
    assert torch.isfinite(metrics["val/psnr"]) and "train/discriminator_loss" in metrics
