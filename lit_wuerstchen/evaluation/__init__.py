"""Evaluation helpers: prompt alignment on the synthetic shapes dataset."""

from .shapes_alignment import ATTRIBUTES, analyse_shapes_image, shapes_alignment

__all__ = ["ATTRIBUTES", "analyse_shapes_image", "shapes_alignment"]
