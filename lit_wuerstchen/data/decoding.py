"""Decoding: a raw webdataset sample -> a :class:`Sample` (filtered, resized, cropped), and samples -> a batch.

Bad data never crashes or hangs a run. Corrupt/missing images, missing captions (when required), too small
images and broken shards are skipped, logged once and counted per worker as *distinct* problems (a
resampled bad shard is counted once). Each batch carries its worker's cumulative counts under
``data_errors``; :meth:`ShardDataModule.on_before_batch_transfer` removes them from the batch and keeps the
latest per worker; :meth:`ShardDataModule.error_counts` sums them (per rank; ``all_ranks=True`` reduces).
Counts travel with batches: a validation reader holds back each full batch until the next good sample or
the end of its stream, so its last batch carries everything it found; a reader that yields no batch at all
cannot report. In the rare case that a rank has fewer training shards than workers, its workers share
shards and a shared bad sample is counted once per worker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .cache import decode_entry
from .shards import IMAGE_EXTENSIONS, ShardReadError, load_rgb

log = logging.getLogger(__name__)

# Counters carried in ``data_errors``; ``corrupt_samples`` is the total of the sample reasons.
SAMPLE_REASONS: tuple[str, ...] = (
    "undecodable_images",
    "missing_images",
    "missing_captions",
    "small_images",
    "long_captions",
    "bad_cache_entries",
)
COUNT_KEYS: tuple[str, ...] = ("corrupt_samples", "broken_shards", *SAMPLE_REASONS)


class Sample(NamedTuple):
    """One decoded sample, as the decoder hands it to :func:`collate`."""

    image: np.ndarray | None  # HxWx3 uint8, the crop; None when the decoder does not keep images (a cache's)
    caption: str  # '' if missing
    key: str
    meta: dict[str, Any]  # the sample's json, or {}
    entries: dict[str, np.ndarray] | None  # a cache's ``<name>.npy`` members; None when not reading a cache


# -- per-worker error bookkeeping -------------------------------------------------------------------------------
class ErrorLog:
    """Distinct problems seen by one reader (one worker of one rank), logged once each."""

    def __init__(self, worker: str):
        self.worker = worker
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self._seen: set[tuple[str, str]] = set()

    def sample(self, url: str, key: str, reason: str, detail: str) -> None:
        if (url, key) in self._seen:
            return
        self._seen.add((url, key))
        self.counts[reason] += 1
        self.counts["corrupt_samples"] += 1
        log.warning("[data %s] skipped sample %r in %s: %s", self.worker, key, url, detail)

    def shard(self, url: str, detail: str) -> None:
        if (url, "") in self._seen:
            return
        self._seen.add((url, ""))
        self.counts["broken_shards"] += 1
        log.warning("[data %s] broken shard %s: %s (its readable samples are still used)", self.worker, url, detail)

    def shard_handler(self, owned: set[str] | None = None) -> Callable[[Exception], bool]:
        """A webdataset exception handler: warns once per shard, counts it (when ``owned`` is None or holds its URL:
        readers that share shards let one of them report), and skips to the next shard."""

        def handle(exn: Exception) -> bool:
            if not isinstance(exn, ShardReadError):
                return False  # a bug, not bad data: let it surface
            if owned is None or exn.url in owned:
                self.shard(exn.url, str(exn))
            return True

        return handle

    def snapshot(self) -> dict[str, Any]:
        return {"worker": self.worker, **self.counts}


# -- decoding -----------------------------------------------------------------------------------------------------
def _resize_crop(img: Image.Image, resize_to: int, resolution: int, rng: Any | None) -> np.ndarray:
    """Shorter side -> ``resize_to`` (bicubic, antialiased), then a random (rng) or centre square crop."""
    w, h = img.size
    scale = resize_to / min(w, h)
    nw, nh = max(resize_to, round(w * scale)), max(resize_to, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)  # Pillow widens the kernel when shrinking
    if rng is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    if (left, top, nw, nh) != (0, 0, resolution, resolution):
        img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img, dtype=np.uint8)


def _text(data: Any) -> str:
    return data.decode("utf-8", errors="replace").strip() if isinstance(data, bytes) else ""


class Decoder:
    """Turns a raw sample into a :class:`Sample` (``image`` None when ``image`` is not set), or None after recording
    why. With ``entries`` (a cache's), the sample's ``<name>.npy`` members are read into ``entries`` and the
    image, when ``image`` is set, takes the centre crop the entries were made from."""

    def __init__(
        self,
        resolution: int,
        resize_to: int,
        require_caption: bool,
        min_image_side: int,
        max_caption_length: int,
        entries: tuple[str, ...] = (),
        image: bool = True,
    ):
        self.resolution = resolution
        self.resize_to = resize_to
        self.require_caption = require_caption
        self.min_image_side = min_image_side
        self.max_caption_length = max_caption_length
        self.entries = entries
        self.image = image

    def __call__(self, sample: dict[str, Any], errors: ErrorLog, rng: Any | None) -> Sample | None:
        key, url = sample["__key__"], sample["__url__"]
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                parsed = json.loads(sample["json"])
                meta = parsed if isinstance(parsed, dict) else {"json": parsed}
            except ValueError:
                meta = {}  # bad metadata is not worth dropping an image for
        caption = _text(sample.get("txt")) or _text(sample.get("caption"))
        if not caption and isinstance(meta.get("caption"), str):
            caption = meta["caption"].strip()
        if self.require_caption and not caption:
            errors.sample(url, key, "missing_captions", "no caption (require_caption=True)")
            return None
        if len(caption) > self.max_caption_length:
            detail = f"caption of {len(caption)} characters > max_caption_length={self.max_caption_length}"
            errors.sample(url, key, "long_captions", detail)
            return None
        entries = None
        if self.entries:
            try:
                entries = {name: decode_entry(sample[f"{name}.npy"]) for name in self.entries}
            except (KeyError, ValueError, OSError) as e:
                errors.sample(url, key, "bad_cache_entries", f"cache entry missing or unreadable: {e!r}")
                return None
            rng = None  # the entries were made from the centre crop
        if not self.image:
            return Sample(None, caption, key, meta, entries)
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            exts = sorted(k for k in sample if not k.startswith("__"))
            errors.sample(url, key, "missing_images", f"no image member (has {exts})")
            return None
        try:
            img = load_rgb(sample[ext])
        except ValueError as e:
            errors.sample(url, key, "undecodable_images", str(e))
            return None
        if min(img.size) < self.min_image_side:
            detail = f"image {img.size[0]}x{img.size[1]} < min_image_side={self.min_image_side}"
            errors.sample(url, key, "small_images", detail)
            return None
        return Sample(_resize_crop(img, self.resize_to, self.resolution, rng), caption, key, meta, entries)


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 arrays -> a float [B, 3, H, W] batch in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def collate(items: list[Sample], errors: ErrorLog) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    if items[0].image is not None:
        batch["image"] = images_to_tensor([it.image for it in items])
    batch["caption"] = [it.caption for it in items]
    batch["key"] = [it.key for it in items]
    batch["meta"] = [it.meta for it in items]
    if items[0].entries is not None:  # cached entries stay fp16 (half the bytes to the device); the stage casts them
        names = items[0].entries
        batch["cache"] = {name: torch.from_numpy(np.stack([it.entries[name] for it in items])) for name in names}
    batch["data_errors"] = errors.snapshot()
    return batch
