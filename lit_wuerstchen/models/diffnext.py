"""Stage B's network: the diffusion decoder on the Stage A latent, conditioned on the semantic latent (v2 "DiffNeXt";
docs/design.md "Stage B").

Pure ``nn.Module``: no Lightning, no file I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

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
    semantic_mappers: Literal["shared", "per_path"] = "shared"
    """``per_path``: separate 1x1 projections for the down and the up path of each level (the released model);
    ``shared``: one per level, used by both paths."""
    semantic_align_corners: bool = False
    """Resize the semantic latent with ``align_corners=True``, always, even to its own size (the released model);
    False: ``align_corners=False``, skipped when the size already matches."""
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
        if self.semantic_mappers not in ("shared", "per_path"):
            raise ValueError(f"semantic_mappers must be 'shared' or 'per_path', got {self.semantic_mappers!r}")

    @classmethod
    def released_v2(cls) -> DiffNeXtConfig:
        """Structurally the released Würstchen v2 decoder (``warp-ai/wuerstchen`` ``decoder``, diffusers
        ``WuerstchenDiffNeXt`` defaults, 1,055,365,280 parameters): semantic latent projected to 1024 channels by
        separate down/up mappers, resized with ``align_corners=True``; CLIP ViT-H-14 text (1024) in its attention;
        dropout 0.1."""
        return cls(
            semantic_proj_channels=1024,
            semantic_mappers="per_path",
            semantic_align_corners=True,
            text_channels=1024,
            dropout=0.1,
        )

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
    (antialiased, in float32; ``align_corners`` per ``semantic_align_corners``) to that level's spatial size and
    projected by a 1x1 conv to ``semantic_proj_channels`` (default ``max(1, widths[i] // 4)``): one per level
    shared by both paths, or one for the down and one for the up path (``semantic_mappers="per_path"``, as
    released). The projections are computed once per forward and concatenated into every ResBlock of that level.

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
            {
                key: nn.Conv2d(config.semantic_channels, proj[i], kernel_size=1)
                for i in self.semantic_levels
                for key in self._mapper_keys(i)
            }
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

    def _mapper_keys(self, level: int) -> tuple[str, str]:
        """(down-path, up-path) names of a level's semantic projection in ``semantic_mappers``."""
        if self.config.semantic_mappers == "per_path":
            return f"down{level}", f"up{level}"
        return str(level), str(level)

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

    def _semantic_maps(self, semantic: torch.Tensor, base: tuple[int, int], dtype: torch.dtype) -> dict:
        """Projected semantic latent per (path, level): resized to each level's size (float32 maths), then mapped."""
        maps = {}
        align = self.config.semantic_align_corners
        for i in self.semantic_levels:
            size = (base[0] >> i, base[1] >> i)
            resized = semantic
            if align or tuple(semantic.shape[-2:]) != size:
                resized = F.interpolate(
                    semantic.float(), size=size, mode="bicubic", align_corners=align, antialias=True
                )
            # Channels-last like the activations, so the ResBlocks' concatenation feeds their MLP without a copy.
            resized = resized.to(dtype, memory_format=torch.channels_last)
            down, up = self._mapper_keys(i)
            maps["down", i] = self.semantic_mappers[down](resized)
            maps["up", i] = maps["down", i] if up == down else self.semantic_mappers[up](resized)
        return maps

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
        semantic_maps = self._semantic_maps(semantic, tuple(x.shape[-2:]), dtype)

        level_outputs = []
        for i, level in enumerate(self.down_levels):
            if i > 0:
                x = self.downsamplers[i - 1](x)
            for block in level:
                x = block(x, r_embedding, semantic_maps.get(("down", i)), text)
            level_outputs.append(x)

        last = len(self.widths) - 1
        for i in reversed(range(len(self.widths))):
            if i < last:
                x = self.upsamplers[i](x)
            for j, block in enumerate(self.up_levels[i]):
                skip = semantic_maps.get(("up", i))
                if j == 0 and i < last:
                    skip = level_outputs[i] if skip is None else torch.cat([level_outputs[i], skip], dim=1)
                x = block(x, r_embedding, skip, text)

        a, b = self.out(x).chunk(2, dim=1)
        b = b.sigmoid() * (1 - 2 * _EPS) + _EPS
        return (x_t - a) / b
