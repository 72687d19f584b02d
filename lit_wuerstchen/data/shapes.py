"""Synthetic captioned dataset: one coloured shape on a plain background, with an exact caption.

Small enough to train all three stages on a CPU in minutes, and every caption can be checked against the
pixels (``parse_caption`` gives the attributes back; an alignment metric only has to look at the image).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..files import replaced_folder
from .shards import ShardWriter, brace_pattern, encode_png

log = logging.getLogger(__name__)

# Well separated in RGB (min pairwise Euclidean distance > 100), named as a person would name them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (20, 160, 40),
    "blue": (30, 50, 220),
    "yellow": (250, 230, 20),
    "orange": (250, 130, 0),
    "purple": (120, 30, 160),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "cyan": (0, 220, 240),
    "pink": (250, 120, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Extent (bounding-box side) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.35, "large": 0.5}
# Row-major 3x3 grid: POSITIONS[row * 3 + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "center left", "center", "center right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip
CAPTION_KEYS: tuple[str, ...] = ("size", "colour", "shape", "background", "position")
MIN_RESOLUTION = 16
MANIFEST = "manifest.json"
FORMAT_NAME = "lit_wuerstchen.shapes"
FORMAT_VERSION = 1

_COLOURS = tuple(PALETTE)
_SIZE_NAMES = tuple(SIZES)
_COLOUR_ARRAYS = tuple(np.array(v, dtype=np.uint8) for v in PALETTE.values())
_CAPTION_RE = re.compile(
    r"a (?P<size>{s}) (?P<colour>{c}) (?P<shape>{h}) on a (?P<background>{c}) background, (?P<position>{p})".format(
        s="|".join(SIZES), c="|".join(_COLOURS), h="|".join(SHAPES),
        p="|".join(sorted(POSITIONS, key=len, reverse=True)),  # longest first: "center left" before "center"
    )
)  # fmt: skip


def make_caption(attrs: dict[str, Any]) -> str:
    """``a <size> <colour> <shape> on a <background> background, <position>``."""
    return (
        f"a {attrs['size']} {attrs['colour']} {attrs['shape']} "
        f"on a {attrs['background']} background, {attrs['position']}"
    )


def parse_caption(caption: str) -> dict[str, str] | None:
    """Inverse of :func:`make_caption`: the five attributes, or None if the text does not follow the grammar."""
    m = _CAPTION_RE.fullmatch(caption.strip())
    if m is None:
        return None
    out = m.groupdict()
    return None if out["colour"] == out["background"] else out


@functools.lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> np.ndarray:
    return np.arange(resolution, dtype=np.float32) + 0.5


@functools.lru_cache(maxsize=32)
def _plain_image(resolution: int, colour_index: int) -> np.ndarray:
    """A filled background, cached: copying it is ~20x faster than broadcasting a colour into a fresh array."""
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = _COLOUR_ARRAYS[colour_index]
    img.flags.writeable = False
    return img


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, ext: float) -> np.ndarray:
    """Boolean mask over the window ``ys x xs`` (pixel-centre coordinates)."""
    dx = xs[None, :] - cx
    dy = ys[:, None] - cy
    half = ext / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # apex up, base at the bottom of the bounding box
        depth = dy + half  # 0 at the apex, ext at the base
        return (depth >= 0) & (depth <= ext) & (np.abs(dx) <= depth * 0.5)
    raise ValueError(f"unknown shape {shape!r}")


def render_sample(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw random attributes from ``rng`` and render them: ``(HxWx3 uint8 image, attrs)``.

    The shape centre is jittered inside its grid cell but kept ``margin`` px away from the image border, so
    the four corners always show the background.
    """
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    # one vectorised draw instead of seven scalar calls: the per-call overhead dominated rendering time
    u = rng.random(7)
    shape = SHAPES[int(u[0] * len(SHAPES))]
    ci = int(u[1] * len(_COLOURS))
    bi = int(u[2] * (len(_COLOURS) - 1))
    bi += bi >= ci  # any colour but the shape's
    size = _SIZE_NAMES[int(u[3] * len(_SIZE_NAMES))]
    pos = int(u[4] * len(POSITIONS))
    jitter = ((float(u[5]) - 0.5) * 0.5, (float(u[6]) - 0.5) * 0.5)  # within +-1/4 of a cell

    r = float(resolution)
    ext = SIZES[size] * r
    cell = r / 3
    margin = max(1.0, 0.04 * r)
    centre = []
    for axis_cell, j in ((pos % 3, jitter[0]), (pos // 3, jitter[1])):
        lo = max(axis_cell * cell, ext / 2 + margin)
        hi = min((axis_cell + 1) * cell, r - ext / 2 - margin)
        c = min(max((axis_cell + 0.5 + j) * cell, lo), hi) if lo <= hi else (lo + hi) / 2
        centre.append(round(c, 3))
    cx, cy = centre

    img = _plain_image(resolution, bi).copy()
    # only evaluate the mask inside the bounding box: cost scales with the shape, not the image
    x0, x1 = max(0, int(cx - ext / 2) - 1), min(resolution, int(cx + ext / 2) + 2)
    y0, y1 = max(0, int(cy - ext / 2) - 1), min(resolution, int(cy + ext / 2) + 2)
    pc = _pixel_centres(resolution)
    mask = _shape_mask(shape, pc[x0:x1], pc[y0:y1], cx, cy, ext)
    img[y0:y1, x0:x1][mask] = _COLOUR_ARRAYS[ci]

    attrs: dict[str, Any] = {
        "shape": shape,
        "colour": _COLOURS[ci],
        "background": _COLOURS[bi],
        "size": size,
        "position": POSITIONS[pos],
        "center_xy": [cx, cy],
        "extent_px": round(ext, 3),
        "resolution": resolution,
    }
    return img, attrs


def shapes_args(num_train: int, num_val: int, resolution: int, seed: int, samples_per_shard: int) -> dict[str, Any]:
    """The generation arguments as stored in (and compared against) ``manifest.json``."""
    return {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "resolution": int(resolution),
        "seed": int(seed),
        "samples_per_shard": int(samples_per_shard),
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
    }


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a finished generation run, or None (missing or unreadable = incomplete run)."""
    path = Path(out_dir) / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def set_name(num_train: int, num_val: int, resolution: int, seed: int) -> str:
    """The folder name of a generated set: its parameters, so sets made with others never share a folder."""
    return f"{resolution}px_n{num_train}_v{num_val}_s{seed}"


def generate_shapes_dataset(
    out_dir: str | os.PathLike[str],
    num_train: int,
    num_val: int,
    resolution: int,
    seed: int,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``train-%06d.tar`` / ``val-%06d.tar`` shards of shapes samples (``png``, ``txt``, ``json``).

    Deterministic: train and val come from independent streams seeded by ``(seed, split)``, and the same
    arguments give byte-identical shards. The set is written into a temporary folder and swapped in whole when
    complete (``manifest.json``, the arguments, counts and shard names, included): an interrupted generation leaves
    ``out_dir`` as it was. Returns the manifest plus ``seconds`` and absolute brace ``patterns``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be >= {MIN_RESOLUTION}, got {resolution}")
    out = Path(out_dir)
    args = shapes_args(num_train, num_val, resolution, seed, samples_per_shard)
    with replaced_folder(out) as tmp:
        manifest, seconds = _write_shapes(tmp, args, progress)
    log.info("wrote %d train + %d val shapes samples to %s in %.1fs", num_train, num_val, out, seconds)
    result = dict(manifest)
    result["seconds"] = seconds
    result["out_dir"] = str(out)
    result["abs_patterns"] = {k: brace_pattern([str(out / n) for n in v]) for k, v in manifest["shards"].items()}
    return result


def _write_shapes(out: Path, args: dict[str, Any], progress: bool) -> tuple[dict[str, Any], float]:
    num_train, num_val, resolution, seed = args["num_train"], args["num_val"], args["resolution"], args["seed"]
    t0 = time.perf_counter()
    shards: dict[str, list[str]] = {}
    with tqdm(total=num_train + num_val, desc=f"shapes {resolution}px", unit="img", disable=not progress) as bar:
        for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            rng = np.random.default_rng([seed, split_id])  # independent stream per split
            with ShardWriter(out / f"{split}-%06d.tar", args["samples_per_shard"]) as writer:
                for i in range(count):
                    img, attrs = render_sample(rng, resolution)
                    writer.write({
                        "__key__": f"{split}_{i:08d}",
                        "png": encode_png(img, compress_level=1),  # flat colours: level 1 is ~25% larger, 5x faster
                        "txt": make_caption(attrs),
                        "json": attrs,
                    })  # fmt: skip
                    if (i & 63) == 63:
                        bar.update(64)
                bar.update(count & 63)
            shards[split] = [os.path.basename(p) for p in writer.shards]
    seconds = time.perf_counter() - t0

    manifest = {
        "args": args,
        "counts": {"train": num_train, "val": num_val},
        "shards": shards,
        "patterns": {k: brace_pattern(v) for k, v in shards.items()},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest, seconds
