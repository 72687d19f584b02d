"""Stable Cascade's (Würstchen v3) U-Net: Stage C (the text-conditional prior) and Stage B (the decoder) are one
network with two configs, the computation of diffusers' ``StableCascadeUNet`` (docs/design.md "Stable Cascade
networks").

Layout::

    x [B, C, H, W] -> PixelUnshuffle(p) -> 1x1 conv -> LayerNorm2d                                   (embedding)
        [+ effnet_mapper(effnet resized to that size)] [+ pixels_mapper(pixels) resized]                (Stage B)
    down, level i = 0..L-1: [down_downscalers[i] if i > 0] then down_repeats[i] x (the level's blocks, 1x1 conv
                            between runs)
    up,   level i = L-1..0: up_repeats[i] x (the level's blocks; the first ResBlock of a non-deepest level takes that
                            level's down output as a concatenated skip on every run) then the upscaler to level i-1
    LayerNorm2d -> 1x1 conv -> PixelShuffle(p)                                                                (clf)

A level's blocks are ``n`` x [ResBlock -> TimestepBlock (FiLM on ``[r, sca, crp]`` embeddings) -> AttnBlock (if the
level has heads)]. Every AttnBlock attends to the conditioning tokens ``clip``: the pooled text embedding mapped to
``clip_tokens`` tokens (both stages) and, in Stage C, the text hidden states and the image embedding mapped to
``clip_tokens`` tokens, concatenated as ``[text, pooled, image]`` and LayerNorm-ed. The output is the raw noise
estimate (no ``a, b`` head as in v2).

The module names are the released ones (``down_blocks``, ``up_upscalers``, ``clf``...; ``up_*`` lists deepest level
first), so the diffusers key map only renames inside the shared blocks (``interop/keymaps.cascade_key_map``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, InterpolatedScaler, LayerNorm2d, ResBlock, TimestepBlock, timestep_embedding

TIMESTEP_CONDITIONS = ("sca", "crp")


@dataclass
class CascadeUNetConfig:
    """Sizes of a Stable Cascade U-Net; the defaults are the released Stage C (3.6B). Per-level lists run from the
    shallowest level to the deepest; see the presets ``released_stage_c`` ... ``released_stage_b_lite``."""

    latent_channels: int = 16
    """Channels in and out (Stage C: the 16-channel semantic latent; Stage B: the 4-channel Stage A latent)."""
    patch_size: int = 1
    widths: list[int] = field(default_factory=lambda: [2048, 2048])
    heads: list[int] = field(default_factory=lambda: [32, 32])
    """Attention heads per level (0: no AttnBlock at that level)."""
    down_blocks: list[int] = field(default_factory=lambda: [8, 24])
    """[ResBlock, TimestepBlock, AttnBlock] groups per level on the way down."""
    up_blocks: list[int] = field(default_factory=lambda: [8, 24])
    """Groups per level on the way up (shallowest first, as every list here; diffusers lists them deepest first)."""
    down_repeats: list[int] = field(default_factory=lambda: [1, 1])
    """Times each level's down blocks run (shared weights, a 1x1 conv between runs)."""
    up_repeats: list[int] = field(default_factory=lambda: [1, 1])
    cond_channels: int = 2048
    """Width of the conditioning tokens the AttnBlocks map into their own width."""
    clip_text_pooled_channels: int = 1280
    """Pooled (projected) CLIP text embedding, mapped to ``clip_tokens`` tokens; every Stable Cascade network has it."""
    clip_text_channels: int = 1280
    """CLIP text hidden states (0: none, Stage B)."""
    clip_image_channels: int = 768
    """CLIP image embedding, mapped to ``clip_tokens`` tokens (0: none, Stage B); set together with the text."""
    clip_tokens: int = 4
    effnet_channels: int = 0
    """EfficientNet (semantic) latent added after the embedding (Stage B: 16; 0: none)."""
    pixel_channels: int = 0
    """Low-resolution pixels added after the embedding (Stage B: 3; 0: none)."""
    r_embedding_dim: int = 64
    timestep_conditions: list[str] = field(default_factory=lambda: list(TIMESTEP_CONDITIONS))
    """Scalar conditions embedded beside ``r`` (of "sca", "crp"; Stage B: "sca" only)."""
    kernel_size: int = 3
    dropout: list[float] = field(default_factory=lambda: [0.1, 0.1])
    self_attn: list[bool] = field(default_factory=lambda: [True, True])
    """Per level: the image tokens attend to themselves as well as to the conditioning tokens."""
    level_resize: list[bool] | None = field(default_factory=lambda: [False])
    """None: 2x2 strided conv / transposed conv between levels (Stage B). A list (one per level switch): a 1x1 conv
    with a bilinear 2x resize where True (Stage C: ``[False]``, both levels at the latent's resolution)."""

    def __post_init__(self) -> None:
        levels = len(self.widths)
        per_level = ("heads", "down_blocks", "up_blocks", "down_repeats", "up_repeats", "dropout", "self_attn")
        if not levels or any(len(getattr(self, name)) != levels for name in per_level):
            raise ValueError(
                "widths, "
                + ", ".join(per_level)
                + f" need one entry per level, got widths {self.widths}, "
                + ", ".join(f"{name} {getattr(self, name)}" for name in per_level)
            )
        if self.level_resize is not None and len(self.level_resize) != levels - 1:
            raise ValueError(f"level_resize needs one entry per level switch ({levels - 1}), got {self.level_resize}")
        if min(self.widths) < 1 or min(self.down_blocks) < 1 or min(self.up_blocks) < 1:
            raise ValueError("widths, down_blocks and up_blocks must be positive")
        if min(self.down_repeats) < 1 or min(self.up_repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {self.down_repeats} / {self.up_repeats}")
        for i, (width, head) in enumerate(zip(self.widths, self.heads)):
            if head < 0 or (head and width % head):
                raise ValueError(f"level {i}: heads must be 0 or divide width {width}, got {head}")
        for name in ("latent_channels", "patch_size", "cond_channels", "clip_text_pooled_channels", "clip_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("clip_text_channels", "clip_image_channels", "effnet_channels", "pixel_channels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: none), got {getattr(self, name)}")
        if (self.clip_text_channels > 0) != (self.clip_image_channels > 0):
            raise ValueError("clip_text_channels and clip_image_channels are set together (Stage C) or both 0")
        if self.r_embedding_dim < 2:
            raise ValueError(f"r_embedding_dim must be >= 2, got {self.r_embedding_dim}")
        unknown = [c for c in self.timestep_conditions if c not in TIMESTEP_CONDITIONS]
        if unknown or len(set(self.timestep_conditions)) != len(self.timestep_conditions):
            raise ValueError(f"timestep_conditions must be distinct names of {TIMESTEP_CONDITIONS}, got {unknown}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        if any(not 0.0 <= p < 1.0 for p in self.dropout):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def released_stage_c(cls) -> CascadeUNetConfig:
        """Stage C, 3.6B (``stabilityai/stable-cascade-prior`` ``prior``): the defaults."""
        return cls()

    @classmethod
    def released_stage_c_lite(cls) -> CascadeUNetConfig:
        """Stage C lite, 1B (``prior_lite``)."""
        return cls(widths=[1536, 1536], heads=[24, 24], down_blocks=[4, 12], up_blocks=[4, 12], cond_channels=1536)

    @classmethod
    def released_stage_b(cls) -> CascadeUNetConfig:
        """Stage B, 1.5B (``stabilityai/stable-cascade`` ``decoder``)."""
        return cls._stage_b(widths=[320, 640, 1280, 1280], heads=[0, 0, 20, 20], down_blocks=[2, 6, 28, 6],
                            up_repeats=[2, 2, 3, 3])  # fmt: skip

    @classmethod
    def released_stage_b_lite(cls) -> CascadeUNetConfig:
        """Stage B lite, 700M (``decoder_lite``)."""
        return cls._stage_b(widths=[320, 576, 1152, 1152], heads=[0, 0, 18, 18], down_blocks=[2, 4, 14, 4],
                            up_repeats=[2, 2, 2, 2])  # fmt: skip

    @classmethod
    def _stage_b(cls, widths: list[int], heads: list[int], down_blocks: list[int], up_repeats: list[int]):
        return cls(
            latent_channels=4,
            patch_size=2,
            widths=widths,
            heads=heads,
            down_blocks=down_blocks,
            up_blocks=list(down_blocks),
            down_repeats=[1, 1, 1, 1],
            up_repeats=up_repeats,
            cond_channels=1280,
            clip_text_channels=0,
            clip_image_channels=0,
            effnet_channels=16,
            pixel_channels=3,
            timestep_conditions=["sca"],
            dropout=[0.0, 0.0, 0.1, 0.1],
            self_attn=[True] * 4,
            level_resize=None,
        )


def _norm(channels: int) -> LayerNorm2d:
    return LayerNorm2d(channels, elementwise_affine=False, eps=1e-6)


def _condition_mapper(in_channels: int, width: int) -> nn.Sequential:
    """Stage B's effnet / pixel mapper: 1x1 conv to 4x, GELU, 1x1 conv to the width, LayerNorm2d."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width * 4, kernel_size=1),
        nn.GELU(),
        nn.Conv2d(width * 4, width, kernel_size=1),
        _norm(width),
    )


class CascadeUNet(nn.Module):
    """Stable Cascade's Stage C / Stage B network (the module docstring); ``forward`` returns the noise estimate."""

    def __init__(self, config: CascadeUNetConfig | None = None):
        super().__init__()
        self.config = config = config or CascadeUNetConfig()
        widths, levels = config.widths, len(config.widths)
        c_in = config.latent_channels * config.patch_size**2

        if config.effnet_channels:
            self.effnet_mapper = _condition_mapper(config.effnet_channels, widths[0])
        if config.pixel_channels:
            self.pixels_mapper = _condition_mapper(config.pixel_channels, widths[0])
        self.clip_txt_pooled_mapper = nn.Linear(
            config.clip_text_pooled_channels, config.cond_channels * config.clip_tokens
        )
        if config.clip_text_channels:
            self.clip_txt_mapper = nn.Linear(config.clip_text_channels, config.cond_channels)
            self.clip_img_mapper = nn.Linear(config.clip_image_channels, config.cond_channels * config.clip_tokens)
        self.clip_norm = nn.LayerNorm(config.cond_channels, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(config.patch_size), nn.Conv2d(c_in, widths[0], kernel_size=1), _norm(widths[0])
        )

        def level_blocks(i: int, groups: int, skip: int) -> nn.ModuleList:
            blocks = nn.ModuleList()
            for j in range(groups):
                blocks.append(
                    ResBlock(
                        widths[i], skip_channels=skip if j == 0 else 0, kernel_size=config.kernel_size,
                        dropout=config.dropout[i],
                    )
                )  # fmt: skip
                blocks.append(TimestepBlock(widths[i], config.r_embedding_dim, conds=config.timestep_conditions))
                if config.heads[i]:
                    blocks.append(
                        AttnBlock(widths[i], config.cond_channels, config.heads[i], config.self_attn[i],
                                  config.dropout[i])
                    )  # fmt: skip
            return blocks

        def repeat_mappers(i: int, repeats: int) -> nn.ModuleList:
            return nn.ModuleList(nn.Conv2d(widths[i], widths[i], kernel_size=1) for _ in range(repeats - 1))

        # Identity at index 0 (down) / last (up) keeps the released indices: scaler k belongs to block list k.
        self.down_blocks = nn.ModuleList(level_blocks(i, config.down_blocks[i], 0) for i in range(levels))
        self.down_downscalers = nn.ModuleList(
            [nn.Identity()]
            + [nn.Sequential(_norm(widths[i - 1]), self._scaler(i - 1, "down")) for i in range(1, levels)]
        )
        self.down_repeat_mappers = nn.ModuleList(repeat_mappers(i, config.down_repeats[i]) for i in range(levels))
        deepest_first = list(reversed(range(levels)))
        self.up_blocks = nn.ModuleList(
            level_blocks(i, config.up_blocks[i], widths[i] if i < levels - 1 else 0) for i in deepest_first
        )
        self.up_upscalers = nn.ModuleList(
            nn.Sequential(_norm(widths[i]), self._scaler(i - 1, "up")) if i > 0 else nn.Identity()
            for i in deepest_first
        )
        self.up_repeat_mappers = nn.ModuleList(repeat_mappers(i, config.up_repeats[i]) for i in deepest_first)
        self.clf = nn.Sequential(
            _norm(widths[0]),
            nn.Conv2d(widths[0], config.latent_channels * config.patch_size**2, kernel_size=1),
            nn.PixelShuffle(config.patch_size),
        )
        self.reset_parameters()

    def _scaler(self, level: int, mode: str) -> nn.Module:
        """The switch between ``level`` and ``level + 1`` (``mode`` "down": into the deeper one)."""
        low, high = self.config.widths[level], self.config.widths[level + 1]
        if self.config.level_resize is None:
            if mode == "down":
                return nn.Conv2d(low, high, kernel_size=2, stride=2)
            return nn.ConvTranspose2d(high, low, kernel_size=2, stride=2)
        resize = self.config.level_resize[level]
        return (
            InterpolatedScaler(low, high, mode, resize)
            if mode == "down"
            else InterpolatedScaler(high, low, mode, resize)
        )

    def reset_parameters(self) -> None:
        """The official initialisation (Stable Cascade's ``StageC`` / ``StageB``): Xavier-uniform convs and linears
        with zero biases, N(0, 0.02) for the conditioning mappers, the embedding conv Xavier with gain 0.02, the
        output conv zero, every ResBlock's last linear scaled by ``sqrt(1 / sum(down_blocks))`` and every
        TimestepBlock mapper's weight zero (``sca``/``crp`` too; diffusers' unused ``_init_weights`` zeroes only
        ``r``'s). The transposed convs keep PyTorch's init, as released."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name in ("clip_txt_pooled_mapper", "clip_txt_mapper", "clip_img_mapper"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=0.02)
        for name in ("effnet_mapper", "pixels_mapper"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name)[0].weight, std=0.02)
                nn.init.normal_(getattr(self, name)[2].weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
        nn.init.zeros_(self.clf[1].weight)
        scale = (1.0 / sum(self.config.down_blocks)) ** 0.5
        for level in list(self.down_blocks) + list(self.up_blocks):
            for block in level:
                if isinstance(block, ResBlock):
                    block.mlp[-1].weight.data.mul_(scale)
                elif isinstance(block, TimestepBlock):
                    for name in ("mapper", *(f"mapper_{c}" for c in block.conds)):
                        nn.init.zeros_(getattr(block, name).weight)

    def clip_tokens(
        self,
        clip_text_pooled: torch.Tensor,
        clip_text: torch.Tensor | None = None,
        clip_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The AttnBlocks' conditioning tokens ``[B, N, cond_channels]``: ``[text, pooled, image]`` with text (Stage
        C), else the pooled tokens alone; LayerNorm-ed."""
        batch, tokens = clip_text_pooled.shape[0], self.config.clip_tokens
        if clip_text_pooled.ndim == 2:
            clip_text_pooled = clip_text_pooled[:, None]
        pooled = self.clip_txt_pooled_mapper(clip_text_pooled).view(batch, clip_text_pooled.shape[1] * tokens, -1)
        if clip_text is None:
            return self.clip_norm(pooled)
        if clip_image is None:  # "no image" is a zero embedding, as the released pipeline passes it
            clip_image = clip_text.new_zeros(batch, 1, self.config.clip_image_channels)
        elif clip_image.ndim == 2:
            clip_image = clip_image[:, None]
        image = self.clip_img_mapper(clip_image).view(batch, clip_image.shape[1] * tokens, -1)
        return self.clip_norm(torch.cat([self.clip_txt_mapper(clip_text), pooled, image], dim=1))

    def r_embedding(self, r: torch.Tensor, conditions: dict[str, torch.Tensor | None], dtype) -> torch.Tensor:
        """``[r, *timestep_conditions]`` sinusoidal embeddings, concatenated (a missing condition is 0)."""
        parts = [timestep_embedding(r, self.config.r_embedding_dim)]
        for name in self.config.timestep_conditions:
            value = conditions.get(name)
            value = torch.zeros_like(r) if value is None else value.reshape(-1).expand_as(r).to(r.dtype)
            parts.append(timestep_embedding(value, self.config.r_embedding_dim))
        return torch.cat(parts, dim=1).to(dtype)

    def _check_inputs(self, x, clip_text_pooled, clip_text, clip_image, effnet, sca, crp) -> None:
        config = self.config
        if x.ndim != 4 or x.shape[1] != config.latent_channels:
            raise ValueError(f"x must be [B, {config.latent_channels}, H, W], got {tuple(x.shape)}")
        if clip_text_pooled.shape[-1] != config.clip_text_pooled_channels:
            raise ValueError(
                f"clip_text_pooled must be [B, ({'N, ' if clip_text_pooled.ndim == 3 else ''})"
                f"{config.clip_text_pooled_channels}], got {tuple(clip_text_pooled.shape)}"
            )
        if clip_text is not None and not config.clip_text_channels:
            raise ValueError("clip_text was given but this network has no text mapper (clip_text_channels=0)")
        if clip_text is not None and (clip_text.ndim != 3 or clip_text.shape[-1] != config.clip_text_channels):
            raise ValueError(f"clip_text must be [B, L, {config.clip_text_channels}], got {tuple(clip_text.shape)}")
        if clip_image is not None and clip_text is None:
            raise ValueError("clip_image is read only together with clip_text (as the released Stage C does)")
        if clip_image is not None and clip_image.shape[-1] != config.clip_image_channels:
            raise ValueError(
                f"clip_image must end in {config.clip_image_channels} channels, got {tuple(clip_image.shape)}"
            )
        if effnet is not None and not config.effnet_channels:
            raise ValueError("effnet was given but this network has no effnet mapper (effnet_channels=0)")
        for name, value in (("sca", sca), ("crp", crp)):
            if value is not None and name not in config.timestep_conditions:
                raise ValueError(f"{name} was given but is not one of timestep_conditions {config.timestep_conditions}")
        # Only the patch size must divide: an odd size deeper down is resized back to its skip's on the way up.
        if x.shape[-2] % config.patch_size or x.shape[-1] % config.patch_size:
            raise ValueError(f"x's size {tuple(x.shape[-2:])} is not a multiple of patch_size {config.patch_size}")

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        clip_text_pooled: torch.Tensor,
        clip_text: torch.Tensor | None = None,
        clip_image: torch.Tensor | None = None,
        effnet: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        sca: torch.Tensor | None = None,
        crp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise estimate for ``x`` [B, latent_channels, H, W] at noise level ``r`` [B] in [0, 1].

        - ``clip_text_pooled``: [B, 1, pooled] (or [B, pooled]) pooled CLIP text embedding (required: every released
          network reads it; zeros for the unconditional pass).
        - ``clip_text``: [B, L, clip_text_channels] CLIP text hidden states (Stage C); without it only the pooled
          tokens condition the network.
        - ``clip_image``: [B, N, clip_image_channels] (or [B, clip_image_channels]) CLIP image embeddings (Stage C,
          with ``clip_text``); None is one zero embedding, the released pipeline's "no image".
        - ``effnet``: [B, effnet_channels, h, w] semantic latent (Stage B), bilinearly resized to the embedding's
          size; None adds nothing.
        - ``pixels``: [B, pixel_channels, h, w] low-resolution pixels (Stage B); None is 8x8 zeros, as released.
        - ``sca``, ``crp``: scalar conditions ([B] or one value) embedded beside ``r``; None is 0.
        """
        self._check_inputs(x, clip_text_pooled, clip_text, clip_image, effnet, sca, crp)
        dtype = self.embedding[1].weight.dtype
        r = r.reshape(-1)
        if r.numel() == 1 and x.shape[0] != 1:
            r = r.expand(x.shape[0])
        r_embedding = self.r_embedding(r, {"sca": sca, "crp": crp}, dtype)
        clip = self.clip_tokens(
            clip_text_pooled.to(dtype),
            None if clip_text is None else clip_text.to(dtype),
            None if clip_image is None else clip_image.to(dtype),
        )
        x = self.embedding(x.to(dtype))
        if effnet is not None:
            resized = F.interpolate(effnet.to(dtype), size=x.shape[-2:], mode="bilinear", align_corners=True)
            x = x + self.effnet_mapper(resized)
        if self.config.pixel_channels:
            if pixels is None:
                pixels = x.new_zeros(x.shape[0], self.config.pixel_channels, 8, 8)
            mapped = self.pixels_mapper(pixels.to(dtype))
            x = x + F.interpolate(mapped, size=x.shape[-2:], mode="bilinear", align_corners=True)

        level_outputs = []  # deepest first, as the up path reads them
        for blocks, downscaler, repeat_mappers in zip(
            self.down_blocks, self.down_downscalers, self.down_repeat_mappers
        ):
            x = downscaler(x)
            for run in range(len(repeat_mappers) + 1):
                x = self._run_blocks(blocks, x, r_embedding, clip)
                if run < len(repeat_mappers):
                    x = repeat_mappers[run](x)
            level_outputs.insert(0, x)

        x = level_outputs[0]
        for i, (blocks, upscaler, repeat_mappers) in enumerate(
            zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers)
        ):
            skip = level_outputs[i] if i > 0 else None
            for run in range(len(repeat_mappers) + 1):
                x = self._run_blocks(blocks, x, r_embedding, clip, skip)
                if run < len(repeat_mappers):
                    x = repeat_mappers[run](x)
            x = upscaler(x)
        return self.clf(x)

    @staticmethod
    def _run_blocks(blocks, x, r_embedding, clip, skip=None) -> torch.Tensor:
        for k, block in enumerate(blocks):
            if isinstance(block, ResBlock):
                level_skip = skip if k == 0 else None
                if level_skip is not None and x.shape[-2:] != level_skip.shape[-2:]:
                    # An odd size lost a row/column going down: bring x back to the skip's size (in float32).
                    x = F.interpolate(x.float(), level_skip.shape[-2:], mode="bilinear", align_corners=True).to(x.dtype)
                x = block(x, level_skip)
            elif isinstance(block, TimestepBlock):
                x = block(x, r_embedding)
            else:
                x = block(x, clip)
        return x
