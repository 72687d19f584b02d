"""Convert a folder of captioned images into webdataset shards (an image member, ``txt``, ``json``).

JPEG, PNG and WebP files that decode cleanly and are already 8-bit RGB (or 8-bit grey, which every reader turns into
RGB the same way) are stored as they are, under ``jpg``/``png``/``webp`` by their real format: re-encoding a JPEG as
PNG made shards ~10x larger. The rest is decoded and stored as an RGB PNG, for a reason the report counts: ``cmyk``,
``high_bit_depth`` (16-bit, 32-bit, float), ``palette``, ``alpha`` (composited on white), ``animated`` (first frame),
``other_mode`` or ``other_format`` (BMP, TIFF, GIF, ...).

Caption sources, in order of precedence: a sidecar ``<stem>.txt`` next to the image, then ``captions.jsonl``,
then ``captions.csv`` at the root. The two tables name the image in a ``file``/``image``/``path`` column
(relative to the root; a bare file name also matches when it is unique) and the text in ``caption``/``text``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ..files import replaced_folder
from .shards import ShardWriter, brace_pattern, encode_png, load_rgb

log = logging.getLogger(__name__)

FOLDER_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga", ".jfif"}
)
FILE_KEYS = ("file", "image", "path")
TEXT_KEYS = ("caption", "text")
REPORT_NAME = "conversion_report.json"


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    lowered = {str(k).strip().lower(): v for k, v in row.items()}
    return next((lowered[k] for k in keys if lowered.get(k) not in (None, "")), None)


def _read_caption_tables(src: Path, problems: list[dict[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Captions from ``captions.jsonl`` and ``captions.csv`` (jsonl wins on conflicts), keyed by relative path."""
    table: dict[str, tuple[str, str]] = {}  # normalised relative path -> (caption, source)
    csv_path, jsonl_path = src / "captions.csv", src / "captions.jsonl"
    rows: list[tuple[str, int, dict[str, Any]]] = []
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows += [("csv", i + 2, r) for i, r in enumerate(csv.DictReader(f))]  # line 1 is the header
    if jsonl_path.is_file():
        with open(jsonl_path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    problems.append({"path": f"captions.jsonl:{i}", "reason": f"bad JSON: {e}"})
                    continue
                if not isinstance(obj, dict):
                    problems.append({"path": f"captions.jsonl:{i}", "reason": "not a JSON object"})
                    continue
                rows.append(("jsonl", i, obj))
    for source, line, row in rows:  # csv first, so jsonl entries overwrite them
        name, text = _pick(row, FILE_KEYS), _pick(row, TEXT_KEYS)
        if name is None or text is None:
            problems.append({
                "path": f"captions.{source}:{line}",
                "reason": f"needs one of {FILE_KEYS} and one of {TEXT_KEYS}",
            })  # fmt: skip
            continue
        table[os.path.normpath(str(name).strip()).replace(os.sep, "/")] = (str(text), source)
    captions = {k: v[0] for k, v in table.items()}
    sources = {k: v[1] for k, v in table.items()}
    return captions, sources


def convert_folder(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    samples_per_shard: int = 1000,
    prefix: str = "train",
    progress: bool = True,
    min_image_side: int = 32,
    max_caption_length: int = 1000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``OUT/<prefix>-%06d.tar`` from the images under ``src`` (recursive, sorted, so reproducible).

    Every image is decoded (a file that does not decode cleanly is skipped); clean RGB/grey JPEG, PNG and WebP files
    are stored byte for byte, the others as RGB PNGs (see the module's docstring; any mode: :func:`load_rgb`). The
    report counts both (``num_kept_original``, ``reencoded``: reason -> count). Unreadable images,
    images without a caption, images whose shorter side is under ``min_image_side`` and captions longer than
    ``max_caption_length`` characters are skipped and listed in the returned report, which is also written to
    ``OUT/conversion_report.json``. Keys are ``<prefix>_<index>``; the sample's json records the source path,
    original size and mode. Everything is written into a temporary folder and swapped in at the end, report
    included: an interrupted conversion leaves ``out`` as it was. An ``out`` that already holds anything is
    refused unless ``overwrite`` (then it is replaced whole).
    """
    src_path, out_path = Path(src), Path(out)
    if not src_path.is_dir():
        raise FileNotFoundError(f"source folder {str(src_path)!r} does not exist or is not a directory")
    if not prefix or any(c in prefix for c in "./\\{}%"):
        raise ValueError(f"bad shard prefix {prefix!r}")
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"{out_path} is a file, not a folder")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise ValueError(f"{out_path} already holds data: choose another --out or pass --overwrite to replace it")
    if out_path.resolve().is_relative_to(src_path.resolve()):
        raise ValueError(f"--out {out_path} is inside --src {src_path}: write the shards somewhere else")
    with replaced_folder(out_path) as tmp:
        report = _convert(src_path, out_path, tmp, samples_per_shard, prefix, progress, min_image_side,
                          max_caption_length)  # fmt: skip
    return report


def _convert(src_path: Path, out_path: Path, tmp: Path, samples_per_shard: int, prefix: str, progress: bool,
             min_image_side: int, max_caption_length: int) -> dict[str, Any]:  # fmt: skip

    caption_problems: list[dict[str, str]] = []
    table, table_sources = _read_caption_tables(src_path, caption_problems)
    by_basename: dict[str, list[str]] = {}
    for rel in table:
        by_basename.setdefault(rel.rsplit("/", 1)[-1], []).append(rel)

    images: list[Path] = []
    ignored: list[str] = []
    for root, dirs, files in os.walk(src_path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES:
                images.append(p)
            elif p.suffix.lower() not in (".txt", ".json", ".jsonl", ".csv"):
                ignored.append(p.relative_to(src_path).as_posix())

    unreadable: list[dict[str, str]] = []
    missing_caption: list[str] = []
    too_small: list[str] = []
    caption_too_long: list[str] = []
    used_table_keys: set[str] = set()
    source_counts = {"sidecar": 0, "jsonl": 0, "csv": 0}
    reencoded: dict[str, int] = {}
    t0 = time.perf_counter()
    with ShardWriter(tmp / f"{prefix}-%06d.tar", samples_per_shard) as writer:
        for path in tqdm(images, desc=f"converting {src_path.name}", unit="img", disable=not progress):
            rel = path.relative_to(src_path).as_posix()
            caption, source = "", ""
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                caption, source = sidecar.read_text(encoding="utf-8", errors="replace").strip(), "sidecar"
            if not caption:
                match = rel if rel in table else None
                if match is None and len(by_basename.get(path.name, [])) == 1:
                    match = by_basename[path.name][0]
                if match is not None:
                    caption, source = table[match].strip(), table_sources[match]
                    used_table_keys.add(match)
            if not caption:
                missing_caption.append(rel)
                log.warning("no caption for %s: skipped", rel)
                continue
            if len(caption) > max_caption_length:
                caption_too_long.append(rel)
                log.warning("caption of %s has %d characters > %d: skipped", rel, len(caption), max_caption_length)
                continue
            try:
                data = path.read_bytes()
                img = load_rgb(data)
                original = _original_format(data)
            except (OSError, ValueError) as e:
                unreadable.append({"path": rel, "reason": str(e)})
                log.warning("unreadable image %s: %s", rel, e)
                continue
            if min(img.size) < min_image_side:
                too_small.append(rel)
                log.warning("image %s is %dx%d < min_image_side %d: skipped", rel, *img.size, min_image_side)
                continue
            reason = _reencode_reason(original)
            ext, stored = (KEPT_FORMATS[original["format"]], data) if reason is None else ("png", encode_png(img))
            reencoded[reason or "kept"] = reencoded.get(reason or "kept", 0) + 1
            writer.write({
                "__key__": f"{prefix}_{writer.total:08d}",
                ext: stored,
                "txt": caption,
                "json": {"source": rel, "width": img.width, "height": img.height, "mode": original["mode"],
                         "format": original["format"], "stored": "original" if reason is None else "png"},
            })  # fmt: skip
            source_counts[source] += 1

    shards = [os.path.basename(p) for p in writer.shards]
    report: dict[str, Any] = {
        "src": str(src_path),
        "out": str(out_path),
        "prefix": prefix,
        "num_images_found": len(images),
        "num_written": writer.total,
        "num_kept_original": reencoded.pop("kept", 0),
        "reencoded": dict(sorted(reencoded.items())),
        "num_unreadable": len(unreadable),
        "num_missing_caption": len(missing_caption),
        "num_too_small": len(too_small),
        "num_caption_too_long": len(caption_too_long),
        "caption_sources": source_counts,
        "unreadable": unreadable,
        "missing_caption": missing_caption,
        "too_small": too_small,
        "caption_too_long": caption_too_long,
        "caption_table_problems": caption_problems,
        "captions_without_image": sorted(set(table) - used_table_keys),
        "ignored_files": ignored,
        "shards": shards,
        "pattern": brace_pattern([str(out_path / s) for s in shards]),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # Pillow's format name -> member extension


def _original_format(data: bytes) -> dict[str, Any]:
    """Format, mode and frame count of the stored file, before any conversion."""
    with Image.open(io.BytesIO(data)) as im:
        transparent = "transparency" in im.info
        return {"format": im.format, "mode": im.mode, "frames": getattr(im, "n_frames", 1), "transparent": transparent}


def _reencode_reason(original: dict[str, Any]) -> str | None:
    """Why a (cleanly decoding) file cannot be stored as it is, or None when it can."""
    mode = original["mode"]
    if mode == "CMYK":
        return "cmyk"
    if mode.startswith("I") or mode == "F":
        return "high_bit_depth"
    if mode in ("P", "PA"):
        return "palette"
    if "A" in mode or "a" in mode or original["transparent"]:
        return "alpha"
    if original["frames"] > 1:
        return "animated"
    if mode not in ("RGB", "L"):
        return "other_mode"
    if original["format"] not in KEPT_FORMATS:
        return "other_format"
    return None
