"""One LightningModule per stage: the training step, what is frozen, what is logged."""

from .base import DiffusionStage, OptimizerConfig, Stage
from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC

__all__ = ["DiffusionStage", "OptimizerConfig", "Stage", "StageA", "StageB", "StageC"]
