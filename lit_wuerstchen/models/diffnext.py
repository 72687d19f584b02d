"""Stage B's network: the diffusion decoder on the Stage A latent, conditioned on the semantic latent (v2 "DiffNeXt";
docs/design.md "Stage B").

Pure ``nn.Module``: no Lightning, no file I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, timestep_embedding

_EPS = 1e-3


def perturb_semantic(
    semantic: torch.Tensor,
    drop_prob: float,
    noise_prob: float,
    noise_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample augmentation of the semantic latent for Stage B training; returns a new tensor.

    Each sample independently gets Gaussian noise of std ``noise_std`` added with probability ``noise_prob``
    (robustness to imperfect Stage C outputs; the compressor output is BatchNorm-ed, so ~unit scale), and is then
    replaced by zeros with probability ``drop_prob`` (zeros = "unconditional", for classifier-free guidance; a
    dropped sample is exactly zero, noisy or not). ``drop_prob=0`` and ``noise_prob=0`` return the values
    unchanged. Gradients flow through the kept samples. No host-device sync. ``generator`` must live on
    ``semantic``'s device.
    """
    for name, p in (("drop_prob", drop_prob), ("noise_prob", noise_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    mask_shape = (semantic.shape[0],) + (1,) * (semantic.ndim - 1)
    out = semantic
    if noise_prob > 0 and noise_std > 0:
        noisy = torch.rand(mask_shape, generator=generator, device=semantic.device) < noise_prob
        noise = torch.randn(semantic.shape, generator=generator, device=semantic.device, dtype=semantic.dtype)
        out = out + noise * (noisy.to(semantic.dtype) * noise_std)
    if drop_prob > 0:
        dropped = torch.rand(mask_shape, generator=generator, device=semantic.device) < drop_prob
        out = torch.where(dropped, torch.zeros((), dtype=out.dtype, device=out.device), out)
    return out if out is not semantic else semantic.clone()


class DiffNeXtBlock(nn.Module):
    """ResBlock (optional concatenated skip) -> TimestepBlock (FiLM on r) -> AttnBlock (if ``heads``)."""

    def __init__(
        self,
        channels: int,
        skip_channels: int,
        heads: int,
        r_embedding_dim: int,
        cond_channels: int,
        kernel_size: int,
        dropout: float,
    ):
        super().__init__()
        self.res = ResBlock(channels, skip_channels=skip_channels, kernel_size=kernel_size, dropout=dropout)
        self.time = TimestepBlock(channels, r_embedding_dim)
        self.attn = AttnBlock(channels, cond_channels, heads, self_attn=True, dropout=dropout) if heads else None

    def forward(
        self, x: torch.Tensor, r_embedding: torch.Tensor, skip: torch.Tensor | None, text: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.time(self.res(x, skip), r_embedding)
        if self.attn is not None:
            x = self.attn(x, text)
        return x


@dataclass
class DiffNeXtConfig:
    """Sizes of the Stage B U-Net; the single source of its defaults (Würstchen v2 scale, ~0.85B parameters
    without text). See :class:`DiffNeXt` for what each value shapes."""

    latent_channels: int = 4
    """Channels of the Stage A latent it denoises (Stage A's ``latent_channels``)."""
    patch_size: int = 2
    widths: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    blocks: list[int] = field(default_factory=lambda: [4, 4, 14, 4])
    heads: list[int] = field(default_factory=lambda: [0, 10, 20, 20])
    """Attention heads per level (0: no attention at that level)."""
    semantic_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Levels whose residual blocks take the (resized, projected) semantic latent."""
    semantic_channels: int = 16
    """Channels of the semantic latent (the compressor's ``latent_channels``)."""
    semantic_proj_channels: int | None = None
    """Channels each level projects the semantic latent to (None: a quarter of the level's width)."""
    text_channels: int = 0
    """Width of text tokens fed to the attention blocks (0: no text conditioning)."""
    r_embedding_dim: int = 64
    kernel_size: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        widths, blocks, heads = self.widths, self.blocks, self.heads
        if not (len(widths) == len(blocks) == len(heads)) or not widths:
            raise ValueError(
                f"widths, blocks and heads need one entry per level and the same length, got "
                f"{len(widths)} widths {widths}, {len(blocks)} blocks {blocks}, {len(heads)} heads {heads}"
            )
        if min(widths) < 1:
            raise ValueError(f"widths must be positive, got {widths}")
        if min(blocks) < 1:
            raise ValueError(f"every level needs at least one block, got blocks={blocks}")
        for i, (width, head) in enumerate(zip(widths, heads)):
            if head < 0:
                raise ValueError(f"heads must be >= 0 (0 = no attention), got heads={heads}")
            if head and width % head:
                raise ValueError(f"level {i}: width {width} is not divisible by {head} heads")
        levels = self.semantic_levels
        if any(not 0 <= i < len(widths) for i in levels) or len(set(levels)) != len(levels):
            raise ValueError(
                f"semantic_levels must be distinct level indices in [0, {len(widths) - 1}], got {levels} "
                "(the default [1, 2, 3] assumes 4 levels; set it for other depths)"
            )
        for name in ("latent_channels", "patch_size", "semantic_channels", "r_embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.semantic_proj_channels is not None and self.semantic_proj_channels < 1:
            raise ValueError(f"semantic_proj_channels must be >= 1 or None, got {self.semantic_proj_channels}")
        if self.text_channels < 0:
            raise ValueError(f"text_channels must be >= 0 (0 = no text conditioning), got {self.text_channels}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def divisor(self) -> int:
        """The latent height and width must be multiples of this (``patch_size * 2 ** (levels - 1)``)."""
        return self.patch_size * 2 ** (len(self.widths) - 1)


class DiffNeXt(nn.Module):
    """DiffNeXt-style U-Net predicting the noise in a Stage A latent, conditioned on the semantic latent.

    Layout::

        x_t [B, C, H, W] -> PixelUnshuffle(p) -> 1x1 conv -> LayerNorm2d                       (patchify)
        down, level i = 0..L-1:  [downsample if i > 0] then blocks[i] x DiffNeXtBlock
        up,   level i = L-1..0:  [upsample if i < L-1] then blocks[i] x DiffNeXtBlock
        LayerNorm2d -> 1x1 conv to 2*C*p^2 -> PixelShuffle(p) -> a, b
        eps_pred = (x_t - a) / b,  b = sigmoid(.) * (1 - 2e-3) + 1e-3

    A DiffNeXtBlock is ResBlock -> TimestepBlock -> AttnBlock (self-attention; text tokens appended to keys/values
    when ``text_channels > 0``; no attention where ``heads[i] == 0``). Downsample: LayerNorm2d + 2x2 stride-2 conv;
    upsample: LayerNorm2d + 2x2 stride-2 transposed conv. The deepest level runs ``blocks[-1]`` blocks on the way
    down and again on the way up.

    U-Net skips are *concatenated* (as in the reference DiffNeXt): the output of down level i (i < L-1) is fed as
    ResBlock skip input of the *first* up block of level i (concatenated after its norm, before its MLP).

    Semantic conditioning: for each level in ``semantic_levels`` the semantic latent (any h, w) is bicubic-resized
    (align_corners=False, antialiased, in float32) to that level's spatial size and projected by one 1x1 conv
    per level to ``semantic_proj_channels`` (default ``max(1, widths[i] // 4)``); the projection is computed once
    per forward and concatenated into every ResBlock of that level, down and up path.

    Text (optional, ``text_channels > 0``): tokens [B, L, text_channels] -> Linear + LayerNorm (shared), then each
    attention block maps them into its width and appends them to its keys/values. With no attention level the
    text is ignored (and no text parameters exist).

    Init: xavier-uniform convs/linears with zero biases, ResBlock output linears scaled by
    ``1/sqrt(total blocks)``, TimestepBlock FiLM mappers zero (identity at start), output conv zero, so the
    untrained network predicts ``eps = x_t / 0.5`` (the reference initialisation).
    """

    def __init__(self, config: DiffNeXtConfig | None = None):
        super().__init__()
        self.config = config = config or DiffNeXtConfig()
        widths, blocks, heads = tuple(config.widths), tuple(config.blocks), tuple(config.heads)
        self.latent_channels = config.latent_channels
        self.patch_size = patch_size = config.patch_size
        self.widths, self.blocks, self.heads = widths, blocks, heads
        self.semantic_levels = tuple(sorted(config.semantic_levels))
        self.semantic_channels = config.semantic_channels
        self.text_channels = text_channels = config.text_channels
        self.r_embedding_dim = r_embedding_dim = config.r_embedding_dim
        latent_channels, kernel_size, dropout = config.latent_channels, config.kernel_size, config.dropout
        levels = len(widths)
        proj = {i: (config.semantic_proj_channels or max(1, widths[i] // 4)) for i in self.semantic_levels}
        uses_text = text_channels > 0 and any(heads)
        cond_channels = text_channels if uses_text else 0

        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(patch_size),
            nn.Conv2d(latent_channels * patch_size**2, widths[0], kernel_size=1),
            LayerNorm2d(widths[0], elementwise_affine=False, eps=1e-6),
        )
        self.text_mapper = (
            nn.Sequential(
                nn.Linear(text_channels, text_channels),
                nn.LayerNorm(text_channels, elementwise_affine=False, eps=1e-6),
            )
            if uses_text
            else None
        )
        self.semantic_mappers = nn.ModuleDict(
            {str(i): nn.Conv2d(config.semantic_channels, proj[i], kernel_size=1) for i in self.semantic_levels}
        )

        def block(i: int, skip: int) -> DiffNeXtBlock:
            return DiffNeXtBlock(
                widths[i], skip + proj.get(i, 0), heads[i], r_embedding_dim, cond_channels, kernel_size, dropout
            )

        self.down_levels = nn.ModuleList(nn.ModuleList(block(i, 0) for _ in range(blocks[i])) for i in range(levels))
        self.downsamplers = nn.ModuleList(
            nn.Sequential(
                LayerNorm2d(widths[i], elementwise_affine=False, eps=1e-6),
                nn.Conv2d(widths[i], widths[i + 1], kernel_size=2, stride=2),
            )
            for i in range(levels - 1)
        )
        # up_levels[i] / upsamplers[i] belong to level i (upsamplers[i]: level i+1 -> level i); run deepest first.
        self.up_levels = nn.ModuleList(
            nn.ModuleList(block(i, widths[i] if (j == 0 and i < levels - 1) else 0) for j in range(blocks[i]))
            for i in range(levels)
        )
        self.upsamplers = nn.ModuleList(
            nn.Sequential(
                LayerNorm2d(widths[i + 1], elementwise_affine=False, eps=1e-6),
                nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2),
            )
            for i in range(levels - 1)
        )
        self.out = nn.Sequential(
            LayerNorm2d(widths[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(widths[0], 2 * latent_channels * patch_size**2, kernel_size=1),
            nn.PixelShuffle(patch_size),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        scale = 1.0 / math.sqrt(2 * sum(self.blocks))
        for level in list(self.down_levels) + list(self.up_levels):
            for block in level:
                block.res.mlp[-1].weight.data.mul_(scale)
                nn.init.zeros_(block.time.mapper.weight)
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    @property
    def divisor(self) -> int:
        """The latent height and width must be multiples of this (``patch_size * 2 ** (levels - 1)``)."""
        return self.config.divisor

    def _check_inputs(self, x_t, r, semantic, text) -> None:
        if x_t.ndim != 4 or x_t.shape[1] != self.latent_channels:
            raise ValueError(f"x_t must be [B, {self.latent_channels}, H, W], got {tuple(x_t.shape)}")
        height, width = x_t.shape[-2:]
        if height % self.divisor or width % self.divisor:
            raise ValueError(
                f"latent size {height}x{width} is not divisible by patch_size * 2**(levels-1) = {self.divisor} "
                f"(patch {self.patch_size}, {len(self.widths)} levels); crop or pad the latent"
            )
        batch = x_t.shape[0]
        if r.ndim != 1 or r.shape[0] != batch:
            raise ValueError(f"r must have shape [B] = [{batch}], got {tuple(r.shape)}")
        if semantic.ndim != 4 or semantic.shape[0] != batch or semantic.shape[1] != self.semantic_channels:
            raise ValueError(f"semantic must be [{batch}, {self.semantic_channels}, h, w], got {tuple(semantic.shape)}")
        if text is not None:
            if self.text_channels == 0:
                raise ValueError("text was given but this DiffNeXt has text_channels=0 (no text conditioning)")
            if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.text_channels:
                raise ValueError(f"text must be [{batch}, L, {self.text_channels}], got {tuple(text.shape)}")

    def _semantic_at(
        self, semantic: torch.Tensor, level: int, size: tuple[int, int], dtype: torch.dtype
    ) -> torch.Tensor:
        if tuple(semantic.shape[-2:]) != size:
            semantic = F.interpolate(semantic.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        return self.semantic_mappers[str(level)](semantic.to(dtype))

    def forward(
        self, x_t: torch.Tensor, r: torch.Tensor, semantic: torch.Tensor, text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted noise for ``x_t`` [B, C, H, W] at noise level ``r`` [B] in [0, 1].

        ``semantic``: [B, semantic_channels, h, w], any h, w (resized per level; zeros = unconditional).
        ``text``: optional [B, L, text_channels] tokens (only when ``text_channels > 0``).
        """
        self._check_inputs(x_t, r, semantic, text)
        dtype = self.embedding[1].weight.dtype
        r_embedding = timestep_embedding(r, self.r_embedding_dim).to(dtype)
        if text is not None and self.text_mapper is not None:
            text = self.text_mapper(text.to(dtype))
        else:
            text = None
        x = self.embedding(x_t.to(dtype))
        base_h, base_w = x.shape[-2:]
        semantic_maps = {
            i: self._semantic_at(semantic, i, (base_h >> i, base_w >> i), dtype) for i in self.semantic_levels
        }

        level_outputs = []
        for i, level in enumerate(self.down_levels):
            if i > 0:
                x = self.downsamplers[i - 1](x)
            for block in level:
                x = block(x, r_embedding, semantic_maps.get(i), text)
            level_outputs.append(x)

        last = len(self.widths) - 1
        for i in reversed(range(len(self.widths))):
            if i < last:
                x = self.upsamplers[i](x)
            for j, block in enumerate(self.up_levels[i]):
                skip = semantic_maps.get(i)
                if j == 0 and i < last:
                    skip = level_outputs[i] if skip is None else torch.cat([level_outputs[i], skip], dim=1)
                x = block(x, r_embedding, skip, text)

        a, b = self.out(x).chunk(2, dim=1)
        b = b.sigmoid() * (1 - 2 * _EPS) + _EPS
        return (x_t - a) / b
