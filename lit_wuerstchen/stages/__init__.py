"""One LightningModule per stage: the training step, what is frozen, what is logged."""

from ..diffusion import DiffusionConfig, SamplingConfig
from .base import OptimizerConfig, Stage
from .stage_a import StageA, load_vqgan
from .stage_b import CompressorConfig, StageB, StageBConfig, load_stage_b
from .stage_c import StageC, StageCConfig, TextEncoderConfig

__all__ = [
    "CompressorConfig",
    "DiffusionConfig",
    "OptimizerConfig",
    "SamplingConfig",
    "Stage",
    "StageA",
    "StageB",
    "StageBConfig",
    "StageC",
    "StageCConfig",
    "TextEncoderConfig",
    "load_stage_b",
    "load_vqgan",
]
