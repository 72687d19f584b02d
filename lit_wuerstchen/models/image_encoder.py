"""Frozen open_clip vision tower for Stable Cascade's image conditioning (docs/design.md "Stable Cascade networks").

The released Stage C takes, besides the text, one CLIP ViT-L/14 image embedding per sample (``clip_img``,
``[B, 1, 768]``): zeros when there is no image, the embedding of a reference image for "image variations". The
official training (Stability-AI/StableCascade ``train/base.py``) computes it as
``CLIPVisionModelWithProjection(clip_preprocess(images)).image_embeds`` with ``clip_preprocess`` = torchvision
``Resize(224, bicubic)`` (shorter edge), ``CenterCrop(224)``, ``Normalize(CLIP mean, std)`` on ``[0, 1]`` tensors;
diffusers' ``StableCascadePriorPipeline.encode_image`` does the same with a ``CLIPImageProcessor``. The embedding
is the projected class token, **not** L2-normalised.

Only the vision tower is built (an open_clip ``VisionTransformer``; the text tower is never instantiated). The
module itself is randomly initialised; the weights named by :class:`ImageEncoderConfig` are found by
:func:`lit_wuerstchen.offline.resolve_open_clip_model` and loaded by
:func:`lit_wuerstchen.checkpoints.load_image_encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import _build_vision_tower
from open_clip.transformer import VisionTransformer
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .text_encoder import open_clip_model_config


@dataclass
class ImageEncoderConfig:
    """The open_clip vision tower and where its weights come from; the single source of its defaults (the CLIP
    ViT-L/14 of OpenAI that Stable Cascade's Stage C was trained with, ``openai/clip-vit-large-patch14``)."""

    model_name: str = "ViT-L-14"
    pretrained: str | None = "openai"
    """open_clip pretrained tag (read from the Hugging Face cache; None with no ``weights_file``: random weights)."""
    weights_file: str | None = None
    """A local checkpoint (.safetensors/.bin/.pt): a full open_clip CLIP state dict (``visual.*``), a bare
    ``VisionTransformer`` state dict, this module's own ``state_dict()``, or a transformers ``CLIPVisionModel
    WithProjection`` / ``CLIPModel`` file (``vision_model.*``, converted); wins over ``pretrained``."""
    model_config_file: str | None = None
    """An open_clip model-config JSON for custom architectures (its file stem is the model name)."""
    quick_gelu: bool | None = None
    """QuickGELU activations (OpenAI's CLIP) or nn.GELU. None: as the ``pretrained`` tag says (open_clip marks the
    ``openai`` tags), else the model config's. A ``weights_file`` of OpenAI weights under a plain model name needs
    True (or the ``-quickgelu`` model name)."""

    @property
    def random_init(self) -> bool:
        """No pretrained weights named: the weights must travel with whatever was trained on this encoder."""
        return self.pretrained is None and self.weights_file is None


def clip_preprocess(images: torch.Tensor, image_size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The official Stable Cascade ``clip_preprocess`` on a batch, on its device: shorter edge to ``image_size``
    (bicubic, antialiased; the longer edge ``int(image_size * long / short)``, as torchvision and
    ``CLIPImageProcessor`` round it), centre crop to a square, ``(x - mean) / std``.

    ``images``: ``[B, 3, H, W]`` (or ``[3, H, W]``) floats in ``[0, 1]`` or uint8; returns float32 ``[B, 3,
    image_size, image_size]``. Floats are not clamped after the bicubic resize, as in the official training. The crop
    offset is torchvision's (``round``); transformers' PIL backend floors it: one pixel apart for an odd margin.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] (RGB), got {tuple(images.shape)}")
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    images = TF.resize(images, [image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    images = TF.center_crop(images, [image_size, image_size])
    return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class ImageEncoder(nn.Module):
    """Frozen open_clip vision tower returning the image embedding Stable Cascade's Stage C takes.

    ``forward(images)``: ``images`` ``[B, 3, H, W]`` in ``[0, 1]`` (any size; uint8 also taken) ->
    ``[B, 1, embed_dim]`` (``[B, 1, 768]`` for ViT-L/14), :func:`clip_preprocess` then the tower's projected class
    token, not normalised (transformers' ``image_embeds``, ``unsqueeze(1)`` as the released pipeline and training
    do). :meth:`encode` takes already preprocessed pixels.

    Always frozen and in eval mode (``train()`` keeps it in eval), and runs under ``torch.no_grad()``. Built with
    random weights; :func:`lit_wuerstchen.checkpoints.load_image_encoder` loads the configured ones.
    """

    def __init__(self, config: ImageEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or ImageEncoderConfig()
        self.model_name = model_name = config.model_name
        model_cfg = open_clip_model_config(model_name, config.model_config_file)
        vision_cfg = dict(model_cfg["vision_cfg"])
        tag_cfg = open_clip.get_pretrained_cfg(model_name, config.pretrained) if config.pretrained else {}
        quick_gelu = config.quick_gelu
        if quick_gelu is None:  # open_clip itself only warns on a mismatch; the openai weights need QuickGELU
            quick_gelu = bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))
        self.quick_gelu = quick_gelu
        visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"{model_name!r} does not build an open_clip VisionTransformer (timm or ResNet tower)")
        self.visual = visual
        self.image_size = int(visual.image_size[0])
        self.embed_dim = int(model_cfg["embed_dim"])
        mean = tag_cfg.get("mean") or vision_cfg.get("image_mean") or OPENAI_DATASET_MEAN
        std = tag_cfg.get("std") or vision_cfg.get("image_std") or OPENAI_DATASET_STD
        # plain floats, not buffers: settings rather than weights (fingerprint_settings has them), and a
        # .to(bfloat16) of the module must not round them
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ImageEncoder:
        """Frozen: always stays in eval mode."""
        return super().train(False)

    def fingerprint_settings(self) -> dict:
        """What besides the weights decides the outputs (part of a precompute cache's fingerprint)."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "quick_gelu": self.quick_gelu,
            "resize": "shorter-edge bicubic antialias, centre crop",
        }

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """:func:`clip_preprocess` with this tower's size and normalisation (float32, on the images' device)."""
        mean = torch.tensor(self.mean, device=images.device)
        std = torch.tensor(self.std, device=images.device)
        return clip_preprocess(images, self.image_size, mean, std)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 1, embed_dim]`` from preprocessed ``[B, 3, image_size, image_size]`` pixels."""
        weight = self.visual.conv1.weight
        return self.visual(pixel_values.to(weight.device, weight.dtype))[:, None]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.preprocess(images.to(self.visual.conv1.weight.device)))
