"""Lightning callbacks of lit_wuerstchen (installed as ``lit_wuerstchen.callbacks``): EMA of the trained networks,
checkpoints, image logging, how a run ends (finished, preempted, crashed), evaluation (FID, CLIP score, shapes
alignment), performance monitoring (``perf/``: throughput, TFLOP/s and MFU, peak memory, data wait) and the prediction
writer."""

from .checkpoint import ModelCheckpoint
from .ema import EMA
from .evaluation import CLIPScoreEvaluation, FIDEvaluation
from .image_logger import ImageLogger
from .lifecycle import RunLifecycle
from .perf import PerfMonitor
from .sample_writer import SampleWriter
from .shapes_alignment import ShapesAlignmentEvaluation

__all__ = [
    "EMA",
    "CLIPScoreEvaluation",
    "FIDEvaluation",
    "ImageLogger",
    "ModelCheckpoint",
    "PerfMonitor",
    "RunLifecycle",
    "SampleWriter",
    "ShapesAlignmentEvaluation",
]
