"""Evaluation helpers: FID / CLIP-score features and statistics, prompt alignment on the synthetic shapes dataset,
and the ``evaluate`` report."""

from .features import (
    ClipScorer,
    FeatureExtractor,
    InceptionFeatures,
    default_inception_path,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    load_or_compute_reference_stats,
    read_reference_stats,
    write_reference_stats,
)
from .report import evaluate_samples
from .shapes_alignment import ATTRIBUTES, analyse_shapes_image, shapes_alignment

__all__ = [
    "ATTRIBUTES",
    "ClipScorer",
    "FeatureExtractor",
    "InceptionFeatures",
    "analyse_shapes_image",
    "default_inception_path",
    "evaluate_samples",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "load_or_compute_reference_stats",
    "read_reference_stats",
    "shapes_alignment",
    "write_reference_stats",
]
