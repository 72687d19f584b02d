"""Prompt alignment for the synthetic shapes dataset: does a generated image show what its caption asks?

Every shapes caption (``a small red circle on a blue background, top left``) names five attributes that can be
read back from the pixels with the generator's own ground truth: the palette (:data:`PALETTE`), the size
fractions (:data:`SIZES`) and the 3x3 placement grid (:data:`POSITIONS`). :func:`analyse_shapes_image` detects
them from one image with simple, artefact-tolerant rules; :func:`shapes_alignment` compares them with the
parsed prompts and reports the share of matches per attribute.

Detection, in order:

* background: nearest palette colour to the per-channel median of the 1-px image border (the generator keeps
  the shape ``margin`` px away from the border, so the border is pure background);
* colour: pixels far from the measured background colour are foreground candidates; among the purest of them
  (the ones farthest from the background: blurred edges are background/shape mixtures and lie closer to it)
  the palette colour (background's excluded) that wins the nearest-palette vote within a distance threshold;
* mask: pixels more than half-way from the background colour towards the measured shape colour (the 50 %
  iso-line keeps the area of a blurred shape), largest 4-connected component, tiny components ignored;
* shape: triangle when the vertical mass profile is skewed (apex up: skewness ~-0.57, blur only shrinks it);
  otherwise square vs circle from the soft fill ratio of the box (~1 vs ~pi/4) and a corner cue (kurtosis of
  the mass along the diagonals minus along the axes: 0.6 for a square, 0 for a circle);
* position: the box centre (what the generator jitters inside a grid cell) mapped to ``floor(3 * c / side)``;
* size: the bounding-box extent as a fraction of the image side, nearest :data:`SIZES` value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from ..data.shapes import PALETTE, POSITIONS, SIZES, parse_caption

ATTRIBUTES: tuple[str, ...] = ("background", "colour", "shape", "position", "size")

_NAMES: tuple[str, ...] = tuple(PALETTE)
_RGB = np.array(list(PALETTE.values()), dtype=np.float32)  # [10, 3], 0..255
_SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
_SIZE_VALUES = np.array(list(SIZES.values()), dtype=np.float32)
_AREA_FACTOR = {"square": 1.0, "circle": float(np.pi / 4), "triangle": 0.5}  # area / extent^2

# Distances are Euclidean in 0..255 RGB; the palette's minimum pairwise distance is > 100.
FOREGROUND_DISTANCE = 60.0  # a pixel this far from the background colour may belong to the shape
PALETTE_MATCH_DISTANCE = 90.0  # a pixel votes for a palette colour only when it is this close to it
CORE_FRACTION = 0.6  # vote among pixels at least this fraction of the (robust) farthest distance from background
MIN_COMPONENT_FRACTION = 0.002  # components smaller than this share of the image (and < 3 px) are noise
IMPURITY_WEIGHT = 0.3  # colour vote: cost of explaining a pixel as a (1 - alpha) mix with the background
OFF_PALETTE_DISTANCE = 40.0  # a shape interior this far from its palette colour defines the colour itself
SOFT_MARGIN = 2  # px around the mask's box summed for the soft (blur-proof) area
TRIANGLE_SKEW = -0.3  # vertical mass skewness below which the blob is the apex-up triangle (ideal -0.57)
SQUARENESS = 0.55  # (corner cue + fill ratio) score above which a symmetric blob is a square (circle 0, square 1)


def _to_hwc_float(image: Any) -> np.ndarray:
    """Any supported image as float32 HxWx3 in 0..255."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.is_floating_point():
            arr = arr.float()
        arr = arr.numpy()
    elif hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        arr = np.asarray(image.convert("RGB"))
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3:
        raise ValueError(f"expected an image with 3 dimensions, got shape {tuple(arr.shape)}")
    if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):  # CHW -> HWC
        arr = np.transpose(arr, (1, 2, 0))
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]  # drop alpha
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32) * 255.0
    return np.clip(arr.astype(np.float32), 0.0, 255.0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component of ``mask`` (all False if empty)."""
    h, w = mask.shape
    if not mask.any():
        return mask.copy()
    big = h * w
    labels = np.where(mask, np.arange(big, dtype=np.int64).reshape(h, w), big)
    # min-label propagation: converges in (longest path inside a component) steps, vectorised per step
    for _ in range(big):
        padded = np.pad(labels, 1, constant_values=big)
        new = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, new, big)
        # pointer jumping: follow each label to its pixel's label, which shortens long chains
        flat = new.reshape(-1)
        inside = flat < big
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, labels):
            break
        labels = new
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[int(np.argmax(counts))]


def _nearest_palette(colour: np.ndarray, exclude: int | None = None) -> tuple[int, float]:
    d = np.linalg.norm(_RGB - colour[None, :], axis=1)
    if exclude is not None:
        d[exclude] = np.inf
    i = int(np.argmin(d))
    return i, float(d[i])


def _empty_geometry() -> dict[str, Any]:
    return {
        "shape": None,
        "position": None,
        "size": None,
        "fill_ratio": None,
        "bottom_share": None,
        "centroid": None,
        "box_centre": None,
        "bbox": None,
        "extent": None,
        "box_extent": None,
        "skew": None,
        "corner": None,
        "squareness": None,
        "area": 0,
    }


def analyse_shapes_image(image: Any) -> dict[str, Any]:
    """Detect background, shape colour, shape, position and size of one shapes image.

    ``image``: float tensor ``[3,H,W]`` in [0,1], uint8 ``HxWx3`` numpy array (float arrays in [0,1], ``HxWx3``
    tensors and PIL images work too). Returns the five attribute names (``None`` where nothing was found, e.g.
    ``colour``/``shape``/... on a plain image) plus the raw measurements: ``background_rgb``, ``colour_rgb``,
    ``colour_votes`` (share of the core pixels that voted for the winner), ``fill_ratio`` (soft area / box
    area), ``skew``, ``corner``, ``squareness``, ``bottom_share`` (shape cues), ``centroid`` and ``box_centre``
    (``(x, y)`` in pixels, pixel centres at +0.5), ``bbox`` (``x0, y0, x1, y1`` exclusive), ``extent`` (side from
    the soft area and the detected shape, as a fraction of the image side; what ``size`` uses), ``box_extent``,
    ``area``.
    """
    img = _to_hwc_float(image)
    h, w, _ = img.shape
    border = np.concatenate([img[0, :], img[-1, :], img[1:-1, 0], img[1:-1, -1]], axis=0)
    bg_rgb = np.median(border, axis=0).astype(np.float32)
    bg_index, bg_dist = _nearest_palette(bg_rgb)
    out: dict[str, Any] = {
        "background": _NAMES[bg_index],
        "colour": None,
        "background_rgb": [round(float(v), 1) for v in bg_rgb],
        "background_distance": round(bg_dist, 1),
        "colour_rgb": None,
        "colour_votes": 0.0,
    }
    out.update(_empty_geometry())

    dist_bg = np.linalg.norm(img - bg_rgb, axis=2)
    candidates = dist_bg > FOREGROUND_DISTANCE
    min_pixels = max(3, int(round(MIN_COMPONENT_FRACTION * h * w)))
    if int(candidates.sum()) < min_pixels:
        return out

    # purest foreground pixels: blurred edges mix towards the background, so the farthest pixels are the core
    far = dist_bg[candidates]
    top = float(np.percentile(far, 95))
    core = candidates & (dist_bg >= max(FOREGROUND_DISTANCE, CORE_FRACTION * top))
    pix = img[core]
    ci, alpha, cost, ok = _vote_colours(pix - bg_rgb, bg_rgb, bg_index)
    if not ok.any():
        return out
    votes = np.bincount(ci[ok], minlength=len(_NAMES))
    winner = int(np.argmax(votes))
    out["colour"] = _NAMES[winner]
    out["colour_votes"] = round(float(votes[winner] / ok.sum()), 3)

    # mask: more than half-way from the measured background towards the shape colour. The shape colour is the
    # palette's (blurred small shapes have no pure pixel to measure), unless the mask's interior clearly shows
    # another one (a generated shape in an off-palette shade)
    colour_rgb = _RGB[winner]
    t, mask = _shape_mask(img, bg_rgb, colour_rgb)
    interior = _erode(mask)
    if int(interior.sum()) >= 9:
        measured = np.median(img[interior], axis=0).astype(np.float32)
        if np.linalg.norm(measured - colour_rgb) > OFF_PALETTE_DISTANCE:
            colour_rgb = measured
            t, mask = _shape_mask(img, bg_rgb, colour_rgb)
    out["colour_rgb"] = [round(float(v), 1) for v in colour_rgb]
    area = int(mask.sum())
    out["area"] = area
    if area < min_pixels:
        return out
    out.update(_geometry(mask, t))
    return out


def _shape_mask(img: np.ndarray, bg_rgb: np.ndarray, colour_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft membership ``t`` (projection on the bg->shape colour line, 0 bg, 1 shape) and the main component of
    ``t > 0.5`` (pixels far off that line excluded)."""
    axis = colour_rgb - bg_rgb
    norm2 = max(float(axis @ axis), 1e-6)
    offsets = img - bg_rgb
    t = (offsets @ axis) / norm2
    residual = np.linalg.norm(offsets - t[..., None] * axis, axis=2)
    mask = (t > 0.5) & (residual < max(PALETTE_MATCH_DISTANCE, 0.5 * np.sqrt(norm2)))
    opened = _open2x2(mask)  # drops one-pixel noise spurs that would widen the box
    return t, _largest_component(opened if opened.any() else mask)


def _open2x2(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 2x2 square: the union of all 2x2 blocks inside ``mask``."""
    block = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]
    out = np.zeros_like(mask)
    out[:-1, :-1] |= block
    out[1:, :-1] |= block
    out[:-1, 1:] |= block
    out[1:, 1:] |= block
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose four neighbours are in ``mask`` too."""
    p = np.pad(mask, 1, constant_values=False)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _vote_colours(
    offsets: np.ndarray, bg_rgb: np.ndarray, bg_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Explain each pixel as a mix ``bg + alpha * (P - bg)`` of the background and a palette colour ``P``.

    ``offsets``: pixel colours minus the background colour, ``[n, 3]``. The cost of colour ``P`` is the distance
    of the pixel from the segment bg->P plus a penalty on impurity ``(1 - alpha)``: a blurred edge of a blue
    shape on red then still votes blue, not purple (which lies near the red-blue segment), while a pure purple
    pixel votes purple. Returns per pixel the best colour index, its alpha, its cost and whether the cost is
    within :data:`PALETTE_MATCH_DISTANCE`.
    """
    w2 = IMPURITY_WEIGHT**2
    v = _RGB - bg_rgb[None, :]  # [10, 3]
    vv = np.maximum((v * v).sum(axis=1), 1e-6)  # [10]
    alpha = np.clip((offsets @ v.T / vv[None, :] + w2) / (1.0 + w2), 0.0, 1.0)  # [n, 10]
    resid = offsets[:, None, :] - alpha[:, :, None] * v[None, :, :]
    cost = np.sqrt((resid * resid).sum(axis=2) + w2 * (1.0 - alpha) ** 2 * vv[None, :])
    cost[:, bg_index] = np.inf  # the shape never has the background's colour
    best = np.argmin(cost, axis=1)
    rows = np.arange(len(best))
    best_cost = cost[rows, best]
    return best, alpha[rows, best], best_cost, best_cost <= PALETTE_MATCH_DISTANCE


def _kurtosis(values: np.ndarray, weights: np.ndarray) -> float:
    wsum = max(float(weights.sum()), 1e-6)
    mu = float((weights * values).sum()) / wsum
    d2 = (values - mu) ** 2
    var = float((weights * d2).sum()) / wsum
    return float((weights * d2 * d2).sum()) / wsum / max(var * var, 1e-9)


def _geometry(mask: np.ndarray, t: np.ndarray) -> dict[str, Any]:
    """Shape, position and size of the component ``mask``; ``t`` is the soft shape membership (0 bg, 1 shape)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    bw, bh = x1 - x0, y1 - y0
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    bcx, bcy = (x0 + x1) / 2.0, (y0 + y1) / 2.0

    # soft measurements over the box grown by a blur margin: blur moves membership across the 50 % line but
    # keeps its sum, so the soft area survives blur where the thresholded area loses the corners
    pad = SOFT_MARGIN
    ry0, ry1, rx0, rx1 = max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)
    soft = t[ry0:ry1, rx0:rx1].astype(np.float64)
    soft_area = float(soft.sum())
    fill = soft_area / float(bw * bh)
    row_centres = np.arange(ry0, ry1, dtype=np.float64) + 0.5
    below = np.clip(row_centres + 0.5 - bcy, 0.0, 1.0)  # share of each row below the box centre
    row_mass = soft.sum(axis=1)
    bottom_share = float((row_mass * below).sum() / max(soft_area, 1e-6))
    # skewness of the vertical mass profile: ~-0.57 for the apex-up triangle, 0 for circle and square; blur only
    # adds variance, so unlike the box it does not depend on where the blurred apex crosses the 50 % line
    prof = np.where(soft >= 0.15, np.minimum(soft, 1.0), 0.0).sum(axis=1)
    m = prof / max(float(prof.sum()), 1e-6)
    mu = float((m * row_centres).sum())
    var = float((m * (row_centres - mu) ** 2).sum())
    skew = float((m * (row_centres - mu) ** 3).sum()) / max(var, 1e-6) ** 1.5
    # corners: the square's mass projected on a diagonal is peaked (kurtosis 2.4) and on an axis flat (1.8); the
    # circle's is the same (2.0) in every direction
    wts = np.where(soft >= 0.15, np.minimum(soft, 1.0), 0.0)
    yy, xx = np.meshgrid(row_centres, np.arange(rx0, rx1, dtype=np.float64) + 0.5, indexing="ij")
    corner = 0.5 * (_kurtosis(xx + yy, wts) + _kurtosis(xx - yy, wts)) - 0.5 * (_kurtosis(xx, wts) + _kurtosis(yy, wts))

    # square-ness: corner cue and fill ratio, each scaled to 0 (circle) .. 1 (square), averaged
    squareness = 0.5 * corner / 0.6 + 0.5 * (fill - np.pi / 4) / (1 - np.pi / 4)
    if skew < TRIANGLE_SKEW:
        shape = "triangle"
    elif squareness > SQUARENESS:
        shape = "square"
    else:
        shape = "circle"

    col = min(2, max(0, int(3.0 * bcx / w)))
    row = min(2, max(0, int(3.0 * bcy / h)))
    box_extent = 0.5 * (bw / w + bh / h)
    # the soft area survives blur where the box does not (a blurred triangle loses its apex and base corners)
    extent = float(np.sqrt(max(soft_area, 0.0) / _AREA_FACTOR[shape] / (h * w)))
    size = _SIZE_NAMES[int(np.argmin(np.abs(_SIZE_VALUES - extent)))]
    return {
        "shape": shape,
        "position": POSITIONS[row * 3 + col],
        "size": size,
        "fill_ratio": round(fill, 4),
        "bottom_share": round(bottom_share, 4),
        "skew": round(skew, 4),
        "corner": round(corner, 4),
        "squareness": round(float(squareness), 4),
        "centroid": (round(cx, 3), round(cy, 3)),
        "box_centre": (bcx, bcy),
        "bbox": (x0, y0, x1, y1),
        "extent": round(extent, 4),
        "box_extent": round(box_extent, 4),
        "area": int(mask.sum()),
    }


def _as_image_list(images: Any) -> list[Any]:
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim != 4:
            raise ValueError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
        return list(images)
    if isinstance(images, np.ndarray):
        return [images] if images.ndim == 3 else list(images)
    return list(images)


def shapes_alignment(images: Any, prompts: Sequence[str]) -> dict[str, float]:
    """Share of images whose detected attributes match their (parseable) shapes prompt.

    ``images``: tensor ``[N,3,H,W]`` in [0,1] or a sequence of tensors / arrays / PIL images, one per prompt.
    Returns ``background``, ``colour``, ``shape``, ``position``, ``size`` (accuracy per attribute), ``all``
    (all five match), ``count`` (scored prompts) and ``skipped`` (prompts :func:`parse_caption` rejects).
    Accuracies are 0.0 when nothing could be scored.
    """
    items = _as_image_list(images)
    prompts = list(prompts)
    if len(items) != len(prompts):
        raise ValueError(f"got {len(items)} images but {len(prompts)} prompts")
    hits = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    count = skipped = 0
    for image, prompt in zip(items, prompts):
        want = parse_caption(prompt) if isinstance(prompt, str) else None
        if want is None:
            skipped += 1
            continue
        got = analyse_shapes_image(image)
        count += 1
        matches = [got[k] is not None and got[k] == want[k] for k in ATTRIBUTES]
        for k, m in zip(ATTRIBUTES, matches):
            hits[k] += int(m)
        hits["all"] += int(all(matches))
    result = {k: (v / count if count else 0.0) for k, v in hits.items()}
    result["count"] = float(count)
    result["skipped"] = float(skipped)
    return result


class ShapesAlignment(Metric):
    """:func:`shapes_alignment` accumulated over batches (a torchmetrics metric: it reduces correctly under DDP)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.names = (*ATTRIBUTES, "all")
        self.add_state("correct", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        scores = shapes_alignment(images.detach().float().cpu(), list(prompts))
        count = scores["count"]
        self.correct += torch.tensor(
            [scores[name] * count for name in self.names], dtype=torch.float64, device=self.correct.device
        )
        self.count += count

    def compute(self) -> dict[str, float]:
        count = float(self.count)
        scores = {name: float(value) / count if count else 0.0 for name, value in zip(self.names, self.correct)}
        return {**scores, "count": count}
