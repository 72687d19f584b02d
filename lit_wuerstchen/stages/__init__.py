"""One LightningModule per stage: the training step, what is frozen, what is logged."""

from .base import OptimizerConfig, Stage
from .stage_a import StageA, load_vqgan

__all__ = ["OptimizerConfig", "Stage", "StageA", "load_vqgan"]
