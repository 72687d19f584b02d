"""Stage A LightningModule: trains the f4 VQGAN (reconstruction + VQ + optional perceptual and adversarial losses)."""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..flops import measure_training_flops
from ..losses import PerceptualLoss, hinge_discriminator_loss, hinge_generator_loss
from ..metrics import CodebookUsage
from ..models.vqgan import VQGAN, PatchDiscriminator, VQGANConfig
from ..records import StageARecord
from .base import OptimizerConfig, Stage, as_dataclass


class StageA(Stage):
    """Trains the VQGAN with manual optimisation (generator and discriminator optimisers).

    Args:
        vqgan: network sizes.
        optimizer: AdamW settings of the VQGAN (and of the discriminator unless ``discriminator_lr`` is set).
        reconstruction_loss: "mse" (paper) or "l1".
        vq_weight: weight of codebook + 0.25 x commitment loss.
        skip_quantization_prob: per-sample probability that the decoder sees the continuous latent
            (paper: 0.1), so it also decodes the unquantised latents Stage B produces.
        perceptual_weight: LPIPS weight (paper 0.1; 0 disables and loads nothing).
        perceptual_net: LPIPS backbone ("vgg", "alex", "squeeze"); its ImageNet weights are read from torch's hub
            cache (``$TORCH_HOME/hub/checkpoints``), offline and missing fails at once naming the file.
        adversarial_weight: hinge GAN loss weight for the generator (paper 0.01; 0 disables the discriminator).
        adversarial_start_step: step from which the discriminator trains and the adversarial loss applies (paper 10k).
        compile: ``torch.compile`` the trained networks (block by block under FSDP): the first steps compile,
            later ones run faster; losses equal eager's (tested) except that compiled dropout draws other masks.
    """

    stage = "A"

    def __init__(
        self,
        vqgan: VQGANConfig = VQGANConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        reconstruction_loss: Literal["mse", "l1"] = "mse",
        vq_weight: float = 1.0,
        skip_quantization_prob: float = 0.1,
        perceptual_weight: float = 0.0,
        perceptual_net: Literal["vgg", "alex", "squeeze"] = "vgg",
        adversarial_weight: float = 0.0,
        adversarial_start_step: int = 10_000,
        discriminator_channels: int = 64,
        discriminator_layers: int = 3,
        discriminator_lr: float | None = None,
        num_logged_images: int = 8,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        vqgan = as_dataclass(VQGANConfig, vqgan)
        self.optimizer_config = as_dataclass(OptimizerConfig, optimizer)
        self.store_plain_hparams(vqgan=vqgan, optimizer=self.optimizer_config)
        self.vqgan = VQGAN(vqgan)
        self.discriminator = (
            PatchDiscriminator(discriminator_channels, discriminator_layers) if adversarial_weight > 0 else None
        )
        # The frozen LPIPS network is a loss, not part of the model.
        self.perceptual_loss = None
        if perceptual_weight > 0:
            self.freeze("perceptual_loss", PerceptualLoss(perceptual_net))
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_psnr_unquantized = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_codebook = CodebookUsage(vqgan.codebook_size)

    @classmethod
    def image_multiple(cls, init_args: dict) -> int:
        """Image sides this stage can encode and decode are multiples of this (checked before anything is built)."""
        return as_dataclass(VQGANConfig, init_args.get("vqgan") or {}).downsampling

    def trained_networks(self) -> dict[str, nn.Module]:
        return {"vqgan": self.vqgan}  # the discriminator is a training aid: not averaged, not read by Stage B

    def configure_optimizers(self):
        config = self.optimizer_config
        scaled = self.scaled_gradients  # 16-mixed: see OptimizerConfig.use_fused
        optimizer, scheduler = config.build(
            self.vqgan.parameters(), total_steps=self.trainer.max_steps, scaled_gradients=scaled
        )
        if self.discriminator is None:
            return [optimizer], [scheduler]
        d_optimizer, d_scheduler = config.build(
            self.discriminator.parameters(),
            self.hparams.discriminator_lr,
            total_steps=self.trainer.max_steps,
            scaled_gradients=scaled,
        )
        return [optimizer, d_optimizer], [scheduler, d_scheduler]

    def _reconstruction_loss(self, reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.reconstruction_loss == "l1":
            return F.l1_loss(reconstruction, images)
        return F.mse_loss(reconstruction, images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        images = batch["image"]
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]

        skip = torch.rand(images.shape[0], device=images.device) < hp.skip_quantization_prob
        out = self.vqgan(images, skip_quantization=skip)
        reconstruction = out["reconstruction"]
        reconstruction_loss = self._reconstruction_loss(reconstruction, images)
        loss = reconstruction_loss + hp.vq_weight * out["vq_loss"]
        logs = {"train/reconstruction_loss": reconstruction_loss, "train/vq_loss": out["vq_loss"]}

        if self.perceptual_loss is not None:
            perceptual = self.perceptual_loss(reconstruction.float(), images.float())
            loss = loss + hp.perceptual_weight * perceptual
            logs["train/perceptual_loss"] = perceptual

        total = loss
        adversarial = self.discriminator is not None and self.global_step >= hp.adversarial_start_step
        if adversarial:
            # One backward for both players: the generator term sees the discriminator frozen, the
            # discriminator term sees detached reconstructions (works unchanged under DDP).
            self.discriminator.requires_grad_(False)
            generator_adversarial = hinge_generator_loss(self.discriminator(reconstruction))
            self.discriminator.requires_grad_(True)
            discriminator_loss = hinge_discriminator_loss(
                self.discriminator(images), self.discriminator(reconstruction.detach())
            )
            loss = loss + hp.adversarial_weight * generator_adversarial
            total = loss + discriminator_loss
            logs["train/generator_adversarial_loss"] = generator_adversarial
            logs["train/discriminator_loss"] = discriminator_loss
        elif self.discriminator is not None:
            # Zero-valued touch of every discriminator parameter, so DDP finds no unused parameters.
            total = loss + sum(p.sum() for p in self.discriminator.parameters()) * 0.0

        generator_optimizer, *discriminator_optimizers = optimizers
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(total)
        self.divergence.last_loss = loss.detach()
        parameters = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        if not self.gradients_are_finite(parameters):
            for p in parameters:
                p.grad = None  # the optimisers below then leave every weight alone: the step is skipped
        grad_clip = self.optimizer_config.grad_clip
        if grad_clip:
            self.clip_gradients(generator_optimizer, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm")
        generator_optimizer.step()
        if adversarial:
            (discriminator_optimizer,) = discriminator_optimizers
            if grad_clip:
                self.clip_gradients(
                    discriminator_optimizer, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm"
                )
            # Raw step: Lightning counts every LightningOptimizer.step in global_step; global_step counts batches.
            discriminator_optimizer.optimizer.step()
        for scheduler in schedulers[: 1 + adversarial]:
            scheduler.step()

        self.log_dict(logs, prog_bar=False, batch_size=images.shape[0])
        self.log_training(loss, images.shape[0])
        return loss

    # --- FLOPs (perf/tflops_per_sec, the model summary) ----------------------------------------------------------
    def _adversarial(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.adversarial_start_step

    @property
    def training_flops_phase(self) -> bool:
        """Whether the discriminator trains at this step: the step's FLOPs change at ``adversarial_start_step``, and
        :class:`lit_wuerstchen.callbacks.PerfMonitor` counts them again when this value changes."""
        return self._adversarial()

    def training_flops(self, batch: dict) -> int:
        """Model FLOPs of one training step on ``batch``, as :meth:`training_step` computes it: the VQGAN's forward
        and backward (the quantiser's code distances included); with ``perceptual_weight`` the frozen LPIPS
        network's forward on both images and its backward to the reconstruction (the VQGAN's gradient flows
        through it: not an input that could be cached, unlike Stage B's frozen Stage A); from
        ``adversarial_start_step`` the discriminator's three forwards and their backwards. Counted with
        :func:`lit_wuerstchen.flops.measure_training_flops` on meta-device copies (no memory, no compute)."""
        hp, shape = self.hparams, tuple(batch["image"].shape)
        with torch.device("meta"):
            vqgan = VQGAN(self.vqgan.config)
            discriminator = None
            if self._adversarial():
                discriminator = PatchDiscriminator(hp.discriminator_channels, hp.discriminator_layers)
            images, skip = torch.empty(shape), torch.zeros(shape[0], dtype=torch.bool)
        lpips = None
        if self.perceptual_loss is not None:  # torchmetrics' LPIPS network (its metric wrapper checks values)
            lpips = copy.deepcopy(self.perceptual_loss.metric.net).to("meta")

        def step() -> torch.Tensor:
            out = vqgan(images, skip_quantization=skip)
            reconstruction = out["reconstruction"]
            loss = self._reconstruction_loss(reconstruction, images) + out["vq_loss"]
            if lpips is not None:
                loss = loss + lpips(reconstruction.float(), images.float(), normalize=True).mean()
            if discriminator is not None:
                discriminator.requires_grad_(False)
                loss = loss + hinge_generator_loss(discriminator(reconstruction))
                discriminator.requires_grad_(True)
                loss = loss + hinge_discriminator_loss(discriminator(images), discriminator(reconstruction.detach()))
            return loss

        return measure_training_flops(step, lambda loss: loss)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        return self.vqgan.decode(self.vqgan.encode(images, quantize=quantize)).clamp(0, 1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        latent = self.vqgan.encode(images)
        indices = self.vqgan.quantizer.indices(latent)
        reconstruction = self.vqgan.decode(self.vqgan.quantizer.lookup(indices).to(latent.dtype)).float().clamp(0, 1)
        reconstruction_unquantized = self.vqgan.decode(latent).float().clamp(0, 1)
        images = images.float()
        self.val_psnr.update(reconstruction, images)
        self.val_psnr_unquantized.update(reconstruction_unquantized, images)
        self.val_ssim.update(reconstruction, images)
        self.val_codebook.update(indices)
        self.log(
            "val/reconstruction_loss", F.mse_loss(reconstruction, images), batch_size=images.shape[0], sync_dist=True
        )

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True)
        self.log("val/psnr_unquantized", self.val_psnr_unquantized.compute())
        self.log("val/ssim", self.val_ssim.compute())
        usage = self.val_codebook.compute()
        self.log("val/codebook_perplexity", usage["perplexity"])
        self.log("val/dead_code_share", usage["dead_code_share"])
        for metric in (self.val_psnr, self.val_psnr_unquantized, self.val_ssim, self.val_codebook):
            metric.reset()
        self.log_data_errors("val")

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"key": batch["key"], "reconstruction": self.reconstruct(batch["image"])}

    def evaluation_images(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.reconstruct(batch["image"])

    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"][: self.hparams.num_logged_images]
        return {"input": images, "reconstruction": self.reconstruct(images)}

    def checkpoint_record(self) -> StageARecord:
        return StageARecord(vqgan=self.vqgan.config)
