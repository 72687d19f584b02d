"""``python -m lit_wuerstchen data {shapes,folder}``: write training shards from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .folder import REPORT_NAME, convert_folder
from .shapes import MIN_RESOLUTION, generate_shapes_dataset


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Create webdataset tar shards (an image + txt caption + json metadata per sample) for training.",
        epilog="precompute: the training cache of a stage (its frozen models' outputs), from the fit's configs; "
        "see `python -m lit_wuerstchen data precompute --help`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{shapes,folder,precompute}")

    shapes = sub.add_parser(
        "shapes",
        help="generate the synthetic captioned shapes dataset",
        description="Generate the synthetic dataset: one coloured circle/square/triangle per image on a plain "
        "background, captioned 'a <size> <colour> <shape> on a <colour> background, <position>'. "
        "Deterministic for a seed; manifest.json is written last (its absence marks an incomplete run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    shapes.add_argument("--out", required=True, help="output directory (train-*.tar, val-*.tar, manifest.json)")
    shapes.add_argument("--num_train", type=_non_negative, required=True, help="number of training samples")
    shapes.add_argument("--num_val", type=_non_negative, required=True, help="number of validation samples")
    shapes.add_argument("--resolution", type=_positive, required=True, help="image side in pixels (>= 16)")
    shapes.add_argument("--seed", type=int, required=True, help="random seed (same seed -> identical shards)")
    shapes.add_argument("--samples_per_shard", type=_positive, default=1000, help="samples per tar shard")
    shapes.add_argument("--overwrite", action="store_true", help="replace what OUT already holds")
    shapes.add_argument("--no_progress", action="store_true", help="hide the progress bar")

    folder = sub.add_parser(
        "folder",
        help="convert a folder of captioned images",
        description="Convert a folder (searched recursively) of images into shards. Captions come from a "
        "sidecar <stem>.txt next to each image, or captions.jsonl / captions.csv at the root with a "
        "file|image|path column and a caption|text column. Every image is re-encoded as RGB PNG. "
        "Unreadable or uncaptioned images are skipped and listed in OUT/conversion_report.json. Clean RGB/grey "
        "JPEG, PNG and WebP files are stored as they are; others (CMYK, 16-bit, palette, alpha, other formats) as PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    folder.add_argument("--src", required=True, help="folder with images (and captions)")
    folder.add_argument("--out", required=True, help="output directory for the shards and the report")
    folder.add_argument("--samples_per_shard", type=_positive, default=1000, help="samples per tar shard")
    folder.add_argument("--prefix", default="train", help="shard name prefix: <prefix>-000000.tar")
    folder.add_argument("--min_image_side", type=_non_negative, default=32, help="skip smaller images (px)")
    folder.add_argument("--max_caption_length", type=_positive, default=1000, help="skip longer captions (chars)")
    folder.add_argument("--overwrite", action="store_true", help="replace what OUT already holds")
    folder.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def _run_shapes(args: argparse.Namespace) -> int:
    if args.resolution < MIN_RESOLUTION:
        print(f"error: --resolution must be >= {MIN_RESOLUTION}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: {out} already exists: choose another --out or pass --overwrite to replace it", file=sys.stderr)
        return 2
    result: dict[str, Any] = generate_shapes_dataset(
        args.out, args.num_train, args.num_val, args.resolution, args.seed,
        samples_per_shard=args.samples_per_shard, progress=not args.no_progress,
    )  # fmt: skip
    n = args.num_train + args.num_val
    rate = n / result["seconds"] if result["seconds"] > 0 else float("inf")
    print(f"wrote {args.num_train} train + {args.num_val} val samples ({args.resolution}px) to {args.out} "
          f"in {result['seconds']:.1f}s ({rate:.0f} samples/s)")  # fmt: skip
    for split in ("train", "val"):
        shards = result["shards"][split]
        if shards:
            print(f"  {split}: {len(shards)} shard(s)   {split}_shards: {result['abs_patterns'][split]}")
    return 0


def _run_folder(args: argparse.Namespace) -> int:
    try:
        report = convert_folder(
            args.src, args.out, args.samples_per_shard, args.prefix, not args.no_progress,
            min_image_side=args.min_image_side, max_caption_length=args.max_caption_length, overwrite=args.overwrite,
        )  # fmt: skip
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"found {report['num_images_found']} images in {args.src}: wrote {report['num_written']}, "
        f"skipped {report['num_unreadable']} unreadable, {report['num_missing_caption']} without caption, "
        f"{report['num_too_small']} too small and {report['num_caption_too_long']} with too long a caption"
    )
    reencoded = ", ".join(f"{n} {reason}" for reason, n in report["reencoded"].items()) or "none"
    print(f"  {report['num_kept_original']} stored as they were; re-encoded as PNG: {reencoded}")
    if report["shards"]:
        print(f"  {len(report['shards'])} shard(s) in {args.out}   {args.prefix}_shards: {report['pattern']}")
    print(f"  report: {args.out}/{REPORT_NAME}")
    return 0 if report["num_written"] else 1


def main(argv: list[str] | None = None, prog: str = "python -m lit_wuerstchen data") -> int:
    """Entry point; returns the exit code (argparse exits with 2 on bad arguments)."""
    args = build_parser(prog).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "shapes":
        return _run_shapes(args)
    return _run_folder(args)


if __name__ == "__main__":
    sys.exit(main(prog="python -m lit_wuerstchen.data.cli"))
