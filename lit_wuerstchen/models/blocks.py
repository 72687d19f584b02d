"""Building blocks shared by the Stage A, B and C networks (docs/design.md, one section per stage).

Pure ``nn.Module``s: no Lightning, no file I/O. Tensors are NCHW unless a name says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response normalisation, channels-last input (N, H, W, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Sum of squares, not torch.norm: norm over the non-innermost dims takes a slow path on the CPU (4.4 against
        # 0.9 ms forward + backward on a toy prior's block); the clamp keeps the gradient finite for a zero channel.
        spatial_norm = x.float().pow(2).sum(dim=(1, 2), keepdim=True).clamp_min(1e-24).sqrt().to(x.dtype)
        relative = spatial_norm / (spatial_norm.mean(dim=-1, keepdim=True) + 1e-6)
        # x * (1 + gamma * relative) + beta: one pass over the (4c-wide) activation instead of four.
        return torch.addcmul(self.beta, x, 1 + self.gamma * relative)


class ResBlock(nn.Module):
    """ConvNeXt-style residual block: depthwise conv -> channel LayerNorm -> MLP (GELU) -> residual.

    ``skip_channels`` are concatenated after the norm, before the MLP (how Stage B feeds the semantic latent).
    ``layer_scale`` adds a learned per-channel branch scale initialised at 0, so the block starts as the
    identity (Stage A); ``grn`` adds GlobalResponseNorm inside the MLP (Stages B and C).
    """

    def __init__(
        self,
        channels: int,
        skip_channels: int = 0,
        kernel_size: int = 3,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        grn: bool = True,
        layer_scale: bool = False,
    ):
        super().__init__()
        hidden = channels * mlp_ratio
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = LayerNorm2d(channels, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels + skip_channels, hidden),
            nn.GELU(),
            GlobalResponseNorm(hidden) if grn else nn.Identity(),
            nn.Dropout(dropout),
            nn.Linear(hidden, channels),
        )
        self.gamma = nn.Parameter(torch.zeros(channels)) if layer_scale else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        h = self.mlp(h.permute(0, 2, 3, 1))
        if self.gamma is not None:
            h = h * self.gamma
        # The branch first: the sum takes its channels-last layout, so the next block's norm permutes without a copy.
        return h.permute(0, 3, 1, 2) + x


class TimestepBlock(nn.Module):
    """FiLM conditioning on the noise-level embedding: ``x * (1 + a) + b``.

    ``conds`` (Stable Cascade: ``("sca", "crp")`` in Stage C, ``("sca",)`` in Stage B) are extra scalar conditions
    embedded like ``r``: the embedding is then ``[r, *conds]`` concatenated (``embedding_dim`` each) and every part
    has its own mapper (``mapper_<name>``), whose ``a, b`` are summed with ``r``'s. No conds (v2, the default): one
    mapper.
    """

    def __init__(self, channels: int, embedding_dim: int, conds: Sequence[str] = ()):
        super().__init__()
        self.mapper = nn.Linear(embedding_dim, channels * 2)
        self.conds = tuple(conds)
        for name in self.conds:
            setattr(self, f"mapper_{name}", nn.Linear(embedding_dim, channels * 2))

    def forward(self, x: torch.Tensor, r_embedding: torch.Tensor) -> torch.Tensor:
        if not self.conds:
            a, b = self.mapper(r_embedding)[:, :, None, None].chunk(2, dim=1)
            return x * (1 + a) + b
        parts = r_embedding.chunk(len(self.conds) + 1, dim=1)
        a, b = self.mapper(parts[0])[:, :, None, None].chunk(2, dim=1)
        for name, part in zip(self.conds, parts[1:]):
            a_cond, b_cond = getattr(self, f"mapper_{name}")(part)[:, :, None, None].chunk(2, dim=1)
            a, b = a + a_cond, b + b_cond
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU)."""

    def __init__(self, channels: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        return x.view(batch, length, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            self._heads(self.to_q(queries)),
            self._heads(self.to_k(keys_values)),
            self._heads(self.to_v(keys_values)),
        )
        out = self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        # Dropout on the projected output, as the released models apply it (diffusers' Attention): inside the fused
        # attention call it made a training step 10-17% slower on the CPU.
        return F.dropout(out, self.dropout, self.training) if self.dropout else out


class AttnBlock(nn.Module):
    """Attention over image tokens; mapped conditioning tokens (text) are appended to the keys/values."""

    def __init__(self, channels: int, cond_channels: int, num_heads: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(channels, elementwise_affine=False, eps=1e-6)
        self.attention = Attention(channels, num_heads, dropout)
        self.cond_mapper = nn.Sequential(nn.SiLU(), nn.Linear(cond_channels, channels)) if cond_channels else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        keys_values = [tokens] if self.self_attn else []
        if cond is not None and self.cond_mapper is not None:
            keys_values.append(self.cond_mapper(cond))
        if not keys_values:
            return x
        out = self.attention(tokens, torch.cat(keys_values, dim=1))
        return x + out.transpose(1, 2).reshape(x.shape)


class InterpolatedScaler(nn.Module):
    """Between two levels: a 1x1 conv and a bilinear 2x resize (``align_corners=True``), conv first going down, resize
    first going up (Stable Cascade with ``level_resize``; ``resize=False``: the conv alone, as Stage C's two levels
    share one resolution). ``blocks`` holds the two in the order they run (the released parameter names)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str, resize: bool = True):
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        resample = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if resize
            else nn.Identity()
        )
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.blocks = nn.ModuleList([resample, conv] if mode == "up" else [conv, resample])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class DiTBlock(nn.Module):
    """Transformer block over image tokens (Peebles & Xie 2023): self-attention, cross-attention to the text tokens
    and an MLP, each a pre-norm residual branch whose norm is shifted and scaled and whose output is gated by the
    noise-level embedding (adaLN-zero: the modulation starts at zero, so the block starts as the identity).

    Tokens are ``[B, N, C]``; the MLP has the ResBlock's layout without GRN (``mlp.0`` and ``mlp.4`` are its linears,
    as LoRA's default targets name them).
    """

    def __init__(self, channels: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6) for _ in range(3))
        self.self_attention = Attention(channels, num_heads, dropout)
        self.cross_attention = Attention(channels, num_heads, dropout)
        hidden = channels * mlp_ratio
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Identity(), nn.Dropout(dropout),
            nn.Linear(hidden, channels),
        )  # fmt: skip
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 9 * channels))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``tokens`` [B, N, C], ``condition`` (the noise-level embedding) [B, C], ``text`` [B, L, C]."""
        shift, scale, gate = (m.chunk(3, dim=-1) for m in self.modulation(condition)[:, None].chunk(3, dim=-1))
        h = self.norms[0](tokens) * (1 + scale[0]) + shift[0]
        tokens = tokens + gate[0] * self.self_attention(h, h)
        h = self.norms[1](tokens) * (1 + scale[1]) + shift[1]
        tokens = tokens + gate[1] * self.cross_attention(h, text)
        h = self.norms[2](tokens) * (1 + scale[2]) + shift[2]
        return tokens + gate[2] * self.mlp(h)


def position_embedding_2d(height: int, width: int, channels: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding ``[height * width, channels]`` (row-major cells): a quarter of the
    channels each for sin and cos of the row and of the column, at frequencies ``1 / 100 ** (i / (q - 1))``."""
    quarter = channels // 4
    frequencies = 1.0 / 100.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter - 1, 1))
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
    parts = []
    for grid in (rows, cols):
        angles = grid[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    return F.pad(torch.cat(parts, dim=1), (0, channels - 4 * quarter))


def timestep_embedding(r: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the continuous noise level ``r`` in [0, 1] (of ``r * max_positions``).

    Computed with the released Würstchen's operations in their order (frequencies ``exp(-i * log(P) / (half - 1))``
    from a Python-float step): the same function written another way differs by up to 2e-4 at large angles, which
    the released weights would see as drift.
    """
    r = r.float() * max_positions
    half = dim // 2
    step = math.log(max_positions) / max(half - 1, 1)
    frequencies = torch.arange(half, device=r.device).float().mul(-step).exp()
    angles = r[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding
