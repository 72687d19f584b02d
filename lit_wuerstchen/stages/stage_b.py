"""Stage B LightningModule: the diffusion decoder and the semantic compressor, trained together on a frozen Stage A."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ..diffusion import DiffusionConfig, SamplingConfig, diffusion_loss
from ..models.compressor import SemanticCompressor
from ..models.stage_b import StageB as StageBNetwork
from ..models.stage_b import perturb_semantic
from ..models.vqgan import VQGAN, VQGANConfig
from ..pipeline import sample_stage_b
from .base import OptimizerConfig, Stage, as_dataclass
from .stage_a import load_vqgan


@dataclass
class StageBConfig:
    """Sizes of the Stage B U-Net (defaults: Würstchen v2 paper scale, ~0.85B parameters without text)."""

    latent_channels: int = 4
    patch_size: int = 2
    widths: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    blocks: list[int] = field(default_factory=lambda: [4, 4, 14, 4])
    heads: list[int] = field(default_factory=lambda: [0, 10, 20, 20])
    """Attention heads per level (0: no attention at that level)."""
    semantic_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Levels whose residual blocks take the (resized, projected) semantic latent."""
    semantic_proj_channels: int | None = None
    text_channels: int = 0
    """Width of text tokens fed to the attention blocks (0: no text conditioning)."""
    r_embedding_dim: int = 64
    kernel_size: int = 3
    dropout: float = 0.0


@dataclass
class CompressorConfig:
    """The semantic compressor (EfficientNetV2-S at paper scale; "tiny" for CPU toy runs)."""

    backbone: Literal["efficientnet_v2_s", "efficientnet_v2_l", "tiny"] = "efficientnet_v2_s"
    pretrained: bool = True
    """Start from torchvision's ImageNet weights (needs the file in torch's hub cache when offline)."""
    latent_channels: int = 16
    tiny_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    affine_norm: bool = False


def build_compressor(config: CompressorConfig, compression: float) -> SemanticCompressor:
    return SemanticCompressor(
        backbone=config.backbone, pretrained=config.pretrained, latent_channels=config.latent_channels,
        compression=compression, tiny_widths=tuple(config.tiny_widths), affine_norm=config.affine_norm,
    )


class StageB(Stage):
    """Trains the Stage B decoder and the semantic compressor jointly; Stage A is loaded frozen.

    Args:
        stage_a_checkpoint: Stage A checkpoint (its EMA weights are used when present).
        compression: image side / semantic latent side (DESIGN.md §1); the compressor resizes the image to
            ``round(side / compression) * stride`` (see ``SemanticCompressor``). THE ablation knob.
        network / compressor / diffusion / optimizer: component settings.
        semantic_drop_prob: per-sample probability that the semantic latent is zeroed (for guidance).
        semantic_noise_prob / semantic_noise_std: occasional Gaussian noise on the semantic latent, so the
            decoder tolerates imperfect Stage C outputs.
        validation_sampling: sampler, steps and guidance of the full decode run at validation.
    """

    def __init__(
        self,
        stage_a_checkpoint: str,
        compression: float = 42.67,
        network: StageBConfig = StageBConfig(),
        compressor: CompressorConfig = CompressorConfig(),
        diffusion: DiffusionConfig = DiffusionConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(lr=1e-4, warmup_steps=10_000),
        semantic_drop_prob: float = 0.05,
        semantic_noise_prob: float = 0.1,
        semantic_noise_std: float = 0.1,
        validation_sampling: SamplingConfig = SamplingConfig(steps=12),
        num_logged_images: int = 8,
    ):
        super().__init__()
        self.save_hyperparameters()
        network = as_dataclass(StageBConfig, network)
        compressor = as_dataclass(CompressorConfig, compressor)
        self.diffusion_config = as_dataclass(DiffusionConfig, diffusion)
        self.optimizer_config = as_dataclass(OptimizerConfig, optimizer)
        self.sampling_config = as_dataclass(SamplingConfig, validation_sampling)
        self.store_plain_hparams(network=network, compressor=compressor, diffusion=self.diffusion_config,
                                 optimizer=self.optimizer_config, validation_sampling=self.sampling_config)

        self.stage_a = load_vqgan(stage_a_checkpoint).requires_grad_(False)
        if self.stage_a.config.latent_channels != network.latent_channels:
            raise ValueError(
                f"Stage A at {stage_a_checkpoint} makes {self.stage_a.config.latent_channels}-channel latents, "
                f"but network.latent_channels is {network.latent_channels}"
            )
        self.compressor = build_compressor(compressor, compression)
        self.decoder = StageBNetwork(semantic_channels=compressor.latent_channels, **asdict(network))
        self.schedule, self.t_sampler, self.target, self.loss_weight = self.diffusion_config.build()
        # The EMA averages exactly what is trained: decoder + compressor (not the frozen Stage A).
        object.__setattr__(self, "_trained", nn.ModuleDict({"decoder": self.decoder, "compressor": self.compressor}))

        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_psnr_stage_a = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    # --- what is trained, what is frozen ------------------------------------------------------------------
    def ema_network(self) -> nn.Module:
        return self._trained

    def train(self, mode: bool = True):
        super().train(mode)
        self.stage_a.eval()  # frozen: its BatchNorm statistics must never move
        return self

    # --- the two encoders ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_stage_a(self, images: torch.Tensor) -> torch.Tensor:
        """The training target: Stage A's *unquantised* latent, times its scale factor."""
        return self.stage_a.encode(images) * self.stage_a.scale_factor

    @torch.no_grad()
    def decode_stage_a(self, latents: torch.Tensor) -> torch.Tensor:
        return self.stage_a.decode(latents / self.stage_a.scale_factor).float().clamp(0, 1)

    # --- training -------------------------------------------------------------------------------------------
    def diffusion_loss(self, images: torch.Tensor, perturb: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.encode_stage_a(images)
        semantic = self.compressor(images)
        if perturb:
            semantic = perturb_semantic(semantic, self.hparams.semantic_drop_prob, self.hparams.semantic_noise_prob,
                                        self.hparams.semantic_noise_std)
        t = self.t_sampler(latents.shape[0], generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noised = self.schedule.add_noise(latents, t, noise)
        prediction = self.decoder(noised, t, semantic)
        target = self.target.target(latents, noise, t, self.schedule)
        return diffusion_loss(prediction, target, self.loss_weight(t, self.schedule))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch["image"], perturb=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        self.log_data_errors("train")
        return loss

    # --- sampling -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """image -> compressor -> Stage B sampling -> Stage A decode."""
        return sample_stage_b(self.decoder, self.stage_a, self.compressor(images), tuple(images.shape[-2:]),
                              self.sampling_config, self.diffusion_config, generator)

    # --- validation -----------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        generator = torch.Generator(device=images.device).manual_seed(batch_idx)
        loss = self.diffusion_loss(images, perturb=False, generator=generator)
        self.log("val/loss", loss, batch_size=images.shape[0], sync_dist=True)
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
        self.log_data_errors("val")

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Enough to rebuild the frozen Stage A without its original checkpoint file.
        checkpoint["vqgan_config"] = asdict(self.stage_a.config)


def load_stage_b(checkpoint_path: str | Path, use_ema: bool = True) -> tuple[nn.Module, SemanticCompressor, VQGAN, dict]:
    """(decoder, compressor, Stage A, hparams) from a Stage B checkpoint, in eval mode; EMA weights when present."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"Stage B checkpoint not found: {path}. Train Stage B first or fix the path.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    if "network" not in hparams or "vqgan_config" not in checkpoint:
        raise ValueError(f"{path} is not a Stage B checkpoint")
    network = StageBConfig(**hparams["network"])
    compressor_config = CompressorConfig(**{**hparams["compressor"], "pretrained": False})
    decoder = StageBNetwork(semantic_channels=compressor_config.latent_channels, **asdict(network))
    compressor = build_compressor(compressor_config, hparams["compression"])
    stage_a = VQGAN(VQGANConfig(**checkpoint["vqgan_config"]))
    state = checkpoint["state_dict"]
    stage_a.load_state_dict({k.removeprefix("stage_a."): v for k, v in state.items() if k.startswith("stage_a.")})
    trained = checkpoint.get("ema_state_dict") if use_ema else None
    if trained is None:
        trained = {k: v for k, v in state.items() if k.startswith(("decoder.", "compressor."))}
    decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in trained.items() if k.startswith("decoder.")})
    compressor.load_state_dict(
        {k.removeprefix("compressor."): v for k, v in trained.items() if k.startswith("compressor.")}
    )
    return decoder.eval(), compressor.eval(), stage_a.eval(), hparams
