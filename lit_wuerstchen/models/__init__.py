"""Pure nn.Modules, each beside the config dataclass that sizes it: no Lightning, no file I/O."""

from .cascade import CascadeUNet, CascadeUNetConfig
from .compressor import CompressorConfig, SemanticCompressor, semantic_latent_size
from .diffnext import DiffNeXt, DiffNeXtConfig, perturb_semantic
from .image_encoder import ImageEncoder, ImageEncoderConfig, clip_preprocess
from .prior import Prior, PriorConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .vqgan import VQGAN, PatchDiscriminator, VQGANConfig

__all__ = [
    "VQGAN",
    "CascadeUNet",
    "CascadeUNetConfig",
    "CompressorConfig",
    "DiffNeXt",
    "DiffNeXtConfig",
    "ImageEncoder",
    "ImageEncoderConfig",
    "PatchDiscriminator",
    "Prior",
    "PriorConfig",
    "SemanticCompressor",
    "TextEncoder",
    "TextEncoderConfig",
    "VQGANConfig",
    "clip_preprocess",
    "perturb_semantic",
    "semantic_latent_size",
]
