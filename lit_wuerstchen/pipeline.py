"""Text -> image inference: text encoder -> Stage C -> Stage B -> Stage A, with classifier-free guidance.

The two sampling functions are the single place where each stage is sampled; the Stage B and Stage C
LightningModules use them for validation and ``WuerstchenPipeline`` for ``sample`` / ``predict``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .diffusion import DiffusionConfig, SamplingConfig
from .models.compressor import semantic_latent_size
from .models.stage_b import StageB as StageBNetwork
from .models.stage_c import StageC as StageCNetwork
from .models.vqgan import VQGAN, VQGANConfig
from .text_encoder import TextEncoder

ProgressFn = Callable[[int, int], None]
EXPORT_CONFIG = "pipeline.json"


def check_image_size(decoder: StageBNetwork, stage_a: VQGAN, height: int, width: int) -> None:
    """Sizes the decoder can produce: positive multiples of Stage A's downsampling x Stage B's divisor."""
    multiple = stage_a.config.downsampling * decoder.divisor
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ValueError(
            f"this model cannot make {height}x{width} images: height and width must be positive multiples of "
            f"{multiple} (Stage A downsampling {stage_a.config.downsampling} x Stage B divisor {decoder.divisor})"
        )


@torch.no_grad()
def sample_stage_b_latents(
    decoder: StageBNetwork,
    stage_a: VQGAN,
    semantic: torch.Tensor,
    image_size: tuple[int, int],
    sampling: SamplingConfig,
    diffusion: DiffusionConfig,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Scaled Stage A latents for images of ``image_size`` from semantic latents, by Stage B sampling."""
    check_image_size(decoder, stage_a, *image_size)
    factor = stage_a.config.downsampling
    height, width = image_size
    schedule, _, target, _ = diffusion.build()
    shape = (semantic.shape[0], decoder.latent_channels, height // factor, width // factor)
    unconditional = torch.zeros_like(semantic)
    return sampling.sample(
        lambda x, t: decoder(x, t, semantic), lambda x, t: decoder(x, t, unconditional), shape, schedule, target,
        generator=generator, device=semantic.device, progress=progress,
    )


@torch.no_grad()
def sample_stage_b(decoder, stage_a, semantic, image_size, sampling, diffusion, generator=None, progress=None):
    """Images [N, 3, H, W] in [0, 1] from semantic latents: Stage B sampling, then the Stage A decoder."""
    latents = sample_stage_b_latents(decoder, stage_a, semantic, image_size, sampling, diffusion, generator, progress)
    return stage_a.decode(latents / stage_a.scale_factor).float().clamp(0, 1)


@torch.no_grad()
def sample_stage_c(
    prior: StageCNetwork,
    text: torch.Tensor,
    negative_text: torch.Tensor,
    latent_size: tuple[int, int],
    sampling: SamplingConfig,
    diffusion: DiffusionConfig,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Normalised semantic latents [N, C, h, w] for text hidden states [N, L, D] (negative: [N or 1, L, D])."""
    schedule, _, target, _ = diffusion.build()
    negative_text = negative_text.expand(text.shape[0], -1, -1)
    shape = (text.shape[0], prior.latent_channels, *latent_size)
    return sampling.sample(
        lambda x, t: prior(x, t, text), lambda x, t: prior(x, t, negative_text), shape, schedule, target,
        generator=generator, device=text.device, progress=progress,
    )


class WuerstchenPipeline(nn.Module):
    """All inference parts of a trained Würstchen (``load`` returns it frozen, in eval mode).

    Stage C's validation builds one over its live networks, so the constructor leaves their modes and
    ``requires_grad`` alone.

    ``latent_mean`` / ``latent_std`` map the compressor's semantic latent to what Stage C models
    (``(x - mean) / std``; v2: mean -1, std 42, i.e. ``(x + 1) / 42``).
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        prior: StageCNetwork,
        decoder: StageBNetwork,
        stage_a: VQGAN,
        compression: float,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        prior_diffusion: DiffusionConfig,
        decoder_diffusion: DiffusionConfig,
        config: dict | None = None,
    ):
        super().__init__()
        self.text_encoder, self.prior, self.decoder, self.stage_a = text_encoder, prior, decoder, stage_a
        self.compression = float(compression)
        self.register_buffer("latent_mean", latent_mean.detach().reshape(1, -1, 1, 1).clone())
        self.register_buffer("latent_std", latent_std.detach().reshape(1, -1, 1, 1).clone())
        self.prior_diffusion, self.decoder_diffusion = prior_diffusion, decoder_diffusion
        self.config = config or {}

    @property
    def device(self) -> torch.device:
        return self.latent_mean.device

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        height: int,
        width: int,
        prior_sampling: SamplingConfig,
        decoder_sampling: SamplingConfig,
        negative_prompt: str = "",
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """Images [N, 3, height, width] in [0, 1] for ``prompts``, one per prompt (repeat prompts for more)."""
        check_image_size(self.decoder, self.stage_a, height, width)
        text, _ = self.text_encoder(list(prompts))
        negative, _ = self.text_encoder([negative_prompt])
        latent_size = semantic_latent_size((height, width), self.compression)
        normalised = sample_stage_c(self.prior, text, negative, latent_size, prior_sampling, self.prior_diffusion,
                                    generator, progress)
        semantic = normalised * self.latent_std + self.latent_mean
        return sample_stage_b(self.decoder, self.stage_a, semantic, (height, width), decoder_sampling,
                              self.decoder_diffusion, generator, progress)

    # --- saving and loading ------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """A self-contained pipeline folder: one safetensors file per part and ``pipeline.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("text_encoder", "prior", "decoder", "stage_a"):
            state = {k: v.detach().cpu().contiguous() for k, v in getattr(self, name).state_dict().items()}
            save_file(state, directory / f"{name}.safetensors")
        config = {
            **self.config,
            "compression": self.compression,
            "latent_mean": self.latent_mean.flatten().tolist(),
            "latent_std": self.latent_std.flatten().tolist(),
            "prior_diffusion": asdict(self.prior_diffusion),
            "decoder_diffusion": asdict(self.decoder_diffusion),
        }
        (directory / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(
        cls,
        path: str | Path,
        stage_b_checkpoint: str | None = None,
        stage_a_checkpoint: str | None = None,
        use_ema: bool = True,
    ) -> WuerstchenPipeline:
        """From an exported folder or a Stage C checkpoint (whose Stage B, holding its frozen Stage A, is found
        from its hparams). ``stage_b_checkpoint`` / ``stage_a_checkpoint`` replace those parts."""
        path = Path(path)
        if path.is_dir():
            pipeline = cls._from_export(path)
        elif path.is_file():
            pipeline = cls._from_stage_c_checkpoint(path, stage_b_checkpoint, use_ema)
        else:
            raise FileNotFoundError(f"no Stage C checkpoint or exported pipeline at {path}")
        if stage_a_checkpoint is not None:
            from .stages.stage_a import load_vqgan

            pipeline.stage_a = load_vqgan(stage_a_checkpoint, use_ema)
            pipeline.config["stage_a"] = asdict(pipeline.stage_a.config)
        return pipeline.requires_grad_(False).eval()

    @classmethod
    def _from_export(cls, directory: Path) -> WuerstchenPipeline:
        from safetensors.torch import load_file

        config_path = directory / EXPORT_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} is not an exported pipeline (no {EXPORT_CONFIG})")
        config = json.loads(config_path.read_text())
        parts = _build_parts(config)
        for name, module in parts.items():
            module.load_state_dict(load_file(directory / f"{name}.safetensors"))
        return cls(**parts, **_common_args(config), config=_part_config(config))

    @classmethod
    def _from_stage_c_checkpoint(cls, path: Path, stage_b_checkpoint: str | None, use_ema: bool) -> WuerstchenPipeline:
        from .stages.stage_b import load_stage_b

        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        hparams = checkpoint.get("hyper_parameters", {})
        if "network" not in hparams or "text_encoder" not in hparams or "stage_b_checkpoint" not in hparams:
            raise ValueError(f"{path} is not a Stage C checkpoint")
        decoder, _, stage_a, b_hparams = load_stage_b(stage_b_checkpoint or hparams["stage_b_checkpoint"], use_ema)
        state = checkpoint["state_dict"]
        prior_state = checkpoint.get("ema_state_dict") if use_ema else None
        if prior_state is None:
            prior_state = {k.removeprefix("prior."): v for k, v in state.items() if k.startswith("prior.")}
        config = {
            "text_encoder": hparams["text_encoder"],
            "text_encoder_random_init": "text_encoder_state_dict" in checkpoint,
            "prior": {**hparams["network"], "latent_channels": decoder.semantic_channels},
            "decoder": b_hparams["network"] | {"semantic_channels": decoder.semantic_channels},
            "stage_a": asdict(stage_a.config),
            "compression": b_hparams["compression"],
            "latent_mean": state["latent_mean"].flatten().tolist(),
            "latent_std": state["latent_std"].flatten().tolist(),
            "prior_diffusion": hparams["diffusion"],
            "decoder_diffusion": b_hparams["diffusion"],
            "image_size": checkpoint.get("image_size"),
            "prior_sampling": hparams.get("validation_sampling"),
            "decoder_sampling": hparams.get("decoder_sampling"),
        }
        text_encoder = _build_text_encoder(config)
        if "text_encoder_state_dict" in checkpoint:  # a randomly initialised encoder travels with Stage C
            text_encoder.load_state_dict(checkpoint["text_encoder_state_dict"])
        prior = StageCNetwork(**config["prior"], text_channels=text_encoder.width)
        prior.load_state_dict(prior_state)
        return cls(text_encoder, prior, decoder, stage_a, **_common_args(config), config=_part_config(config))


def _build_text_encoder(config: dict) -> TextEncoder:
    settings = dict(config["text_encoder"])
    if config.get("text_encoder_random_init") or config.get("exported"):
        settings.update(pretrained=None, weights_file=None)  # weights come from the checkpoint / export
    return TextEncoder(**settings)


def _build_parts(config: dict) -> dict[str, nn.Module]:
    config = {**config, "exported": True}
    text_encoder = _build_text_encoder(config)
    return {
        "text_encoder": text_encoder,
        "prior": StageCNetwork(**config["prior"], text_channels=text_encoder.width),
        "decoder": StageBNetwork(**config["decoder"]),
        "stage_a": VQGAN(VQGANConfig(**config["stage_a"])),
    }


def _common_args(config: dict) -> dict:
    return {
        "compression": config["compression"],
        "latent_mean": torch.tensor(config["latent_mean"]),
        "latent_std": torch.tensor(config["latent_std"]),
        "prior_diffusion": DiffusionConfig(**config["prior_diffusion"]),
        "decoder_diffusion": DiffusionConfig(**config["decoder_diffusion"]),
    }


def _part_config(config: dict) -> dict:
    """What the pipeline keeps of its config: the parts' settings and the sampling defaults it was trained with."""
    keys = ("text_encoder", "prior", "decoder", "stage_a", "image_size", "prior_sampling", "decoder_sampling")
    return {k: config[k] for k in keys if config.get(k) is not None}
