"""Stage C LightningModule: the text-conditional prior over semantic latents (Stages A, B, compressor frozen)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from ..diffusion import DiffusionConfig, SamplingConfig, diffusion_loss
from ..metrics import ShapesAlignment
from ..models.stage_c import StageC as StageCNetwork
from ..pipeline import WuerstchenPipeline
from ..text_encoder import TextEncoder
from .base import OptimizerConfig, Stage, as_dataclass
from .stage_b import load_stage_b

# Würstchen v2 fed Stage C with (x + 1) / 42 and sampling undid it with x * 42 - 1.
V2_LATENT_MEAN, V2_LATENT_STD = -1.0, 42.0


@dataclass
class StageCConfig:
    """Sizes of the prior (defaults: released Würstchen v2, ~994M parameters; the paper: 1280 wide, 16 deep)."""

    width: int = 1536
    depth: int = 32
    heads: int = 24
    r_embedding_dim: int = 64
    dropout: float = 0.1
    kernel_size: int = 3


@dataclass
class TextEncoderConfig:
    """open_clip text tower: a pretrained tag (downloaded into the HF cache) or a local weights file."""

    model_name: str = "ViT-bigG-14"
    pretrained: str | None = "laion2b_s39b_b160k"
    weights_file: str | None = None
    model_config_file: str | None = None
    final_layer_norm: bool = True
    """Token states after the final LayerNorm (Würstchen v2) or before it (Stable Cascade)."""
    context_length: int | None = None
    """Tokens per prompt (None: the model's own, 77 for CLIP); short captions can use fewer."""


class StageC(Stage):
    """Trains the prior on the frozen compressor's semantic latents, conditioned on CLIP text hidden states.

    Args:
        stage_b_checkpoint: the Stage B checkpoint; its compressor (EMA) makes the training targets, and its
            decoder and Stage A decode validation samples. Sampling later finds Stage B through this path.
        latent_normalization: how semantic latents are scaled for the prior: "v2" (``(x + 1) / 42``, the released
            model) or "measured" (per-channel mean/std over ``normalization_batches`` training batches, measured
            once at the start of training and stored in the checkpoint).
        caption_drop_prob: captions replaced by "" (the unconditional prompt for classifier-free guidance).
        validation_sampling / decoder_sampling: Stage C and Stage B sampling for validation images.
    """

    def __init__(
        self,
        stage_b_checkpoint: str,
        network: StageCConfig = StageCConfig(),
        text_encoder: TextEncoderConfig = TextEncoderConfig(),
        diffusion: DiffusionConfig = DiffusionConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10_000),
        caption_drop_prob: float = 0.05,
        latent_normalization: Literal["v2", "measured"] = "v2",
        normalization_batches: int = 20,
        validation_sampling: SamplingConfig = SamplingConfig(t_list="stage_c_default", guidance_scale=4.0),
        decoder_sampling: SamplingConfig = SamplingConfig(steps=12),
        num_logged_images: int = 8,
    ):
        super().__init__()
        self.save_hyperparameters()
        network = as_dataclass(StageCConfig, network)
        text_encoder = as_dataclass(TextEncoderConfig, text_encoder)
        self.diffusion_config = as_dataclass(DiffusionConfig, diffusion)
        self.optimizer_config = as_dataclass(OptimizerConfig, optimizer)
        self.sampling_config = as_dataclass(SamplingConfig, validation_sampling)
        self.decoder_sampling_config = as_dataclass(SamplingConfig, decoder_sampling)
        self.store_plain_hparams(
            network=network, text_encoder=text_encoder, diffusion=self.diffusion_config,
            optimizer=self.optimizer_config, validation_sampling=self.sampling_config,
            decoder_sampling=self.decoder_sampling_config,
        )

        decoder, compressor, stage_a, b_hparams = load_stage_b(stage_b_checkpoint)
        self.compression = float(b_hparams["compression"])
        self.decoder_diffusion = DiffusionConfig(**b_hparams["diffusion"])
        for name, module in (("compressor", compressor), ("decoder", decoder), ("stage_a", stage_a),
                             ("text_encoder", TextEncoder(**asdict(text_encoder)))):
            self.hold_frozen(name, module)
        self.text_encoder_is_random = text_encoder.pretrained is None and text_encoder.weights_file is None

        self.prior = StageCNetwork(latent_channels=compressor.latent_channels, text_channels=self.text_encoder.width,
                                   **asdict(network))
        self.schedule, self.t_sampler, self.target, self.loss_weight = self.diffusion_config.build()
        channels = compressor.latent_channels
        v2 = latent_normalization == "v2"
        self.register_buffer("latent_mean", torch.full((channels,), V2_LATENT_MEAN if v2 else 0.0))
        self.register_buffer("latent_std", torch.full((channels,), V2_LATENT_STD if v2 else 1.0))
        self.register_buffer("normalization_ready", torch.tensor(v2))
        self.val_alignment = ShapesAlignment()
        self.image_size: tuple[int, int] | None = None

    def ema_network(self) -> nn.Module:
        return self.prior

    # --- semantic latents -----------------------------------------------------------------------------------
    @torch.no_grad()
    def semantic_latents(self, images: torch.Tensor) -> torch.Tensor:
        """The prior's training targets: the frozen compressor's latents, normalised."""
        semantic = self.compressor(images)
        return (semantic - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    @torch.no_grad()
    def measure_normalization(self, dataloader) -> None:
        """Per-channel mean/std of the compressor's latents over a few batches (all ranks contribute)."""
        total = torch.zeros(self.compressor.latent_channels, dtype=torch.float64, device=self.device)
        total_sq, count = torch.zeros_like(total), torch.zeros((), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(dataloader):
            if index >= self.hparams.normalization_batches:
                break
            batch = self.trainer.datamodule.on_before_batch_transfer(batch, 0) if self.trainer.datamodule else batch
            semantic = self.compressor(batch["image"].to(self.device)).double()
            total += semantic.sum(dim=(0, 2, 3))
            total_sq += semantic.pow(2).sum(dim=(0, 2, 3))
            count += semantic.shape[0] * semantic.shape[2] * semantic.shape[3]
        total, total_sq, count = (self.trainer.strategy.reduce(x, reduce_op="sum") for x in (total, total_sq, count))
        mean = total / count
        self.latent_mean.copy_(mean.float())
        self.latent_std.copy_((total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt().float())
        self.normalization_ready.fill_(True)

    def on_train_start(self) -> None:
        if not bool(self.normalization_ready):
            self.measure_normalization(self.trainer.datamodule.train_dataloader())
            self.print(f"semantic latent normalisation measured: mean {self.latent_mean.mean():.3f}, "
                       f"std {self.latent_std.mean():.3f} (averaged over channels)")

    # --- training -------------------------------------------------------------------------------------------
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        hidden, _ = self.text_encoder(list(captions))
        return hidden

    def diffusion_loss(self, images, captions, drop_captions: bool, generator=None) -> torch.Tensor:
        """``generator`` (on the images' device) fixes t and the noise, for a comparable validation loss."""
        if drop_captions and self.hparams.caption_drop_prob > 0:
            # Host-side random numbers: no device sync in the training step.
            keep = torch.rand(len(captions)) >= self.hparams.caption_drop_prob
            captions = [caption if kept else "" for caption, kept in zip(captions, keep.tolist())]
        x0 = self.semantic_latents(images)
        text = self.encode_captions(captions)
        t = self.t_sampler(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        prediction = self.prior(self.schedule.add_noise(x0, t, noise), t, text)
        return diffusion_loss(prediction, self.target.target(x0, noise, t, self.schedule), self.loss_weight(t, self.schedule))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.image_size = tuple(batch["image"].shape[-2:])  # recorded in checkpoints: the default sampling size
        loss = self.diffusion_loss(batch["image"], batch["caption"], drop_captions=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log_data_errors("train")
        return loss

    # --- sampling -------------------------------------------------------------------------------------------
    def pipeline(self) -> WuerstchenPipeline:
        """The inference pipeline over this module's (current) networks; shares their weights."""
        return WuerstchenPipeline(
            self.text_encoder, self.prior, self.decoder, self.stage_a, self.compression, self.latent_mean,
            self.latent_std, self.diffusion_config, self.decoder_diffusion,
        ).to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], image_size: tuple[int, int], generator=None) -> torch.Tensor:
        was_training = self.prior.training
        self.prior.eval()
        try:
            return self.pipeline().generate(prompts, *image_size, self.sampling_config, self.decoder_sampling_config,
                                            generator=generator)
        finally:
            self.prior.train(was_training)

    # --- validation -----------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, captions = batch["image"], batch["caption"]
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self.diffusion_loss(images, captions, drop_captions=False, generator=generator)
        self.log("val/loss", loss, batch_size=len(captions), sync_dist=True)
        generated = self.generate(captions, tuple(images.shape[-2:]), generator)
        self.val_alignment.update(generated, captions)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_alignment.compute()
        if scores["count"] > 0:
            for name, value in scores.items():
                if name != "count":
                    self.log(f"val/align_{name}", value)
        self.val_alignment.reset()
        self.log_data_errors("val")

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    def evaluation_images(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.generate(batch["caption"], tuple(batch["image"].shape[-2:]), generator)

    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        count = self.hparams.num_logged_images
        images, captions = batch["image"][:count], batch["caption"][:count]
        generator = torch.Generator(device=images.device).manual_seed(0)
        return {"real": images, "generated": self.generate(captions, tuple(images.shape[-2:]), generator)}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """For ``predict`` with a PromptDataModule: one image per prompt; the batch's seed fixes the noise."""
        generator = torch.Generator(device=self.device).manual_seed(int(batch["seed"]))
        images = self.generate(batch["prompt"], (int(batch["height"]), int(batch["width"])), generator)
        return {**batch, "images": images}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.image_size is not None:
            checkpoint["image_size"] = list(self.image_size)
        if self.text_encoder_is_random:  # a randomly initialised text encoder must travel with the prior
            checkpoint["text_encoder_state_dict"] = {k: v.cpu() for k, v in self.text_encoder.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.image_size = tuple(checkpoint["image_size"]) if "image_size" in checkpoint else None
        if "text_encoder_state_dict" in checkpoint:
            self.text_encoder.load_state_dict(checkpoint["text_encoder_state_dict"])
