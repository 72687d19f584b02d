"""Data layer: webdataset shards, the synthetic shapes dataset, folder conversion and the DataModule."""

from .datamodule import ShardDataModule
from .folder import convert_folder
from .prompts import PromptDataModule, read_prompts
from .shapes import (
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    generate_shapes_dataset,
    make_caption,
    parse_caption,
    read_manifest,
    render_sample,
)
from .shards import ShardReadError, ShardWriter, brace_pattern, encode_png, iter_shard, load_rgb
from .streams import ShardTrainDataset, ShardValDataset
from .urls import expand_shards

__all__ = [
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "PromptDataModule",
    "ShardDataModule",
    "ShardReadError",
    "ShardTrainDataset",
    "ShardValDataset",
    "ShardWriter",
    "brace_pattern",
    "convert_folder",
    "encode_png",
    "expand_shards",
    "generate_shapes_dataset",
    "iter_shard",
    "load_rgb",
    "make_caption",
    "parse_caption",
    "read_prompts",
    "read_manifest",
    "render_sample",
]
