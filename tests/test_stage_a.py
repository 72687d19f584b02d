"""Stage A: the VQGAN network, its LightningModule (losses, manual optimisation, metrics) and its CLI run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import TINY, datamodule, tiny_stage_a, toy_data_args, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_wuerstchen.checkpoints import load_stage_a
from lit_wuerstchen.cli import main
from lit_wuerstchen.losses import PerceptualLoss
from lit_wuerstchen.models.vqgan import VQGAN, VQGANConfig


def test_paper_scale_vqgan_size():
    with torch.device("meta"):
        model = VQGAN(VQGANConfig())
    assert 17e6 < sum(p.numel() for p in model.parameters()) < 21e6  # docs/design.md "Stage A": ~18-20M
    assert model.config.downsampling == 4


def test_vqgan_shapes_and_errors():
    model = VQGAN(TINY).eval()
    images = torch.rand(2, 3, 32, 48)
    latent = model.encode(images)
    assert latent.shape == (2, 4, 8, 12)
    assert model.decode(latent).shape == images.shape
    quantized = model.encode(images, quantize=True)
    assert torch.equal(model.decode(latent, quantize=True), model.decode(quantized))
    # every quantised vector is a codebook entry
    codes = model.quantizer.codebook.weight
    flat = quantized.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(flat, codes, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-5
    with pytest.raises(ValueError, match="divisible by 4"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="one entry per level"):
        VQGANConfig(channels=[8, 16], encoder_blocks=[1], decoder_blocks=[1, 1])


def test_skip_quantization_passes_the_continuous_latent():
    model = VQGAN(TINY)
    images = torch.rand(3, 3, 16, 16)
    skip = torch.tensor([True, False, True])
    out = model(images, skip_quantization=skip)
    expected_skipped = model.decode(model.encode(images))
    assert torch.allclose(out["reconstruction"][skip], expected_skipped[skip], atol=1e-6)
    assert not torch.allclose(out["reconstruction"][~skip], expected_skipped[~skip], atol=1e-4)


def test_a_few_dozen_steps_lower_the_reconstruction_loss(shapes_dir):
    torch.manual_seed(0)
    model = tiny_stage_a()
    dm = datamodule(shapes_dir, batches=40)
    dm.setup("fit")
    images = next(iter(dm.val_dataloader()))["image"]
    before = torch.nn.functional.mse_loss(model.reconstruct(images), images).item()
    trainer(max_steps=40, limit_val_batches=0).fit(model, datamodule=dm)
    after = torch.nn.functional.mse_loss(model.reconstruct(images), images).item()
    assert after < 0.5 * before, (before, after)


def test_discriminator_trains_from_its_start_step_and_global_step_counts_batches(shapes_dir):
    torch.manual_seed(0)
    model = tiny_stage_a(adversarial_weight=0.1, adversarial_start_step=3, discriminator_channels=8)
    initial = [p.detach().clone() for p in model.discriminator.parameters()]
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            changed = any(not torch.equal(a, b) for a, b in zip(initial, pl_module.discriminator.parameters()))
            seen.append((trainer.global_step, changed))

    fit_trainer = trainer(max_steps=5, limit_val_batches=0, callbacks=[Probe()])
    fit_trainer.fit(model, datamodule=datamodule(shapes_dir))
    assert fit_trainer.global_step == 5  # two optimisers, one global step per batch
    assert [changed for _, changed in seen] == [False, False, False, True, True]
    assert "train/discriminator_loss" in fit_trainer.callback_metrics


def test_validation_logs_reconstruction_and_codebook_metrics(shapes_dir):
    model = tiny_stage_a()
    metrics = trainer().validate(model, datamodule=datamodule(shapes_dir), verbose=False)[0]
    for name in ("val/psnr", "val/psnr_unquantized", "val/ssim", "val/codebook_perplexity", "val/dead_code_share"):
        assert name in metrics
    assert 1.0 <= metrics["val/codebook_perplexity"] <= TINY.codebook_size
    assert 0.0 <= metrics["val/dead_code_share"] <= 1.0
    assert metrics["val/psnr"] > 0


def test_perceptual_loss_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="vgg16"):
        tiny_stage_a(perceptual_weight=0.1)


TOY_FIT = ["fit", "-c", "experiments/stage_a.yaml", "-c", "experiments/toy/stage_a.yaml"]


def test_cli_fast_dev_run(shapes_dir, in_tmp_cwd):
    assert main([*TOY_FIT, "--trainer.fast_dev_run=2", *toy_data_args(shapes_dir)]) == 0


def test_cli_fit_saves_config_checkpoints_and_images(shapes_dir, in_tmp_cwd):
    override = in_tmp_cwd / "often.yaml"
    override.write_text("image_logger:\n  every_n_steps: 2\n")  # one value of a named callback group
    code = main(
        [
            *TOY_FIT,
            "-c",
            str(override),
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=4",
            "--data.init_args.train_batches_per_epoch=4",
            "--trainer.logger.init_args.version=test",
            "--model.init_args.vqgan.channels=[16,32]",
            "--trainer.log_every_n_steps=2",
            *toy_data_args(shapes_dir),
        ]
    )
    assert code == 0
    run = in_tmp_cwd / "outputs" / "toy_stage_a" / "test"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "images" / "train_step0000002.png").is_file()
    assert (run / "images" / "val_step0000004.png").is_file()
    vqgan = load_stage_a(run / "checkpoints" / "last.ckpt")
    assert vqgan.config.channels == [16, 32]
    # the common callbacks the toy config did not mention are still there: the learning rate is logged
    events = EventAccumulator(str(next(run.glob("events.out.tfevents.*"))))
    events.Reload()
    assert "lr-AdamW" in events.Tags()["scalars"]


def test_perceptual_loss_reads_the_cached_backbone_offline(tmp_path, monkeypatch):
    """LPIPS through torchmetrics' public metric: the backbone file in torch's hub cache is all it needs offline."""
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    path = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)  # random stand-in weights
    loss = PerceptualLoss("squeeze")
    images = torch.rand(2, 3, 32, 32)
    assert loss(images, images).item() == pytest.approx(0.0, abs=1e-6)
    reconstruction = (images + 0.2 * torch.randn_like(images)).clamp(0, 1).requires_grad_(True)
    value = loss(reconstruction, images)
    value.backward()
    assert value.item() > 0 and reconstruction.grad.abs().sum() > 0
    assert loss(reconstruction.detach(), images).item() == pytest.approx(value.item(), rel=1e-5)  # no state kept
    overshoot = (images * 1.4 - 0.2).requires_grad_(True)  # a VQGAN in training reconstructs outside [0, 1]
    value = loss(overshoot, images)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0 and overshoot.grad.abs().sum() > 0
