"""Lightning callbacks of lit_wuerstchen: EMA of the trained network and image logging."""

from .ema import EMA
from .image_logger import ImageLogger

__all__ = ["EMA", "ImageLogger"]
