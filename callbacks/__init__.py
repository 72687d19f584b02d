"""Lightning callbacks of lit_wuerstchen (installed as ``lit_wuerstchen.callbacks``): EMA of the trained networks,
image logging, crash checkpoints, evaluation (FID, CLIP score, shapes alignment) and the prediction writer."""

from .crash_checkpoint import CrashCheckpoint
from .ema import EMA
from .evaluation import CLIPScoreEvaluation, FIDEvaluation
from .image_logger import ImageLogger
from .sample_writer import SampleWriter
from .shapes_alignment import ShapesAlignmentEvaluation

__all__ = [
    "EMA",
    "CLIPScoreEvaluation",
    "CrashCheckpoint",
    "FIDEvaluation",
    "ImageLogger",
    "SampleWriter",
    "ShapesAlignmentEvaluation",
]
