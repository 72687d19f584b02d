"""Stage B LightningModule: the diffusion decoder and the semantic compressor, trained together on a frozen Stage A."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..checkpoints import build_compressor, load_stage_a, read_stage_checkpoint
from ..diffusion import DiffusionConfig, SamplingConfig, decoder_sampling
from ..generation import decode_stage_a, sample_stage_b
from ..models.compressor import CompressorConfig
from ..models.diffnext import DiffNeXt, DiffNeXtConfig, perturb_semantic
from ..models.vqgan import VQGANConfig
from .base import DiffusionStage, OptimizerConfig, as_dataclass


class StageB(DiffusionStage):
    """Trains the Stage B decoder and the semantic compressor jointly; Stage A is loaded frozen.

    Args:
        stage_a_checkpoint: Stage A checkpoint (its EMA weights are used when present). Stage A travels inside
            Stage B's checkpoints, so later stages need only those.
        compression: image side / semantic latent side (docs/design.md "Semantic compressor"); the compressor
            resizes the image to ``round(side / compression) * stride``. THE ablation knob.
        network / compressor / diffusion / optimizer: component settings.
        semantic_drop_prob: per-sample probability that the semantic latent is zeroed (for guidance).
        semantic_noise_prob / semantic_noise_std: occasional Gaussian noise on the semantic latent, so the
            decoder tolerates imperfect Stage C outputs.
        validation_sampling: sampler, steps and guidance of the full decode run at validation.
    """

    stage = "B"

    def __init__(
        self,
        stage_a_checkpoint: str,
        compression: float = 42.67,
        network: DiffNeXtConfig = DiffNeXtConfig(),
        compressor: CompressorConfig = CompressorConfig(),
        diffusion: DiffusionConfig = DiffusionConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10_000),
        semantic_drop_prob: float = 0.05,
        semantic_noise_prob: float = 0.1,
        semantic_noise_std: float = 0.1,
        validation_sampling: SamplingConfig = decoder_sampling(),
        num_logged_images: int = 8,
    ):
        super().__init__(diffusion, validation_sampling)
        self.save_hyperparameters()
        network = as_dataclass(DiffNeXtConfig, network)
        compressor = as_dataclass(CompressorConfig, compressor)
        self.optimizer_config = as_dataclass(OptimizerConfig, optimizer)
        self.store_plain_hparams(
            network=network,
            compressor=compressor,
            diffusion=self.diffusion_config,
            optimizer=self.optimizer_config,
            validation_sampling=self.sampling_config,
        )
        if compressor.latent_channels != network.semantic_channels:
            raise ValueError(
                f"compressor.latent_channels ({compressor.latent_channels}) and network.semantic_channels "
                f"({network.semantic_channels}) must agree: the decoder reads the compressor's latent"
            )

        stage_a = self.freeze("stage_a", load_stage_a(stage_a_checkpoint, needed_by="Stage B"), persistent=True)
        if stage_a.config.latent_channels != network.latent_channels:
            raise ValueError(
                f"Stage A at {stage_a_checkpoint} makes {stage_a.config.latent_channels}-channel latents, "
                f"but network.latent_channels is {network.latent_channels}"
            )
        self.compressor = build_compressor(compressor, compression)
        self.decoder = DiffNeXt(network)

        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_psnr_stage_a = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    @classmethod
    def image_multiple(cls, init_args: dict) -> int:
        """Image sides Stage A encodes and the decoder's U-Net divides are multiples of this (checked before anything
        is built; the Stage A checkpoint is read, not loaded)."""
        _, record = read_stage_checkpoint(init_args["stage_a_checkpoint"], "A", needed_by="Stage B")
        network = as_dataclass(DiffNeXtConfig, init_args.get("network") or {})
        return VQGANConfig(**record["vqgan"]).downsampling * network.divisor

    def trained_networks(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder, "compressor": self.compressor}

    def checkpoint_configs(self) -> dict[str, Any]:
        return {
            "decoder": self.decoder.config,
            "compressor": self.compressor.config,
            "compression": self.compressor.compression,
            "stage_a": self.stage_a.config,
            "diffusion": self.diffusion_config,
            "sampling": self.sampling_config,
        }

    # --- the two encoders ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_stage_a(self, images: torch.Tensor) -> torch.Tensor:
        """The training target: Stage A's *unquantised* latent, times its scale factor."""
        return self.stage_a.encode(images) * self.stage_a.scale_factor

    @torch.no_grad()
    def decode_stage_a(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_stage_a(self.stage_a, latents)

    # --- training -------------------------------------------------------------------------------------------
    def denoiser(self) -> nn.Module:
        return self.decoder

    # --- the cache: Stage A's latents; the image stays (the compressor trains on it) ----------------------------
    cache_keeps_image = True

    def cache_models(self) -> dict[str, nn.Module]:
        return {"stage_a": self.stage_a}

    @torch.no_grad()
    def cache_entries(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"latent": self.encode_stage_a(images)}

    def diffusion_inputs(self, batch: dict, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage A latents to denoise (from the cache when the batch has them), conditioned on the compressor's
        semantic latent (dropped or noised now and then in training)."""
        images = batch["image"]
        cached = batch.get("cache")
        latents = cached["latent"].float() if cached is not None else self.encode_stage_a(images)
        semantic = self.compressor(images)
        if train:
            hp = self.hparams
            semantic = perturb_semantic(semantic, hp.semantic_drop_prob, hp.semantic_noise_prob, hp.semantic_noise_std)
        return latents, {"semantic": semantic}

    # --- sampling -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """image -> compressor -> Stage B sampling -> Stage A decode."""
        return sample_stage_b(
            self.decoder,
            self.stage_a,
            self.compressor(images),
            tuple(images.shape[-2:]),
            self.diffusion,
            self.sampling_config,
            generator,
        )

    # --- validation -----------------------------------------------------------------------------------------
    def validation_samples(self, batch: dict, generator: torch.Generator) -> None:
        images = batch["image"]
        reconstruction = self.reconstruct(images, generator=generator)
        images = images.float()
        self.val_psnr.update(reconstruction, images)
        self.val_ssim.update(reconstruction, images)
        self.val_psnr_stage_a.update(self.decode_stage_a(self.encode_stage_a(images)), images)

    def on_validation_epoch_end(self) -> None:
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True)
        self.log("val/ssim", self.val_ssim.compute())
        self.log("val/psnr_stage_a", self.val_psnr_stage_a.compute())  # the ceiling Stage B can reach
        for metric in (self.val_psnr, self.val_ssim, self.val_psnr_stage_a):
            metric.reset()
        super().on_validation_epoch_end()

    def evaluation_images(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.reconstruct(batch["image"], generator)

    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"][: self.hparams.num_logged_images]
        generator = torch.Generator(device=images.device).manual_seed(0)
        semantic = self.compressor(images)
        # First three semantic channels, min-max scaled, as a picture of the tiny latent.
        low, high = semantic.amin(dim=(2, 3), keepdim=True), semantic.amax(dim=(2, 3), keepdim=True)
        semantic_view = ((semantic - low) / (high - low + 1e-6))[:, :3]
        return {
            "input": images,
            "stage_a": self.decode_stage_a(self.encode_stage_a(images)),
            "semantic": semantic_view,
            "stage_b": self.reconstruct(images, generator=generator),
        }
