"""An independent reading of shapes images, to check the shapes-alignment metric against.

The metric (:mod:`lit_wuerstchen.evaluation.shapes_alignment`) reads blurred, off-colour generated images with tuned
rules (colour votes, soft masks, mass skewness, corner kurtosis). This reader is deliberately plain and shares none
of its code: every pixel takes its nearest palette colour, the background is the border's most common one, the shape
is the largest 4-connected component (scipy) of pixels of one other palette colour, and the shape's geometry is
read from that component alone:

* colour: the nearest palette entry to the component's median RGB;
* shape: a triangle (apex up) when the component's top third is much narrower than its bottom third, else a square
  or a circle by the fill ratio of its bounding box (square ~1, circle ~0.79);
* position: the bounding-box centre on the 3x3 grid; size: the box's larger side, nearest :data:`SIZES` value.

``python benchmarks/alignment_check.py outputs/demo`` scores a ``sample`` folder (``samples.jsonl``) with both and
prints each one's scores and how often the two agree per attribute (tests/test_shapes_alignment.py asserts the
agreement on real and deliberately wrong images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from lit_wuerstchen.data.shapes import PALETTE, POSITIONS, SIZES, parse_caption
from lit_wuerstchen.evaluation import analyse_shapes_image

ATTRIBUTES = ("background", "colour", "shape", "position", "size")
_NAMES = tuple(PALETTE)
_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
_SIZE_NAMES = tuple(SIZES)
_SIZE_VALUES = np.array(list(SIZES.values()))


def read_shapes_image(image: np.ndarray) -> dict[str, str | None]:
    """The five attributes of an ``HxWx3`` uint8 image (None where no shape is found)."""
    pixels = image.astype(np.float32)
    nearest = np.linalg.norm(pixels[:, :, None, :] - _RGB[None, None], axis=-1).argmin(-1)  # [H, W] palette index
    border = np.concatenate([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    out["background"] = _NAMES[background]
    best = None
    for colour in set(np.unique(nearest).tolist()) - {background}:
        labels, count = ndimage.label(nearest == colour)  # 4-connected by default
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            if best is None or sizes.max() > best[0]:
                best = (int(sizes.max()), labels == int(sizes.argmax()) + 1)
    if best is None or best[0] < 4:
        return out
    area, component = best
    median = np.median(pixels[component], axis=0)
    distances = np.linalg.norm(_RGB - median, axis=1)
    distances[background] = np.inf
    out["colour"] = _NAMES[int(distances.argmin())]
    rows, cols = np.nonzero(component)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = area / float(height * width)
    row_widths = component[rows.min() : rows.max() + 1].sum(axis=1).astype(np.float32)
    third = max(1, height // 3)
    top, bottom = row_widths[:third].mean(), row_widths[-third:].mean()
    out["shape"] = "triangle" if top < 0.7 * bottom else ("square" if fill > 0.86 else "circle")
    side_h, side_w = image.shape[:2]
    row = min(2, int(3 * (rows.min() + rows.max() + 1) / 2 / side_h))
    col = min(2, int(3 * (cols.min() + cols.max() + 1) / 2 / side_w))
    out["position"] = POSITIONS[row * 3 + col]
    out["size"] = _SIZE_NAMES[int(np.abs(_SIZE_VALUES - max(height / side_h, width / side_w)).argmin())]
    return out


def compare(images: list[np.ndarray], prompts: list[str]) -> dict[str, dict[str, float]]:
    """Per attribute: the metric's score, the independent reading's score, and their agreement on each image
    (both right or both wrong)."""
    metric_hits = dict.fromkeys(ATTRIBUTES, 0)
    reader_hits = dict.fromkeys(ATTRIBUTES, 0)
    agree = dict.fromkeys(ATTRIBUTES, 0)
    count = 0
    for image, prompt in zip(images, prompts):
        want = parse_caption(prompt)
        if want is None:
            continue
        count += 1
        metric, reader = analyse_shapes_image(image), read_shapes_image(image)
        for name in ATTRIBUTES:
            a, b = metric[name] == want[name], reader[name] == want[name]
            metric_hits[name] += a
            reader_hits[name] += b
            agree[name] += a == b
    return {
        "metric": {k: v / max(count, 1) for k, v in metric_hits.items()},
        "independent": {k: v / max(count, 1) for k, v in reader_hits.items()},
        "agreement": {k: v / max(count, 1) for k, v in agree.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a `sample` output folder (samples.jsonl and the images)")
    args = parser.parse_args(argv)
    manifest = Path(args.folder) / "samples.jsonl"
    if not manifest.is_file():
        print(
            f"no samples.jsonl in {args.folder}: pass a folder written by `sample` (e.g. outputs/demo)", file=sys.stderr
        )
        return 2
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    images = [np.asarray(Image.open(Path(args.folder) / r["path"]).convert("RGB")) for r in records]
    result = compare(images, [r["prompt"] for r in records])
    for name, scores in result.items():
        print(f"{name:12s} " + "  ".join(f"{k} {scores[k]:.3f}" for k in ATTRIBUTES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
