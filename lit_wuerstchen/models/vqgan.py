"""Stage A: the f4 VQGAN (docs/design.md "Stage A") and its patch discriminator.

Images are in [0, 1], NCHW. ``encode`` returns the BatchNorm-ed continuous latent; ``quantize`` snaps it to the
codebook; Stage B trains on ``encode(x) / scale_factor`` (the *unquantised* latent, as in the paper) and its samples
are decoded as ``decode(latent * scale_factor)``: the released Würstchen v2 convention (diffusers' Würstchen
pipeline multiplies by ``PaellaVQModel.config.scale_factor`` before decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResBlock


@dataclass
class VQGANConfig:
    """Sizes of the VQGAN. Defaults are the paper-scale (v2 code) values: ~19M parameters, f4."""

    channels: list[int] = field(default_factory=lambda: [192, 384])
    """Width per level; the downsampling factor is 2 (pixel-unshuffle) * 2**(levels - 1)."""
    encoder_blocks: list[int] = field(default_factory=lambda: [1, 1])
    """Residual blocks per level on the way down."""
    decoder_blocks: list[int] = field(default_factory=lambda: [1, 12])
    """Residual blocks per level on the way up, indexed like ``channels`` (the deepest level is decoded first)."""
    latent_channels: int = 4
    codebook_size: int = 8192
    scale_factor: float = 0.3764
    """Stage B works on ``latent / scale_factor`` and hands back latents that are multiplied by it before decoding
    (0.3764 in Würstchen v2)."""
    residual_block: Literal["layer_scale", "paella"] = "layer_scale"
    """``paella``: Paella's residual block with six scalar gates (the released Würstchen v2 VQGAN, diffusers'
    ``PaellaVQModel``); ``layer_scale``: a ConvNeXt block with a per-channel branch scale (the toy's)."""

    def __post_init__(self) -> None:
        if not (len(self.channels) == len(self.encoder_blocks) == len(self.decoder_blocks)):
            raise ValueError(
                f"vqgan: channels, encoder_blocks and decoder_blocks need one entry per level, got "
                f"{self.channels}, {self.encoder_blocks}, {self.decoder_blocks}"
            )
        if self.latent_channels < 1 or self.codebook_size < 2:
            raise ValueError("vqgan: latent_channels must be >= 1 and codebook_size >= 2")
        if self.residual_block not in ("layer_scale", "paella"):
            raise ValueError(f"vqgan: residual_block must be 'layer_scale' or 'paella', got {self.residual_block!r}")
        if not self.scale_factor > 0:
            raise ValueError(f"vqgan: scale_factor must be > 0, got {self.scale_factor}")

    @classmethod
    def released_v2(cls) -> VQGANConfig:
        """The released Würstchen v2 VQGAN (``vqgan_f4_v1_500k``, diffusers ``PaellaVQModel`` defaults, 18.4M)."""
        return cls(residual_block="paella")

    @property
    def downsampling(self) -> int:
        return 2 ** len(self.channels)


class GatedResBlock(nn.Module):
    """Paella's residual block (the released Würstchen VQGAN): two pre-norm branches, a replicate-padded depthwise
    3x3 conv and a channel MLP, modulated and gated by six learned scalars that start at 0 (the identity)."""

    def __init__(self, channels: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(
            nn.ReplicationPad2d(1), nn.Conv2d(channels, channels, kernel_size=3, groups=channels)
        )
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(channels, channels * mlp_ratio), nn.GELU(), nn.Linear(channels * mlp_ratio, channels)
        )
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[3]) + g[4]
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through estimator.

    Loss = ||sg[z] - q||² (codebook) + beta·||z - sg[q]||² (commitment).
    """

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(codebook_size, dim)
        # The encoder ends in BatchNorm, so latents are ~N(0, 1): start the codes there too.
        nn.init.normal_(self.codebook.weight)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook index of every latent vector, shape (N, H, W)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        codes = self.codebook.weight.float()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return distances.argmin(dim=1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook(indices).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (straight-through quantised latent, VQ loss, indices)."""
        indices = self.indices(z)
        quantized = self.lookup(indices).to(z.dtype)
        loss = F.mse_loss(quantized, z.detach()) + self.beta * F.mse_loss(z, quantized.detach())
        return z + (quantized - z).detach(), loss, indices


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        self.config = config = config or VQGANConfig()
        widths = config.channels
        levels = len(widths)

        def residual(width: int) -> nn.Module:
            if config.residual_block == "paella":
                return GatedResBlock(width)
            return ResBlock(width, grn=False, layer_scale=True)

        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, widths[0], kernel_size=1))
        down: list[nn.Module] = []
        for level, width in enumerate(widths):
            if level > 0:
                down.append(nn.Conv2d(widths[level - 1], width, kernel_size=4, stride=2, padding=1))
            down.extend(residual(width) for _ in range(config.encoder_blocks[level]))
        down.append(nn.Conv2d(widths[-1], config.latent_channels, kernel_size=1, bias=False))
        down.append(nn.BatchNorm2d(config.latent_channels))
        self.encoder = nn.Sequential(*down)

        self.quantizer = VectorQuantizer(config.latent_channels, config.codebook_size)

        up: list[nn.Module] = [nn.Conv2d(config.latent_channels, widths[-1], kernel_size=1)]
        for level in reversed(range(levels)):
            width = widths[level]
            up.extend(residual(width) for _ in range(config.decoder_blocks[level]))
            if level > 0:
                up.append(nn.ConvTranspose2d(width, widths[level - 1], kernel_size=4, stride=2, padding=1))
        self.decoder = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(widths[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    def to_stage_b(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent Stage B works on, from :meth:`encode`'s (divided by ``scale_factor``, as released)."""
        return latents / self.config.scale_factor

    def from_stage_b(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent :meth:`decode` takes, from one Stage B made (multiplied by ``scale_factor``)."""
        return latents * self.config.scale_factor

    def _check_size(self, images: torch.Tensor) -> None:
        factor = self.config.downsampling
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % factor or images.shape[-2] % factor:
            raise ValueError(
                f"Stage A expects RGB images (N, 3, H, W) with H and W divisible by {factor}, got {tuple(images.shape)}"
            )

    def encode(self, images: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Continuous latent (N, latent_channels, H/f, W/f); ``quantize`` snaps it to the codebook."""
        self._check_size(images)
        z = self.encoder(self.in_block(images))
        return self.quantizer.lookup(self.quantizer.indices(z)).to(z.dtype) if quantize else z

    def decode(self, latents: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Image from a latent; ``quantize`` snaps an unquantised latent to the codebook first."""
        if quantize:
            latents = self.quantizer.lookup(self.quantizer.indices(latents)).to(latents.dtype)
        return self.out_block(self.decoder(latents))

    def forward(self, images: torch.Tensor, skip_quantization: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Full reconstruction. ``skip_quantization`` (bool, per sample) keeps those latents continuous."""
        z = self.encode(images)
        quantized, vq_loss, indices = self.quantizer(z)
        if skip_quantization is not None:
            quantized = torch.where(skip_quantization[:, None, None, None], z, quantized)
        return {"reconstruction": self.decode(quantized), "latent": z, "vq_loss": vq_loss, "indices": indices}


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: strided convs with LeakyReLU, one logit per patch (hinge loss outside)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            out = channels * min(2**i, 8)
            modules += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.GroupNorm(1, out), nn.LeakyReLU(0.2)]
            width = out
        modules.append(nn.Conv2d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Images arrive in [0, 1]; the discriminator sees them centred.
        return self.net(images * 2 - 1)
