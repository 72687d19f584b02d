"""Stage B LightningModule: the diffusion decoder and the semantic compressor, trained together on a frozen Stage A."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..checkpoints import (
    build_compressor,
    load_stage_a,
    load_stage_b_networks,
    load_text_encoder,
    read_stage_checkpoint,
)
from ..diffusion import DiffusionConfig, SamplingConfig, decoder_sampling
from ..flops import measure_training_flops
from ..generation import decode_stage_a, sample_stage_b
from ..lora import LoraSettings, inject_lora
from ..models.compressor import CompressorConfig, SemanticCompressor
from ..models.diffnext import DiffNeXt, DiffNeXtConfig, perturb_semantic
from ..models.text_encoder import TextEncoderConfig
from ..records import StageBRecord
from .base import DiffusionStage, OptimizerConfig, as_dataclass, lora_settings, network_from_init


class StageB(DiffusionStage):
    """Trains the Stage B decoder and the semantic compressor jointly; Stage A is loaded frozen.

    Args:
        stage_a_checkpoint: Stage A checkpoint (its EMA weights are used when present). Stage A travels inside
            Stage B's checkpoints, so later stages need only those.
        compression: image side / semantic latent side (docs/design.md "Semantic compressor"); the compressor
            resizes the image to ``round(side / compression) * stride``. THE ablation knob.
        network / compressor / diffusion / optimizer: component settings. ``network`` / ``compressor`` None: the
            ``init_checkpoint``'s when one is given, else the defaults (the released v2 sizes).
        semantic_drop_prob: per-sample probability that the semantic latent is zeroed (for guidance).
        semantic_noise_prob / semantic_noise_std: occasional Gaussian noise on the semantic latent, so the
            decoder tolerates imperfect Stage C outputs.
        validation_sampling: sampler, steps and guidance of the full decode run at validation.
        text_encoder: the frozen text encoder of a text-conditioned decoder (``network.text_channels > 0``; the
            released v2 decoder reads CLIP ViT-H-14 hidden states); None without text conditioning, or with an
            ``init_checkpoint``, the text encoder recorded there.
        caption_drop_prob: captions replaced by "" in training (the unconditional prompt of guidance).
        init_checkpoint: a Stage B checkpoint whose decoder and compressor (EMA weights when present) this run
            starts from (fine-tuning; not a resume: fresh optimiser, step 0). A ``network`` / ``compressor`` given
            must equal its configs (``compressor.pretrained`` aside: the weights come from the checkpoint).
        lora: LoRA adapters on the decoder (``rank > 0``; needs ``init_checkpoint``): the decoder's weights stay
            frozen and only the adapters are trained, averaged and saved; the compressor is frozen too (the
            init checkpoint's, in eval mode) and not saved (docs/finetune.md).
        compile: ``torch.compile`` the trained networks (block by block under FSDP): the first steps compile,
            later ones run faster; losses equal eager's (tested) except that compiled dropout draws other masks.
    """

    stage = "B"

    def __init__(
        self,
        stage_a_checkpoint: str,
        compression: float = 42.67,
        network: DiffNeXtConfig | None = None,
        compressor: CompressorConfig | None = None,
        diffusion: DiffusionConfig = DiffusionConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10_000),
        semantic_drop_prob: float = 0.05,
        semantic_noise_prob: float = 0.1,
        semantic_noise_std: float = 0.1,
        validation_sampling: SamplingConfig = decoder_sampling(),
        num_logged_images: int = 8,
        text_encoder: TextEncoderConfig | None = None,
        caption_drop_prob: float = 0.05,
        init_checkpoint: str | None = None,
        lora: LoraSettings = LoraSettings(),
        compile: bool = False,
    ):
        super().__init__(diffusion, validation_sampling)
        self.save_hyperparameters()
        self.lora_config = lora_settings(lora, init_checkpoint)
        network = as_dataclass(DiffNeXtConfig, network)
        compressor = as_dataclass(CompressorConfig, compressor)
        init = None
        if init_checkpoint is not None:
            init = load_stage_b_networks(init_checkpoint, needed_by="init_checkpoint")  # (decoder, compressor)
            if text_encoder is None:  # the text encoder the init decoder was trained (or converted) with
                text_encoder = read_stage_checkpoint(init_checkpoint, "B", needed_by="init_checkpoint")[1].text_encoder
            network = network_from_init(network, init[0].config, init_checkpoint, "network")
            compressor = network_from_init(
                compressor, init[1].config, init_checkpoint, "compressor", ignore=("pretrained",)
            )
        network, compressor = network or DiffNeXtConfig(), compressor or CompressorConfig()
        self.optimizer_config = as_dataclass(OptimizerConfig, optimizer)
        self.store_plain_hparams(
            network=network,
            compressor=compressor,
            diffusion=self.diffusion_config,
            optimizer=self.optimizer_config,
            validation_sampling=self.sampling_config,
            lora=self.lora_config,
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
        self.text_encoder_config = as_dataclass(TextEncoderConfig, text_encoder) if text_encoder else None
        self.text_encoder = None
        if network.text_channels and self.text_encoder_config is None:
            raise ValueError(
                f"network.text_channels is {network.text_channels}: this decoder is text-conditioned and needs "
                "model.init_args.text_encoder (the released v2 decoder: ViT-H-14, laion2b_s32b_b79k)"
            )
        if self.text_encoder_config is not None:
            if not network.text_channels:
                raise ValueError("text_encoder is set but network.text_channels is 0: the decoder would ignore it")
            # A randomly initialised text encoder (toy runs) travels with the checkpoint.
            self.text_encoder = self.freeze(
                "text_encoder",
                load_text_encoder(self.text_encoder_config),
                persistent=self.text_encoder_config.random_init,
            )
            if self.text_encoder.width != network.text_channels:
                raise ValueError(
                    f"network.text_channels is {network.text_channels}, but the text encoder "
                    f"{self.text_encoder_config.model_name} gives {self.text_encoder.width}-wide hidden states"
                )
        if init is None:
            compressor_network = build_compressor(compressor, compression)
            self.decoder = DiffNeXt(network)
        else:  # its weights come from init_checkpoint
            compressor_network = SemanticCompressor(dataclasses.replace(compressor, pretrained=False), compression)
            compressor_network.load_state_dict(init[1].state_dict())
            self.decoder = init[0].train().requires_grad_(True)
        if self.lora_config.enabled:
            self.freeze("compressor", compressor_network)
            self.add_lora("decoder", self.lora_config)
        else:
            self.compressor = compressor_network

        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_psnr_stage_a = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    @classmethod
    def image_multiple(cls, init_args: dict) -> int:
        """Image sides Stage A encodes and the decoder's U-Net divides are multiples of this (checked before anything
        is built; the Stage A checkpoint is read, not loaded)."""
        _, record = read_stage_checkpoint(init_args["stage_a_checkpoint"], "A", needed_by="Stage B")
        network = init_args.get("network")
        if network is None and init_args.get("init_checkpoint"):  # the decoder of the checkpoint it starts from
            _, init_record = read_stage_checkpoint(init_args["init_checkpoint"], "B", needed_by="init_checkpoint")
            network = init_record.decoder
        network = as_dataclass(DiffNeXtConfig, network or {})
        return record.vqgan.downsampling * network.divisor

    def trained_networks(self) -> dict[str, nn.Module]:
        if self.lora_config.enabled:  # the compressor is frozen (the adapters are the decoder's)
            return {"decoder": self.decoder}
        return {"decoder": self.decoder, "compressor": self.compressor}

    def checkpoint_record(self) -> StageBRecord:
        return StageBRecord(
            decoder=self.decoder.config,
            compressor=self.compressor.config,
            compression=self.compressor.compression,
            stage_a=self.stage_a.config,
            diffusion=self.diffusion_config,
            sampling=self.sampling_config,
            text_encoder=self.text_encoder_config,
            init_checkpoint=str(self.hparams.init_checkpoint) if self.hparams.init_checkpoint else None,
            lora=self.lora_config if self.lora_config.enabled else None,
        )

    # --- the two encoders ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_stage_a(self, images: torch.Tensor) -> torch.Tensor:
        """The training target: Stage A's *unquantised* latent, in Stage B's scale."""
        return self.stage_a.to_stage_b(self.stage_a.encode(images))

    @torch.no_grad()
    def decode_stage_a(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_stage_a(self.stage_a, latents)

    # --- training -------------------------------------------------------------------------------------------
    def denoiser(self) -> nn.Module:
        return self.decoder

    def training_flops(self, batch: dict) -> int:
        """Forward + backward FLOPs of one training step on ``batch``: the decoder and the compressor it is trained
        with, counted with torch's ``FlopCounterMode`` on meta-device copies (no memory, no compute) fed meta inputs of
        the step's shapes. Stage A and the text encoder (frozen) are not counted, nor is the compressor when it is
        frozen (LoRA: then only the decoder's adapters get weight gradients)."""
        images = batch["image"]
        size, height, width = images.shape[0], *images.shape[-2:]
        downsampling, config = self.stage_a.config.downsampling, self.decoder.config
        with torch.device("meta"):
            decoder = DiffNeXt(config)
            compressor = SemanticCompressor(self.compressor.config, self.compressor.compression)
            if self.lora_config.enabled:
                inject_lora(decoder, self.lora_config)
            image, t = torch.empty(images.shape), torch.empty(size)
            x_t = torch.empty(size, config.latent_channels, height // downsampling, width // downsampling)
            semantic = torch.empty(size, compressor.latent_channels, *compressor.latent_size((height, width)))
            text = None
            if self.text_encoder is not None:
                text = torch.empty(size, self.text_encoder.context_length, self.text_encoder.width)

        def step() -> torch.Tensor:
            return decoder(x_t, t, semantic if self.lora_config.enabled else compressor(image), text)

        return measure_training_flops(step, torch.Tensor.sum)

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
        conditioning = {"semantic": semantic}
        if train:
            hp = self.hparams
            conditioning["semantic"] = perturb_semantic(
                semantic, hp.semantic_drop_prob, hp.semantic_noise_prob, hp.semantic_noise_std
            )
        if self.text_encoder is not None:
            captions = list(batch["caption"])
            if train and self.hparams.caption_drop_prob > 0:  # host-side draws: no device sync
                keep = (torch.rand(len(captions)) >= self.hparams.caption_drop_prob).tolist()
                captions = [c if k else "" for c, k in zip(captions, keep)]
            conditioning["text"] = self.text_encoder(captions)[0]
        return latents, conditioning

    # --- sampling -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None, captions: list[str] | None = None
    ) -> torch.Tensor:
        """image (and its caption, for a text-conditioned decoder) -> compressor -> Stage B sampling -> Stage A
        decode."""
        text = negative = None
        if self.text_encoder is not None:
            if captions is None:
                raise ValueError("this Stage B decoder is text-conditioned: reconstruct needs the captions")
            text = self.text_encoder(list(captions))[0]
            negative = self.text_encoder([""])[0]
        return sample_stage_b(
            self.decoder,
            self.stage_a,
            self.compressor(images),
            tuple(images.shape[-2:]),
            self.diffusion,
            self.sampling_config,
            generator,
            text=text,
            negative_text=negative,
        )

    # --- validation -----------------------------------------------------------------------------------------
    def validation_samples(self, batch: dict, generator: torch.Generator) -> None:
        images = batch["image"]
        reconstruction = self.reconstruct(images, generator=generator, captions=batch.get("caption"))
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
        return self.reconstruct(batch["image"], generator, batch.get("caption"))

    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        count = self.hparams.num_logged_images
        images = batch["image"][:count]
        captions = batch["caption"][:count] if "caption" in batch else None
        generator = torch.Generator(device=images.device).manual_seed(0)
        semantic = self.compressor(images)
        # First three semantic channels, min-max scaled, as a picture of the tiny latent.
        low, high = semantic.amin(dim=(2, 3), keepdim=True), semantic.amax(dim=(2, 3), keepdim=True)
        semantic_view = ((semantic - low) / (high - low + 1e-6))[:, :3]
        return {
            "input": images,
            "stage_a": self.decode_stage_a(self.encode_stage_a(images)),
            "semantic": semantic_view,
            "stage_b": self.reconstruct(images, generator=generator, captions=captions),
        }
