"""Lightning callbacks of lit_wuerstchen: EMA of the trained network, image logging, crash checkpoints."""

from .crash_checkpoint import CrashCheckpoint
from .ema import EMA
from .evaluation import CLIPScoreEvaluation, FIDEvaluation
from .image_logger import ImageLogger
from .sample_writer import SampleWriter

__all__ = ["CLIPScoreEvaluation", "CrashCheckpoint", "EMA", "FIDEvaluation", "ImageLogger", "SampleWriter"]
