"""Stage C LightningModule: the text-conditional prior over semantic latents (Stages A, B, compressor frozen)."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.fabric.utilities import move_data_to_device
from torch import nn

from ..checkpoints import load_prior, load_stage_b, load_text_encoder, read_stage_checkpoint
from ..diffusion import DiffusionConfig, SamplingConfig, decoder_sampling, prior_sampling
from ..flops import measure_training_flops
from ..generation import PipelineConfig, WuerstchenPipeline
from ..lora import LoraSettings, inject_lora
from ..models.prior import Prior, PriorConfig
from ..models.text_encoder import TextEncoderConfig
from ..records import StageCRecord
from .base import DiffusionStage, OptimizerConfig, as_dataclass, lora_settings, network_from_init

# Würstchen v2 fed Stage C with (x + 1) / 42 and sampling undid it with x * 42 - 1.
V2_LATENT_MEAN, V2_LATENT_STD = -1.0, 42.0


class StageC(DiffusionStage):
    """Trains the prior on the frozen compressor's semantic latents, conditioned on CLIP text hidden states.

    Args:
        stage_b_checkpoint: the Stage B checkpoint; its compressor (EMA) makes the training targets, and its
            decoder and Stage A decode validation samples. Sampling later finds Stage B through this path.
        network: the prior; ``network.latent_channels`` must match the compressor's and ``network.text_channels``
            the text encoder's width. None: the ``init_checkpoint``'s prior when one is given, else the defaults
            (the released v2 sizes).
        text_encoder: the frozen text encoder. None: the ``init_checkpoint``'s when one is given (a converted
            release names the text model converted with it), else the defaults (CLIP ViT-bigG-14).
        latent_normalization: how semantic latents are scaled for the prior: "v2" (``(x + 1) / 42``, the released
            model) or "measured" (per-channel mean/std over ``normalization_batches`` training batches, measured
            once at the start of training and stored in the checkpoint).
        caption_drop_prob: captions replaced by "" (the unconditional prompt for classifier-free guidance).
        validation_sampling / decoder_sampling: Stage C and Stage B sampling for generated images.
        init_checkpoint: a Stage C checkpoint whose prior (EMA weights when present) and latent normalisation this
            run starts from (fine-tuning; not a resume: fresh optimiser, step 0). A ``network`` given must equal its
            prior's config.
        lora: LoRA adapters on the prior (``rank > 0``; needs ``init_checkpoint``): the prior's weights stay frozen,
            only the adapters are trained, averaged and saved (docs/finetune.md).
        compile: ``torch.compile`` the trained networks (block by block under FSDP): the first steps compile,
            later ones run faster; losses equal eager's (tested) except that compiled dropout draws other masks.
    """

    stage = "C"

    def __init__(
        self,
        stage_b_checkpoint: str,
        network: PriorConfig | None = None,
        text_encoder: TextEncoderConfig | None = None,
        diffusion: DiffusionConfig = DiffusionConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10_000),
        caption_drop_prob: float = 0.05,
        latent_normalization: Literal["v2", "measured"] = "v2",
        normalization_batches: int = 20,
        validation_sampling: SamplingConfig = prior_sampling(),
        decoder_sampling: SamplingConfig = decoder_sampling(),
        num_logged_images: int = 8,
        init_checkpoint: str | None = None,
        lora: LoraSettings = LoraSettings(),
        compile: bool = False,
    ):
        super().__init__(diffusion, validation_sampling)
        self.save_hyperparameters()
        self.lora_config = lora_settings(lora, init_checkpoint)
        network = as_dataclass(PriorConfig, network)
        init_prior = init_state = None
        if init_checkpoint is not None:
            init, init_record = read_stage_checkpoint(init_checkpoint, "C", needed_by="init_checkpoint")
            init_state = init["state_dict"]
            if text_encoder is None:  # the text encoder the init prior was trained (or converted) with
                text_encoder = init_record.text_encoder
            init_prior = load_prior(init_checkpoint, needed_by="init_checkpoint")
            network = network_from_init(network, init_prior.config, init_checkpoint, "network")
        network = network or PriorConfig()
        self.text_encoder_config = as_dataclass(TextEncoderConfig, text_encoder or TextEncoderConfig())
        self.optimizer_config = as_dataclass(OptimizerConfig, optimizer)
        self.decoder_sampling_config = as_dataclass(SamplingConfig, decoder_sampling)
        self.store_plain_hparams(
            network=network,
            text_encoder=self.text_encoder_config,
            diffusion=self.diffusion_config,
            optimizer=self.optimizer_config,
            validation_sampling=self.sampling_config,
            decoder_sampling=self.decoder_sampling_config,
            lora=self.lora_config,
        )

        stage_b = load_stage_b(stage_b_checkpoint, needed_by="Stage C")
        self.decoder_diffusion_config = stage_b.diffusion
        for name, module in (
            ("compressor", stage_b.compressor),
            ("decoder", stage_b.decoder),
            ("stage_a", stage_b.stage_a),
            ("decoder_text_encoder", stage_b.text_encoder),
        ):
            if module is not None:
                self.freeze(name, module)
        self.decoder_text_encoder = stage_b.text_encoder
        # A randomly initialised text encoder (toy runs) must travel with the prior: it is saved in the checkpoint.
        text_encoder = self.freeze(
            "text_encoder", load_text_encoder(self.text_encoder_config), persistent=self.text_encoder_config.random_init
        )
        if network.latent_channels != stage_b.compressor.latent_channels:
            raise ValueError(
                f"network.latent_channels is {network.latent_channels}, but the Stage B compressor "
                f"makes {stage_b.compressor.latent_channels}-channel latents"
            )
        if network.text_channels != text_encoder.width:
            raise ValueError(
                f"network.text_channels is {network.text_channels}, but the text encoder "
                f"{self.text_encoder_config.model_name} gives {text_encoder.width}-wide hidden states; "
                f"set model.init_args.network.text_channels: {text_encoder.width}"
            )
        self.prior = Prior(network) if init_prior is None else init_prior.train().requires_grad_(True)

        channels = network.latent_channels
        v2 = latent_normalization == "v2"
        self.register_buffer("latent_mean", torch.full((channels,), V2_LATENT_MEAN if v2 else 0.0))
        self.register_buffer("latent_std", torch.full((channels,), V2_LATENT_STD if v2 else 1.0))
        self.register_buffer("normalization_ready", torch.tensor(v2))
        if init_state is not None and bool(init_state.get("normalization_ready", False)):
            # the prior was trained on the init checkpoint's latent scale: it keeps it (latent_normalization aside)
            for name in ("latent_mean", "latent_std", "normalization_ready"):
                getattr(self, name).copy_(init_state[name])
        self.image_size: tuple[int, int] | None = None
        if self.lora_config.enabled:
            self.add_lora("prior", self.lora_config)

    @classmethod
    def image_multiple(cls, init_args: dict) -> int:
        """Image sides the Stage B decoder and its Stage A can make are multiples of this (checked before anything
        is built; the Stage B checkpoint is read, not loaded)."""
        _, record = read_stage_checkpoint(init_args["stage_b_checkpoint"], "B", needed_by="Stage C")
        return record.stage_a.downsampling * record.decoder.divisor

    def trained_networks(self) -> dict[str, nn.Module]:
        return {"prior": self.prior}

    def checkpoint_record(self) -> StageCRecord:
        return StageCRecord(
            prior=self.prior.config,
            text_encoder=self.text_encoder_config,
            stage_b_checkpoint=str(self.hparams.stage_b_checkpoint),
            init_checkpoint=str(self.hparams.init_checkpoint) if self.hparams.init_checkpoint else None,
            lora=self.lora_config if self.lora_config.enabled else None,
            diffusion=self.diffusion_config,
            sampling=self.sampling_config,
            decoder_sampling=self.decoder_sampling_config,
            image_size=list(self.image_size) if self.image_size is not None else None,
        )

    # --- the cache: text states and semantic latents; no image -----------------------------------------------
    def cache_models(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "compressor": self.compressor}

    @torch.no_grad()
    def cache_entries(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = self.text_encoder(captions)
        return {"text_hidden": hidden, "text_pooled": pooled, "semantic": self.compressor(images)}

    # --- semantic latents -----------------------------------------------------------------------------------
    @torch.no_grad()
    def raw_semantic(self, batch: dict) -> torch.Tensor:
        """The frozen compressor's latents of a batch's images (read from the cache when the batch has them)."""
        cached = batch.get("cache")
        return cached["semantic"].float() if cached is not None else self.compressor(batch["image"])

    @torch.no_grad()
    def semantic_latents(self, batch: dict) -> torch.Tensor:
        """The prior's training targets: the frozen compressor's latents, normalised."""
        semantic = self.raw_semantic(batch)
        return (semantic - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    @torch.no_grad()
    def text_states(self, batch: dict, keep: list[bool] | None) -> torch.Tensor:
        """The text encoder's hidden states of the captions (from the cache when the batch has them); captions whose
        ``keep`` is False are replaced by the empty prompt (classifier-free guidance)."""
        cached = batch.get("cache")
        if cached is None:
            captions = batch["caption"] if keep is None else [c if k else "" for c, k in zip(batch["caption"], keep)]
            return self.text_encoder(captions)[0]
        text = cached["text_hidden"].float()
        if keep is not None and not all(keep):
            dropped = torch.tensor([not k for k in keep], device=text.device)
            text = torch.where(dropped[:, None, None], self.empty_prompt_states().to(text.dtype), text)
        return text

    def empty_prompt_states(self) -> torch.Tensor:
        """The hidden states of "" ([1, L, W]), computed once: what a dropped caption becomes."""
        if getattr(self, "_empty_prompt", None) is None or self._empty_prompt.device != self.device:
            self._empty_prompt = self.text_encoder([""])[0]
        return self._empty_prompt

    @torch.no_grad()
    def measure_normalization(self, dataloader) -> None:
        """Per-channel mean/std of the compressor's latents over a few batches (all ranks contribute)."""
        total = torch.zeros(self.compressor.latent_channels, dtype=torch.float64, device=self.device)
        total_sq, count = torch.zeros_like(total), torch.zeros((), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(dataloader):
            if index >= self.hparams.normalization_batches:
                break
            with self.trainer.precision_plugin.forward_context():  # the frozen compressor may run in bf16
                semantic = self.raw_semantic(move_data_to_device(batch, self.device)).double()
            total += semantic.sum(dim=(0, 2, 3))
            total_sq += semantic.pow(2).sum(dim=(0, 2, 3))
            count += semantic.shape[0] * semantic.shape[2] * semantic.shape[3]
        total, total_sq, count = (self.trainer.strategy.reduce(x, reduce_op="sum") for x in (total, total_sq, count))
        mean = total / count
        self.latent_mean.copy_(mean.float())
        self.latent_std.copy_((total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt().float())
        self.normalization_ready.fill_(True)

    def on_train_start(self) -> None:
        super().on_train_start()
        if not bool(self.normalization_ready):
            self.measure_normalization(self.trainer.datamodule.train_dataloader())
            self.print(
                f"semantic latent normalisation measured: mean {self.latent_mean.mean():.3f}, "
                f"std {self.latent_std.mean():.3f} (averaged over channels)"
            )

    # --- training -------------------------------------------------------------------------------------------
    def denoiser(self) -> nn.Module:
        return self.prior

    def diffusion_inputs(self, batch: dict, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Normalised semantic latents to denoise, conditioned on the text encoder's hidden states of the captions
        (replaced by "" with ``caption_drop_prob`` in training, for guidance)."""
        keep = None
        if train:
            if "image" in batch:  # recorded in checkpoints: the default sampling size (a cache's is set at the start)
                self.image_size = tuple(batch["image"].shape[-2:])
            if self.hparams.caption_drop_prob > 0:
                # Host-side random numbers: no device sync in the training step.
                keep = (torch.rand(len(batch["caption"])) >= self.hparams.caption_drop_prob).tolist()
        x0 = self.semantic_latents(batch)
        return x0, {"text": self.text_states(batch, keep)}

    def training_flops(self, batch: dict) -> int:
        """Forward + backward FLOPs of the prior in one training step on ``batch``, counted with torch's
        ``FlopCounterMode`` on a meta-device copy (no memory, no compute) fed meta inputs of the step's shapes: the
        semantic latent and the text hidden states (the cache's, else what the frozen compressor and text encoder
        make of the batch). The frozen networks are not counted; under LoRA only the adapters get weight gradients."""
        cached = batch.get("cache")
        if cached is not None:
            x0_shape, text_shape = cached["semantic"].shape, cached["text_hidden"].shape
        else:
            images = batch["image"]
            latent_size = self.compressor.latent_size(tuple(images.shape[-2:]))
            x0_shape = (images.shape[0], self.compressor.latent_channels, *latent_size)
            text_shape = (images.shape[0], self.text_encoder.context_length, self.text_encoder.width)
        with torch.device("meta"):
            prior = Prior(self.prior.config)
            if self.lora_config.enabled:
                inject_lora(prior, self.lora_config)
            x_t, t, text = torch.empty(x0_shape), torch.empty(x0_shape[0]), torch.empty(text_shape)
        return measure_training_flops(lambda: prior(x_t, t, text), torch.Tensor.sum)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        manifest = getattr(self.trainer.datamodule, "cache_manifest", None)
        if manifest is not None:  # cached batches carry no image: the size the cache was cropped at
            self.image_size = (manifest["data"]["resolution"],) * 2

    # --- sampling -------------------------------------------------------------------------------------------
    def pipeline(self) -> WuerstchenPipeline:
        """The inference pipeline over this module's (current) networks; shares their weights."""
        config = PipelineConfig(
            text_encoder=self.text_encoder_config,
            prior=self.prior.config,
            decoder=self.decoder.config,
            stage_a=self.stage_a.config,
            compression=self.compressor.compression,
            latent_mean=self.latent_mean.tolist(),
            latent_std=self.latent_std.tolist(),
            prior_diffusion=self.diffusion_config,
            decoder_diffusion=self.decoder_diffusion_config,
            prior_sampling=self.sampling_config,
            decoder_sampling=self.decoder_sampling_config,
            decoder_text_encoder=self.decoder_text_encoder.config if self.decoder_text_encoder is not None else None,
            semantic_rounding=self.compressor.config.latent_rounding,
        )
        pipeline = WuerstchenPipeline(
            self.text_encoder,
            self.prior,
            self.decoder,
            self.stage_a,
            config,
            decoder_text_encoder=self.decoder_text_encoder,
        )
        return pipeline.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], image_size: tuple[int, int], generator=None) -> torch.Tensor:
        was_training = self.prior.training
        self.prior.eval()
        try:
            return self.pipeline().generate(prompts, *image_size, generator=generator)
        finally:
            self.prior.train(was_training)

    def evaluation_images(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.generate(batch["caption"], tuple(batch["image"].shape[-2:]), generator)

    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        count = self.hparams.num_logged_images
        captions = batch["caption"][:count]
        generator = torch.Generator(device=self.device).manual_seed(0)
        if "image" not in batch:  # a cached training batch: nothing real to show beside the samples
            return {"generated": self.generate(captions, self.image_size, generator)}
        images = batch["image"][:count]
        return {"real": images, "generated": self.generate(captions, tuple(images.shape[-2:]), generator)}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """For ``predict`` with a PromptDataModule: one image per prompt; the batch's seed fixes the noise."""
        generator = torch.Generator(device=self.device).manual_seed(int(batch["seed"]))
        images = self.generate(batch["prompt"], (int(batch["height"]), int(batch["width"])), generator)
        return {**batch, "images": images}

    def restore_from_record(self, record: StageCRecord) -> None:
        super().restore_from_record(record)
        self.image_size = tuple(record.image_size) if record.image_size else None
