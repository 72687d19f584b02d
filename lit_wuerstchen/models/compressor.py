"""Semantic compressor: image -> 16 x h x w semantic latent (Stage B's condition, Stage C's target; docs/design.md
"Semantic compressor").

Pure ``nn.Module``: no Lightning, no file I/O. ImageNet initialisation (``pretrained``) is applied by
:func:`lit_wuerstchen.checkpoints.build_compressor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .blocks import ResBlock

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_EFFICIENTNETS = ("efficientnet_v2_s", "efficientnet_v2_l")
BACKBONES = _EFFICIENTNETS + ("tiny",)


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def semantic_latent_size(
    image_size: int | tuple[int, int], compression: float, rounding: str = "half_up"
) -> tuple[int, int]:
    """Semantic latent (height, width) for an image of ``image_size`` at a given compression ratio.

    Rule, applied to height and width separately: ``side = max(1, floor(image_side / compression + 0.5))``, i.e.
    round half *up* (not Python's round-half-to-even). 1024 px at 42.67 -> 24; 512 px at 42.67 -> 12;
    64 px at 16 -> 4. Stage B, Stage C and sampling should all call this (or ``SemanticCompressor.latent_size``)
    so they agree on the latent size. ``rounding="ceil"`` is the released pipeline's rule, ``ceil(side /
    compression)`` (700 px at 42.67: 17, where half-up gives 16); sampling a converted released model uses it.
    """
    if not compression > 0:
        raise ValueError(f"compression must be > 0, got {compression}")
    if rounding == "ceil":
        return tuple(max(1, math.ceil(side / compression)) for side in _pair(image_size))  # type: ignore[return-value]
    if rounding != "half_up":
        raise ValueError(f"rounding must be 'half_up' or 'ceil', got {rounding!r}")
    return tuple(max(1, math.floor(side / compression + 0.5)) for side in _pair(image_size))  # type: ignore[return-value]


class _TinyBackbone(nn.Sequential):
    """CPU toy-scale feature extractor: per width a 3x3 stride-2 conv then a ConvNeXt ResBlock (stride 2**levels)."""

    def __init__(self, widths: tuple[int, ...]):
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1), ResBlock(width)]
            in_channels = width
        super().__init__(*layers)


@dataclass
class CompressorConfig:
    """The semantic compressor; the single source of its defaults (EfficientNetV2-S from ImageNet weights, as in
    the paper; ``tiny`` for CPU toy runs). The compression ratio is Stage B's own value, not part of this config."""

    backbone: Literal["efficientnet_v2_s", "efficientnet_v2_l", "tiny"] = "efficientnet_v2_s"
    pretrained: bool = True
    """Start from torchvision's ImageNet weights (read from torch's hub cache; offline and missing fails at once)."""
    latent_channels: int = 16
    tiny_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Widths of the ``tiny`` backbone (stride ``2 ** len(tiny_widths)``)."""
    affine_norm: bool = False
    latent_rounding: Literal["half_up", "ceil"] = "half_up"
    """How the latent side follows from the image side (:func:`semantic_latent_size`); "ceil" is the released
    pipeline's rule (a converted released Stage B uses it)."""

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.backbone == "tiny":
            if not self.tiny_widths or min(self.tiny_widths) < 1:
                raise ValueError(f"tiny_widths must be a non-empty list of positive widths, got {self.tiny_widths}")
            if self.pretrained:
                raise ValueError("the 'tiny' backbone has no pretrained weights; set pretrained: false")


class SemanticCompressor(nn.Module):
    """Backbone features -> 1x1 conv (no bias) -> BatchNorm: the semantic latent (default 16 channels).

    Input: images in [0, 1], NCHW, any size. Each side is bicubic-resized (antialiased) to
    ``latent_side * stride`` where ``latent_side = max(1, floor(image_side / compression + 0.5))`` (round half up;
    height and width separately, so non-square images work), then ImageNet mean/std normalised. So 1024 px at
    compression 42.67 gives a 24x24 latent from a 768 px input for EfficientNet (stride 32), and 64 px at
    compression 16 gives 4x4.

    Backbones: ``"efficientnet_v2_s"`` (paper v2) / ``"efficientnet_v2_l"`` (v1): torchvision ``.features``,
    1280 channels, stride 32 (randomly initialised here; see ``CompressorConfig.pretrained``); ``"tiny"``: a small
    conv net for CPU toy runs, stride ``2 ** len(tiny_widths)``, ending at ``tiny_widths[-1]`` channels.

    The final BatchNorm is affine-free by default (Stable Cascade); under DDP turn on Lightning's
    ``Trainer(sync_batchnorm=True)`` to get SyncBatchNorm (it converts every BatchNorm, the backbone's too).
    """

    def __init__(self, config: CompressorConfig | None = None, compression: float = 42.67):
        super().__init__()
        self.config = config = config or CompressorConfig()
        if not compression > 0:
            raise ValueError(f"compression must be > 0, got {compression}")
        self.backbone_name = config.backbone
        self.compression = float(compression)
        self.latent_channels = config.latent_channels
        if config.backbone == "tiny":
            tiny_widths = tuple(int(w) for w in config.tiny_widths)
            self.backbone = _TinyBackbone(tiny_widths)
            feature_channels, self._stride = tiny_widths[-1], 2 ** len(tiny_widths)
        else:
            self.backbone = getattr(torchvision.models, config.backbone)(weights=None).features
            feature_channels, self._stride = 1280, 32
        self.feature_channels = feature_channels
        self.mapper = nn.Conv2d(feature_channels, config.latent_channels, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(config.latent_channels, affine=config.affine_norm)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def stride(self) -> int:
        """Total downsampling factor of the backbone (32 for EfficientNetV2)."""
        return self._stride

    def latent_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the semantic latent for an image of ``image_size`` (see :func:`semantic_latent_size`)."""
        return semantic_latent_size(image_size, self.compression, self.config.latent_rounding)

    def input_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(height, width) the image is resized to before the backbone: ``latent_size * stride``."""
        height, width = self.latent_size(image_size)
        return height * self.stride, width * self.stride

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize [0, 1] images to :meth:`input_size` (bicubic, antialiased) and ImageNet-normalise them."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        size = self.input_size(tuple(images.shape[-2:]))
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> semantic latent [B, latent_channels, *latent_size((H, W))]."""
        return self.norm(self.mapper(self.backbone(self.preprocess(images))))
