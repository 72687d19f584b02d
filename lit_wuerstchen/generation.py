"""Generation: text -> Stage C -> Stage B -> Stage A, with classifier-free guidance.

The one place each stage is sampled: the Stage B and Stage C LightningModules (validation, evaluation callbacks,
``predict``), the ``sample`` command and the exported pipeline all call these functions. No file I/O here: building
a pipeline from checkpoints or an export folder is :mod:`lit_wuerstchen.checkpoints`' job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .diffusion import (
    Diffusion,
    DiffusionConfig,
    ProgressFn,
    SamplingConfig,
    decoder_sampling,
    prior_sampling,
)
from .models.compressor import semantic_latent_size
from .models.diffnext import DiffNeXt, DiffNeXtConfig
from .models.prior import Prior, PriorConfig
from .models.text_encoder import TextEncoder, TextEncoderConfig
from .models.vqgan import VQGAN, VQGANConfig


def check_image_size(decoder: DiffNeXt, stage_a: VQGAN, height: int, width: int) -> None:
    """Sizes the decoder can produce: positive multiples of Stage A's downsampling x Stage B's divisor."""
    multiple = stage_a.config.downsampling * decoder.divisor
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ValueError(
            f"this model cannot make {height}x{width} images: height and width must be positive multiples of "
            f"{multiple} (Stage A downsampling {stage_a.config.downsampling} x Stage B divisor {decoder.divisor})"
        )


def _sample_guided(network, shape, condition, uncondition, diffusion, sampling, generator, progress) -> torch.Tensor:
    """Sample ``network(x_t, t, **condition)`` from noise of ``shape``, guided against ``uncondition`` (dicts of
    the network's conditioning arguments)."""
    device = next(iter(condition.values())).device
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return diffusion.sample(
        lambda x, t: network(x, t, **condition),
        noise,
        sampling,
        uncond_fn=lambda x, t: network(x, t, **uncondition),
        generator=generator,
        progress=progress,
    )


def decode_stage_a(stage_a: VQGAN, latents: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from scaled Stage A latents (what Stage B works on)."""
    return stage_a.decode(stage_a.from_stage_b(latents)).float().clamp(0, 1)


@torch.no_grad()
def sample_stage_b(
    decoder: DiffNeXt,
    stage_a: VQGAN,
    semantic: torch.Tensor,
    image_size: tuple[int, int],
    diffusion: Diffusion,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    decode: bool = True,
    text: torch.Tensor | None = None,
    negative_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] of ``image_size`` from semantic latents: Stage B sampling, then the Stage A
    decoder (``decode=False``: the scaled Stage A latents Stage B sampled). A text-conditioned decoder also takes
    the prompts' hidden states ``text`` [N, L, D] and the negative prompt's ``negative_text`` [N or 1, L, D] (the
    unconditional pass: zero semantic latent and negative prompt, as the released pipeline does)."""
    check_image_size(decoder, stage_a, *image_size)
    if (text is None) != (decoder.text_channels == 0):
        raise ValueError(
            "this Stage B decoder is text-conditioned: pass text and negative_text"
            if text is None
            else "text was given to a Stage B decoder without text conditioning"
        )
    factor = stage_a.config.downsampling
    height, width = image_size
    shape = (semantic.shape[0], decoder.latent_channels, height // factor, width // factor)
    condition = {"semantic": semantic}
    unconditional = {"semantic": torch.zeros_like(semantic)}  # a dropped semantic latent is all zeros
    if text is not None:
        condition["text"] = text
        unconditional["text"] = negative_text.expand(text.shape[0], -1, -1)
    latents = _sample_guided(decoder, shape, condition, unconditional, diffusion, sampling, generator, progress)
    return decode_stage_a(stage_a, latents) if decode else latents


@torch.no_grad()
def sample_stage_c(
    prior: Prior,
    text: torch.Tensor,
    negative_text: torch.Tensor,
    latent_size: tuple[int, int],
    diffusion: Diffusion,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Normalised semantic latents [N, C, h, w] for text hidden states [N, L, D] (negative: [N or 1, L, D])."""
    negative_text = negative_text.expand(text.shape[0], -1, -1)
    shape = (text.shape[0], prior.latent_channels, *latent_size)
    return _sample_guided(
        prior, shape, {"text": text}, {"text": negative_text}, diffusion, sampling, generator, progress
    )


@dataclass
class PipelineConfig:
    """Everything a trained Würstchen needs besides its weights: the networks' configs, the compression ratio, the
    semantic-latent normalisation, both diffusion processes and the sampling defaults. ``pipeline.json`` of an
    export is this dataclass as a dict."""

    text_encoder: TextEncoderConfig
    prior: PriorConfig
    decoder: DiffNeXtConfig
    stage_a: VQGANConfig
    compression: float
    latent_mean: list[float]
    """Stage C models ``(semantic - latent_mean) / latent_std`` (per channel; v2: mean -1, std 42)."""
    latent_std: list[float]
    prior_diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    decoder_diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    prior_sampling: SamplingConfig = field(default_factory=prior_sampling)
    decoder_sampling: SamplingConfig = field(default_factory=decoder_sampling)
    image_size: list[int] | None = None
    """The training resolution (height, width): the default size of ``sample``."""
    decoder_text_encoder: TextEncoderConfig | None = None
    """The text encoder of a text-conditioned Stage B (released v2: CLIP ViT-H-14); None: Stage B has no text."""
    semantic_rounding: str = "half_up"
    """How the semantic latent side follows from the image side (:func:`semantic_latent_size`): "half_up" or
    "ceil" (the released pipeline's ``ceil(side / 42.67)``)."""


class WuerstchenPipeline(nn.Module):
    """All inference parts of a trained Würstchen and their :class:`PipelineConfig`.

    Stage C's validation builds one over its live networks, so the constructor leaves their modes and
    ``requires_grad`` alone (:func:`lit_wuerstchen.checkpoints.load_pipeline` returns one frozen, in eval mode).
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        prior: Prior,
        decoder: DiffNeXt,
        stage_a: VQGAN,
        config: PipelineConfig,
        decoder_text_encoder: TextEncoder | None = None,
    ):
        super().__init__()
        self.text_encoder, self.prior, self.decoder, self.stage_a = text_encoder, prior, decoder, stage_a
        if (decoder_text_encoder is None) != (decoder.text_channels == 0):
            raise ValueError("a text-conditioned Stage B decoder needs its text encoder, and only it")
        self.decoder_text_encoder = decoder_text_encoder
        self.config = config
        self.register_buffer("latent_mean", torch.tensor(config.latent_mean).reshape(1, -1, 1, 1))
        self.register_buffer("latent_std", torch.tensor(config.latent_std).reshape(1, -1, 1, 1))
        self.prior_diffusion = Diffusion(config.prior_diffusion)
        self.decoder_diffusion = Diffusion(config.decoder_diffusion)

    @property
    def device(self) -> torch.device:
        return self.latent_mean.device

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        height: int,
        width: int,
        prior_sampling: SamplingConfig | None = None,
        decoder_sampling: SamplingConfig | None = None,
        negative_prompt: str = "",
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """Images [N, 3, height, width] in [0, 1] for ``prompts``, one per prompt (repeat prompts for more).
        Sampling settings default to the config's."""
        check_image_size(self.decoder, self.stage_a, height, width)
        text, _ = self.text_encoder(list(prompts))
        negative, _ = self.text_encoder([negative_prompt])
        latent_size = semantic_latent_size((height, width), self.config.compression, self.config.semantic_rounding)
        normalised = sample_stage_c(
            self.prior,
            text,
            negative,
            latent_size,
            self.prior_diffusion,
            prior_sampling or self.config.prior_sampling,
            generator,
            progress,
        )
        semantic = normalised * self.latent_std + self.latent_mean
        decoder_text = decoder_negative = None
        if self.decoder_text_encoder is not None:
            decoder_text = self.decoder_text_encoder(list(prompts))[0]
            decoder_negative = self.decoder_text_encoder([negative_prompt])[0]
        return sample_stage_b(
            self.decoder,
            self.stage_a,
            semantic,
            (height, width),
            self.decoder_diffusion,
            decoder_sampling or self.config.decoder_sampling,
            generator,
            progress,
            text=decoder_text,
            negative_text=decoder_negative,
        )
