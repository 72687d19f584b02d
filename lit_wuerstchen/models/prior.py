"""Stage C's network: the text-conditional diffusion prior over the 16-channel semantic latent (docs/design.md
"Stage C").

Shape of diffusers' ``WuerstchenPrior`` (Würstchen v2): single resolution, no down-sampling, so any latent
height/width works. ``depth`` x [ResBlock (depthwise conv, LN, MLP 4c + GRN, dropout) -> TimestepBlock (FiLM on a
sinusoidal embedding of ``r * 10000``) -> AttnBlock (self-attention over the latent tokens with the mapped text
tokens appended to the keys/values)]. The output head predicts ``a, b`` and the noise estimate is
``(x_t - a) / (|1 - b| + 1e-5)``; the head is zero-initialised, so at initialisation ``a = b = 0`` and the
prediction is ``x_t`` itself ("starts as identity", which the paper found more stable).

Released v2 config (the default): c=1536, depth 32, 24 heads, text = CLIP ViT-bigG-14 hidden states (1280).
Paper config: c=1280, depth 16, 16 heads, text = CLIP ViT-H-14 (1024).

``architecture: dit`` replaces the blocks with transformer blocks (:class:`~.blocks.DiTBlock`: every latent cell a
token with a fixed 2-D sine-cosine position, text by cross-attention, the noise level by adaLN-zero) and the output
head with a direct noise estimate. The released blocks see a cell's place only through the zero padding of their
depthwise convs; at the toy scale (4x4 and 8x8 latents) a prior built from them does not learn where a caption puts
the shape within the demo's budget, where this one does (docs/toy_alignment.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from .blocks import (
    AttnBlock,
    DiTBlock,
    LayerNorm2d,
    ResBlock,
    TimestepBlock,
    position_embedding_2d,
    timestep_embedding,
)

Architecture = Literal["wuerstchen", "dit"]
ARCHITECTURES = get_args(Architecture)


@dataclass
class PriorConfig:
    """Sizes of the prior; the single source of its defaults (released Würstchen v2, ~994M parameters; the paper:
    width 1280, depth 16, 16 heads, CLIP ViT-H text of 1024 channels)."""

    latent_channels: int = 16
    """Channels of the semantic latent it generates (the compressor's ``latent_channels``)."""
    width: int = 1536
    depth: int = 32
    heads: int = 24
    text_channels: int = 1280
    """Width of the text encoder's hidden states (ViT-bigG-14: 1280)."""
    r_embedding_dim: int = 64
    dropout: float = 0.1
    kernel_size: int = 3
    """The ResBlocks' depthwise conv (``architecture: wuerstchen``)."""
    architecture: Architecture = "wuerstchen"
    """"wuerstchen": the released v2 blocks; "dit": transformer blocks with 2-D positions (the module docstring)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"prior architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("latent_channels", "width", "depth", "heads", "text_channels", "r_embedding_dim", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"prior {name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"prior width {self.width} is not divisible by heads {self.heads}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"prior kernel_size must be odd (same-size padding), got {self.kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"prior dropout must be in [0, 1), got {self.dropout}")


class Prior(nn.Module):
    """Text-conditional prior: ``forward(x_t [B, C, h, w], r [B] in [0, 1], text [B, L, text_channels]) -> eps``."""

    def __init__(self, config: PriorConfig | None = None):
        super().__init__()
        self.config = config = config or PriorConfig()
        width = config.width
        self.latent_channels = config.latent_channels
        self.width = width
        self.r_embedding_dim = config.r_embedding_dim
        self.text_channels = config.text_channels

        self.embedding = nn.Conv2d(config.latent_channels, width, kernel_size=1)
        self.text_mapper = nn.Sequential(
            nn.Linear(config.text_channels, width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, width),
        )
        self.blocks = nn.ModuleList()
        if config.architecture == "dit":
            self._build_dit(config)
            return
        for _ in range(config.depth):
            self.blocks.append(ResBlock(width, kernel_size=config.kernel_size, dropout=config.dropout, grn=True))
            self.blocks.append(TimestepBlock(width, config.r_embedding_dim))
            self.blocks.append(
                AttnBlock(width, cond_channels=width, num_heads=config.heads, self_attn=True, dropout=config.dropout)
            )
        self.out = nn.Sequential(
            LayerNorm2d(width, elementwise_affine=False, eps=1e-6),
            nn.Conv2d(width, config.latent_channels * 2, kernel_size=1),
        )
        self.reset_parameters()

    def _build_dit(self, config: PriorConfig) -> None:
        """Transformer blocks, a noise-level MLP and an adaLN-modulated output layer (PyTorch's default init, the
        modulations and the output at zero: the network starts by predicting zero noise)."""
        width = config.width
        self.time_mapper = nn.Sequential(nn.Linear(config.r_embedding_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks.extend(DiTBlock(width, config.heads, dropout=config.dropout) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, config.latent_channels)
        for layer in (self.out_modulation[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def reset_parameters(self) -> None:
        """Initialisation of the released Würstchen prior, ending in the identity start.

        Xavier-uniform weights and zero biases for every linear/conv layer (depthwise convs included), N(0, 0.02)
        for the text mapper, each ResBlock's last MLP layer scaled by ``sqrt(1 / depth)``, zero TimestepBlock
        mappers (FiLM starts as the identity) and GRN gamma/beta at zero (from the shared block). The output conv
        is zeroed, so ``a = b = 0`` and the predicted noise equals ``x_t`` at initialisation.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.text_mapper:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        depth = len(self.blocks) // 3
        for block in self.blocks:
            if isinstance(block, ResBlock):
                block.mlp[-1].weight.data.mul_((1.0 / depth) ** 0.5)
            elif isinstance(block, TimestepBlock):
                nn.init.zeros_(block.mapper.weight)
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x_t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if x_t.ndim != 4 or x_t.shape[1] != self.latent_channels:
            raise ValueError(
                f"the prior expects x_t of shape [B, {self.latent_channels}, h, w], got {tuple(x_t.shape)}"
            )
        if text.ndim != 3 or text.shape[-1] != self.text_channels:
            raise ValueError(f"the prior expects text of shape [B, L, {self.text_channels}], got {tuple(text.shape)}")
        r = r.reshape(-1)
        if r.numel() == 1 and x_t.shape[0] != 1:
            r = r.expand(x_t.shape[0])
        r_embed = timestep_embedding(r, self.r_embedding_dim).to(x_t.dtype)
        cond = self.text_mapper(text.to(x_t.dtype))
        if self.config.architecture == "dit":
            return self._forward_dit(x_t, r_embed, cond)
        x = self.embedding(x_t)
        for block in self.blocks:
            if isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            elif isinstance(block, AttnBlock):
                x = block(x, cond)
            else:
                x = block(x)
        a, b = self.out(x).chunk(2, dim=1)
        return (x_t - a) / ((1 - b).abs() + 1e-5)

    def _forward_dit(self, x_t: torch.Tensor, r_embed: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x_t.shape
        tokens = self.embedding(x_t).flatten(2).transpose(1, 2)
        tokens = tokens + position_embedding_2d(height, width, self.width, device=x_t.device).to(tokens.dtype)
        condition = self.time_mapper(r_embed)
        for block in self.blocks:
            tokens = block(tokens, condition, text)
        shift, scale = self.out_modulation(condition)[:, None].chunk(2, dim=-1)
        eps = self.out(self.out_norm(tokens) * (1 + scale) + shift)
        return eps.transpose(1, 2).reshape(batch, channels, height, width)
