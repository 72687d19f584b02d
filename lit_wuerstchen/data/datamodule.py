"""``ShardDataModule``: image/caption batches from webdataset tar shards, DDP-safe and error-tolerant.

Shards are any URLs webdataset opens (local brace patterns, ``pipe:`` commands, http(s)), read by webdataset
pipelines (``wds.DataPipeline``: ``ResampledShards`` or ``SimpleShardList`` -> ``url_opener`` -> our tar reading
stage -> ``wds.shuffle``). On top of them, this module keeps what webdataset leaves to its users: disjoint shards per
rank, an exact number of batches per epoch, an exact resume, and counts of what was skipped.

Training (per rank, per epoch exactly ``train_batches_per_epoch`` batches, so DDP ranks never wait on each
other): the shard list is split by rank first (rank r owns shards ``r::world``, ``wds.split_by_node``'s rule, taken in
the main process where the process group lives), then by DataLoader worker when the rank owns at least one shard per
worker (otherwise every worker of the rank draws from all of the rank's shards, with its own seed). Each worker
resamples shards with replacement from its subset forever (``wds.ResampledShards``, seeded per rank, worker role and
epoch), shuffles raw samples through a buffer, decodes, batches (dropping nothing but the cut at the end) and stops
after its share of the rank's batches.

Validation (finite, not resampled, every sample exactly once over all ranks and workers): with ``S`` =
world x workers reader slots, slot ``rank * workers + worker`` reads shards ``slot::S`` when there are at
least ``S`` shards; otherwise every slot reads every shard and keeps the samples whose running index ``i``
satisfies ``i % S == slot``. The last partial batch is kept, so ranks may see different batch counts:
validation must not run per-step collectives (log with ``on_epoch=True``).

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

import glob
import itertools
import json
import logging
import os
import random
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from .cache import cache_shard_urls, check_data, decode_entry, open_cache
from .shapes import generate_shapes_dataset, read_manifest, set_name, shapes_args
from .shards import IMAGE_EXTENSIONS, ShardReadError, folder_lock, load_rgb, open_shards

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
# A worker that skips this many samples in a row has no usable data: fail loudly instead of spinning.
MAX_CONSECUTIVE_SKIPS = 20_000


# -- shard lists ------------------------------------------------------------------------------------------------
def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Resolve a shard spec to its list of URLs, in order.

    webdataset's syntax (``wds.shardlists.expand_urls``): brace ranges and alternatives (``d/x-{000000..000099}.tar``,
    ``{a,b}``), ``::`` between parts, ``${WDS_NAME}`` from the environment; a list is taken part by part. Local paths
    may also be shell globs, and must exist (``FileNotFoundError`` naming the pattern, so a typo fails at start-up);
    other URLs (``pipe:``, ``http(s)://``, ...) are taken as they are: webdataset opens them when they are read.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    if not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise FileNotFoundError(f"empty shard pattern {spec!r}")
    urls: list[str] = []
    for part in parts:
        try:
            expanded = expand_urls(part.strip())
        except AssertionError as e:  # webdataset asserts on an unset ${WDS_...} variable
            raise ValueError(f"shard pattern {part!r}: {e}") from None
        for url in expanded:
            if not _is_local(url):
                urls.append(url)
                continue
            path = os.path.expanduser(url2pathname(urlparse(url).path) if url.startswith("file:") else url)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"shard pattern {part!r} matches no files (glob {path!r})")
                urls.extend(matches)
            else:
                urls.append(path)
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        if len(missing) == len(urls):
            raise FileNotFoundError(f"shard pattern {spec!r} matches no files (e.g. {missing[0]!r} does not exist)")
        raise FileNotFoundError(
            f"shard pattern {spec!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]}"
        )
    return urls


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


class _Decoder:
    """Turns a raw sample into ``(image HxWx3 uint8 | None, caption, key, meta, entries | None)``, or None after
    recording why. With ``entries`` (a cache's), the sample's ``<name>.npy`` members are read into ``entries`` and the
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

    def __call__(self, sample: dict[str, Any], errors: ErrorLog, rng: Any | None) -> tuple | None:
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
            return None, caption, key, meta, entries
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
        return _resize_crop(img, self.resize_to, self.resolution, rng), caption, key, meta, entries


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 arrays -> a float [B, 3, H, W] batch in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)


def _collate(items: list[tuple], errors: ErrorLog) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    if items[0][0] is not None:
        batch["image"] = images_to_tensor([it[0] for it in items])
    batch["caption"] = [it[1] for it in items]
    batch["key"] = [it[2] for it in items]
    batch["meta"] = [it[3] for it in items]
    if items[0][4] is not None:  # cached entries stay fp16 (half the bytes to the device); the stage casts them
        batch["cache"] = {name: torch.from_numpy(np.stack([it[4][name] for it in items])) for name in items[0][4]}
    batch["data_errors"] = errors.snapshot()
    return batch


def _identity(batch: Any) -> Any:
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# -- datasets -----------------------------------------------------------------------------------------------------
def _role_seeded() -> int:
    """``worker_seed`` for ``wds.ResampledShards``: the stream seed already names the role (which, after a resume, is
    not the worker's id), so the worker adds nothing."""
    return 0


def _stream_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


_MASK64 = (1 << 64) - 1


class _SampleRandom:
    """The random draws of one sample (its crop), from (stream seed, raw-sample index) alone: splitmix64, ~1 µs,
    where seeding a ``random.Random`` per sample would cost a third of the loader's time."""

    __slots__ = ("state",)

    def __init__(self, seed: int, index: int):
        self.state = (seed ^ (index * 0x9E3779B97F4A7C15)) & _MASK64

    def randint(self, low: int, high: int) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return low + (z ^ (z >> 31)) % (high - low + 1)


class ShardTrainDataset(IterableDataset):
    """Resampled stream cut to exactly ``batches_per_epoch`` batches per rank and epoch, and resumable exactly.

    ``rank``/``world`` are captured when the DataLoader is built (in the main process, where the process
    group lives); the worker split happens in ``__iter__``. Every epoch each worker starts a fresh stream seeded by
    ``(seed, rank, role, epoch)``; its *role* is its worker id, except in the epoch a run resumes in (below). Random
    crops draw from a generator seeded per raw sample, so a stream's position is one number: the raw samples drawn
    from it (bad ones included). Each batch carries its role, epoch, raw-sample count and batch count under
    ``stream``; :class:`ResumableDataLoader` keeps what training consumed and restores it.

    Resuming mid-epoch, worker ``w`` takes the role ``(w + k) % workers`` (``k``: batches consumed this epoch), skips
    that role's consumed raw samples without decoding them and yields its remaining batches: the DataLoader's
    round-robin over workers then gives exactly the batches, in the order, of the uninterrupted run.
    """

    def __init__(
        self,
        shards: list[str],
        decoder: _Decoder,
        batch_size: int,
        batches_per_epoch: int,
        shuffle_buffer: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        epoch_offset: int = 0,
    ):
        if len(shards) < world:
            raise ValueError(
                f"{len(shards)} training shard(s) for {world} ranks: every rank needs its own shard, so at least "
                f"{world} are needed (write smaller shards, e.g. --samples_per_shard, or add data)"
            )
        self.shards = list(shards)
        self.decoder = decoder
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world = rank, world
        self.epoch_offset = epoch_offset
        self.resume: dict[str, Any] | None = None  # set by ResumableDataLoader.load_state_dict before iterating
        self.token = uuid.uuid4().hex  # tells the loader its batches came back through the DataModule
        self._errors: ErrorLog | None = None
        self._epochs_started = 0  # on this (worker's) copy: persistent workers keep counting across epochs

    def __len__(self) -> int:
        return self.batches_per_epoch

    def worker_shards(self, worker_id: int, num_workers: int) -> list[str]:
        """The shards one worker of this rank draws from (rank split first, then worker split if possible)."""
        rank_shards = self.shards[self.rank :: self.world]
        return rank_shards[worker_id::num_workers] if len(rank_shards) >= num_workers else rank_shards

    def role_batches(self, role: int, num_workers: int) -> int:
        """Batches one role yields per epoch (the rank's batches dealt round-robin over the roles)."""
        return self.batches_per_epoch // num_workers + (role < self.batches_per_epoch % num_workers)

    def _batches(
        self, role: int, workers: int, epoch: int, skip_raw: int, errors: ErrorLog
    ) -> Iterator[dict[str, Any]]:
        """One role's stream of one epoch, after skipping ``skip_raw`` raw samples (a resumed position): webdataset's
        seeded shard resampling -> opening and our tar reading -> webdataset's shuffle buffer -> decode -> batch."""
        stream_seed = _stream_seed(self.seed, self.rank, role, epoch)
        shards = self.worker_shards(role, workers)
        raw_samples = wds.DataPipeline(
            wds.ResampledShards(shards, seed=stream_seed, worker_seed=_role_seeded, deterministic=True),
            *open_shards(errors.shard_handler(), max_empty_in_a_row=max(20, 5 * len(shards))),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(stream_seed)),
            wds.slice(skip_raw, None),
        )
        raw = skip_raw
        batch: list[tuple] = []
        skipped = 0
        for sample in raw_samples:
            item = self.decoder(sample, errors, _SampleRandom(stream_seed, raw))
            raw += 1
            if item is None:
                skipped += 1
                if skipped >= MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(
                        f"[data {errors.worker}] {skipped} samples in a row were unusable: {errors.counts}"
                    )
                continue
            skipped = 0
            batch.append(item)
            if len(batch) == self.batch_size:
                stream_info = {"loader": self.token, "role": role, "epoch": epoch, "raw": raw}
                yield {**_collate(batch, errors), "stream": stream_info}
                batch = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, workers = _worker()
        if self._errors is None:
            self._errors = ErrorLog(f"train/{self.rank}/{wid}")
        epoch = self.epoch_offset + self._epochs_started
        self._epochs_started += 1
        role, skip_raw, done = wid, 0, 0
        resume = self.resume
        if resume is not None and resume["epoch"] == epoch and resume["workers"] == workers:
            role = (wid + resume["consumed"]) % workers
            skip_raw, done = resume["positions"].get(role, (0, 0))
        stream = self._batches(role, workers, epoch, skip_raw, self._errors)
        for index in range(done, self.role_batches(role, workers)):
            batch = next(stream)
            batch["stream"]["batches"] = index + 1
            yield batch


class ResumableDataLoader(DataLoader):
    """The training DataLoader, stateful for Lightning: ``state_dict()`` holds where every worker's stream stood
    after the last batch *training consumed* (prefetched batches are not counted), for every rank; Lightning saves it
    in the checkpoint and hands it to ``load_state_dict()`` of the loader a resumed run builds. See
    :class:`ShardTrainDataset` for how a position is replayed."""

    def __init__(self, dataset: ShardTrainDataset, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.consumed: dict[str, Any] = {"epoch": None, "positions": {}}

    def record(self, stream: dict[str, Any]) -> None:
        """A training batch was consumed (called by ``ShardDataModule.on_before_batch_transfer``)."""
        if stream["epoch"] != self.consumed["epoch"]:
            self.consumed = {"epoch": stream["epoch"], "positions": {}}
        self.consumed["positions"][stream["role"]] = (stream["raw"], stream["batches"])

    def state_dict(self) -> dict[str, Any]:
        local = {
            "epoch": self.consumed["epoch"],
            "workers": max(1, self.num_workers),
            "positions": {int(role): list(pos) for role, pos in self.consumed["positions"].items()},
        }
        ranks = [local]
        if dist.is_available() and dist.is_initialized():  # called on every rank while a checkpoint is dumped
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank = self.dataset.rank
        ranks = state.get("ranks", [])
        if rank >= len(ranks) or ranks[rank].get("epoch") is None:
            return
        mine = ranks[rank]
        if mine["workers"] != max(1, self.num_workers):
            log.warning(
                "the checkpoint's data stream ran with %d worker(s), this run has %d: the epoch's remaining batches "
                "come from fresh streams (an exact resume needs the same num_workers)",
                mine["workers"],
                max(1, self.num_workers),
            )
            return
        positions = {int(role): tuple(pos) for role, pos in mine["positions"].items()}
        self.dataset.resume = {
            "epoch": mine["epoch"],
            "workers": mine["workers"],
            "consumed": sum(batches for _, batches in positions.values()),
            "positions": positions,
        }
        self.consumed = {"epoch": mine["epoch"], "positions": dict(positions)}


class ShardValDataset(IterableDataset):
    """Finite, deterministic pass over every sample once, split over all (rank, worker) reader slots."""

    def __init__(self, shards: list[str], decoder: _Decoder, batch_size: int, rank: int = 0, world: int = 1):
        self.shards = list(shards)
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self._errors: ErrorLog | None = None

    def _raw(self, slot: int, slots: int, errors: ErrorLog) -> Iterator[dict[str, Any]]:
        owned = self.shards[slot::slots]
        if len(self.shards) >= slots:  # every reader slot reads its own shards
            yield from wds.DataPipeline(wds.SimpleShardList(owned), *open_shards(errors.shard_handler())).iterator()
            return
        # fewer shards than readers: every slot reads every shard and keeps every slots-th sample; the slot that
        # owns a shard reports its damage
        samples = wds.DataPipeline(wds.SimpleShardList(self.shards), *open_shards(errors.shard_handler(set(owned))))
        iterator = samples.iterator()
        try:
            yield from itertools.islice(iterator, slot, None, slots)
        finally:
            iterator.close()  # an open pipe: or http stream ends with the reader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        if self._errors is None:
            self._errors = ErrorLog(f"val/{self.rank}/{wid}")
        errors = self._errors
        raw = self._raw(self.rank * nw + wid, self.world * nw, errors)
        batch: list[tuple] = []
        try:
            for sample in raw:
                item = self.decoder(sample, errors, None)
                if item is None:
                    continue
                # a full batch waits for the next good sample: the final batch, emitted after the stream has
                # ended, then carries every error this reader found (a broken shard at the very end included)
                if len(batch) == self.batch_size:
                    yield _collate(batch, errors)
                    batch = []
                batch.append(item)
            if batch:
                yield _collate(batch, errors)
        finally:
            raw.close()


# -- the DataModule ------------------------------------------------------------------------------------------------
class ShardDataModule(L.LightningDataModule):
    """Image/caption batches from webdataset shards (or a generated synthetic shapes set).

    Batches: ``image`` float32 [B, 3, R, R] in [0, 1], ``caption`` list[str] ('' if missing), ``key``
    list[str], ``meta`` list[dict] (the sample's json, or {}).

    Args:
        train_shards: brace pattern (``d/train-{000000..000009}.tar``), glob, or comma-separated list.
        val_shards: same, for validation/test. With both None, a synthetic shapes set is used.
        resolution: side of the final square crop.
        resize_to: the shorter side is resized to this before cropping (None: ``resolution``).
        val_resolution: side of the validation centre crop (None: ``resolution``); e.g. train Stage A on
            32 px random crops of 64 px images and validate on the whole 64 px images.
        batch_size / val_batch_size: batch sizes (val defaults to ``batch_size``).
        num_workers: DataLoader worker processes per rank (decoding happens there).
        train_batches_per_epoch: batches per epoch PER RANK (the training stream is resampled, endless).
        shuffle_buffer: samples held for shuffling in each worker.
        require_caption: skip (and count) samples without a caption.
        min_image_side: skip (and count) images whose shorter side is smaller (None: half of ``resize_to`` or
            ``resolution``: an image blown up more than twice is not worth learning from).
        max_caption_length: skip (and count) samples whose caption has more characters (junk, not text; CLIP
            reads 77 tokens anyway).
        synthetic_dir / synthetic_num_train / synthetic_num_val / synthetic_seed: the synthetic set.
        seed: seed of shard resampling, shuffling and crops.
        cache: train from a cache made by ``data precompute`` for these data settings (a folder, a URL prefix, or a
            template with ``{name}``; see :mod:`lit_wuerstchen.data.cache`) instead of the raw training shards.
            Validation always reads the raw ``val_shards``. None: raw shards.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        resolution: int = 64,
        resize_to: int | None = None,
        val_resolution: int | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        train_batches_per_epoch: int = 100,
        shuffle_buffer: int = 1000,
        require_caption: bool = False,
        min_image_side: int | None = None,
        max_caption_length: int = 1000,
        synthetic_dir: str = "data/shapes",
        synthetic_num_train: int = 20000,
        synthetic_num_val: int = 512,
        synthetic_seed: int = 0,
        seed: int = 0,
        cache: str | None = None,
    ):
        super().__init__()
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if resize_to is not None and resize_to < resolution:
            raise ValueError(f"resize_to ({resize_to}) must be >= resolution ({resolution}): the crop must fit")
        if val_resolution is not None and not 1 <= val_resolution <= (resize_to or resolution):
            raise ValueError(
                f"val_resolution ({val_resolution}) must be in [1, resize_to or resolution = {resize_to or resolution}]"
            )
        for name, value in (("batch_size", batch_size), ("train_batches_per_epoch", train_batches_per_epoch)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if min_image_side is not None and min_image_side < 0 or max_caption_length < 1:
            raise ValueError("min_image_side must be >= 0 (or None) and max_caption_length >= 1")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.resolution = resolution
        self.resize_to = resize_to
        self.val_resolution = val_resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.train_batches_per_epoch = train_batches_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.require_caption = require_caption
        self.min_image_side = (resize_to or resolution) // 2 if min_image_side is None else min_image_side
        self.max_caption_length = max_caption_length
        self.synthetic_dir = synthetic_dir
        self.synthetic_num_train = synthetic_num_train
        self.synthetic_num_val = synthetic_num_val
        self.synthetic_seed = synthetic_seed
        self.seed = seed
        self.cache = cache
        self.cache_manifest: dict[str, Any] | None = None  # read in setup(); the stage checks its models against it
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None
        self._error_state: dict[str, dict[str, Any]] = {}
        self._train_loaders: weakref.WeakValueDictionary[str, ResumableDataLoader] = weakref.WeakValueDictionary()

    # -- synthetic data ------------------------------------------------------------------------------------------
    @property
    def synthetic(self) -> bool:
        return self.train_shards is None and self.val_shards is None

    def _synthetic_args(self) -> dict[str, Any]:
        # ~64+ train shards (so many ranks x workers each get their own), at most 1000 samples per shard
        per_shard = max(1, min(1000, -(-self.synthetic_num_train // 64)))
        return shapes_args(
            self.synthetic_num_train,
            self.synthetic_num_val,
            self.resize_to or self.resolution,
            self.synthetic_seed,
            per_shard,
        )

    @property
    def synthetic_set(self) -> str:
        """The folder of the synthetic set these settings need: ``synthetic_dir/<its parameters>``, so runs with
        other settings (a resolution, a size) never share, or regenerate, each other's set."""
        args = self._synthetic_args()
        name = set_name(args["num_train"], args["num_val"], args["resolution"], args["seed"])
        return os.path.join(self.synthetic_dir, name)

    def _synthetic_ready(self) -> bool:
        manifest = read_manifest(self.synthetic_set)
        return manifest is not None and manifest.get("args") == self._synthetic_args()

    def prepare_data(self) -> None:
        """Generate the synthetic set once (runs on one process per node; other processes, and other runs that need
        the same set, wait on its lock and then reuse it)."""
        if not self.synthetic:
            return
        args = self._synthetic_args()
        with folder_lock(self.synthetic_set):
            if self._synthetic_ready():
                log.info("reusing synthetic shapes data in %s", self.synthetic_set)
                return
            log.info("no complete synthetic data in %s: generating", self.synthetic_set)
            generate_shapes_dataset(
                self.synthetic_set,
                args["num_train"],
                args["num_val"],
                args["resolution"],
                args["seed"],
                samples_per_shard=args["samples_per_shard"],
                progress=True,
            )

    def _synthetic_urls(self, split: str) -> list[str]:
        if not self._synthetic_ready():
            if _dist_info()[1] == 1:
                self.prepare_data()  # convenient outside a Trainer (scripts, notebooks, tests)
            else:
                raise FileNotFoundError(
                    f"synthetic data in {self.synthetic_set!r} is missing or stale; prepare_data() must run first"
                )
        manifest = read_manifest(self.synthetic_set)
        assert manifest is not None
        names = manifest["shards"][split]
        if not names:
            raise FileNotFoundError(f"synthetic data in {self.synthetic_set!r} has no {split} shards")
        return expand_shards([os.path.join(self.synthetic_set, n) for n in names])

    # -- shard lists -----------------------------------------------------------------------------------------------
    def train_urls(self) -> list[str]:
        if self._train_urls is None:
            if self.synthetic:
                self._train_urls = self._synthetic_urls("train")
            elif self.train_shards is None:
                raise ValueError("train_shards is not set (only val_shards was given)")
            else:
                self._train_urls = expand_shards(self.train_shards)
        return self._train_urls

    def val_urls(self) -> list[str]:
        if self._val_urls is None:
            if self.synthetic:
                self._val_urls = self._synthetic_urls("val")
            else:
                self._val_urls = expand_shards(self.val_shards) if self.val_shards is not None else []
        return self._val_urls

    def data_settings(self) -> dict[str, Any]:
        """What decides which samples are used and how they are cropped (a cache is made for one such setting)."""
        return {
            "resolution": self.resolution,
            "resize_to": self.resize_to or self.resolution,
            "min_image_side": self.min_image_side,
            "max_caption_length": self.max_caption_length,
            "require_caption": self.require_caption,
        }

    def setup(self, stage: str | None = None) -> None:
        # resolve patterns now so a typo fails at start-up, not when the first loader is built
        if stage in (None, "fit"):
            self.train_urls()
            if self.cache is not None and self.cache_manifest is None:
                manifest = open_cache(self.cache)
                check_data(manifest, self.cache, self.data_settings(), self.train_urls())
                self.cache_manifest = manifest
        if stage in (None, "fit", "validate", "test"):
            self.val_urls()

    # -- loaders -----------------------------------------------------------------------------------------------------
    def _decoder(self, crop: int | None = None, entries: tuple[str, ...] = (), image: bool = True) -> _Decoder:
        crop = crop or self.resolution
        resize_to = self.resize_to or self.resolution
        return _Decoder(
            crop, resize_to, self.require_caption, self.min_image_side, self.max_caption_length, entries, image
        )

    def centre_crop_decoder(self) -> _Decoder:
        """The training images as a cache takes them: decoded, filtered, centre-cropped at ``resolution``."""
        return self._decoder()

    def _loader(self, dataset: IterableDataset, loader_class: type[DataLoader] = DataLoader) -> DataLoader:
        return loader_class(
            dataset,
            batch_size=None,  # the datasets batch themselves
            collate_fn=_identity,  # default_convert would walk every meta dict of every batch
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # its own generator: making an iterator draws a seed, and from the global stream that draw would shift
            # the training's noise (a resumed run makes its iterators at other times than the run it continues)
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning warns that __len__ of an IterableDataset may be wrong with several workers; here each
        # worker yields an exact share of the rank's batches, so the length is exact
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        rank, world = _dist_info()
        trainer = getattr(self, "trainer", None)
        if self.cache is not None:
            self.setup("fit")
            manifest = self.cache_manifest
            assert manifest is not None
            urls = cache_shard_urls(self.cache, manifest)
            decoder = self._decoder(entries=tuple(manifest["entries"]), image=manifest["keeps_image"])
        else:
            urls, decoder = self.train_urls(), self._decoder()
        dataset = ShardTrainDataset(
            urls,
            decoder,
            batch_size=self.batch_size,
            batches_per_epoch=self.train_batches_per_epoch,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world=world,
            epoch_offset=trainer.current_epoch if trainer is not None else 0,
        )
        loader = self._loader(dataset, ResumableDataLoader)
        self._train_loaders[dataset.token] = loader
        return loader

    def val_dataloader(self) -> DataLoader | list:
        urls = self.val_urls()
        if not urls:
            log.info("no val_shards: validation disabled")
            return []
        rank, world = _dist_info()
        return self._loader(
            ShardValDataset(
                urls, self._decoder(self.val_resolution), self.val_batch_size or self.batch_size, rank, world
            )
        )

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    # -- error counts ------------------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the worker's error counts out of the batch (Lightning calls this hook of the DataModule)."""
        if isinstance(batch, dict) and "data_errors" in batch:
            info = batch.pop("data_errors")
            self._error_state[str(info["worker"])] = info
        if isinstance(batch, dict) and "stream" in batch:
            stream = batch.pop("stream")
            loader = self._train_loaders.get(stream["loader"])
            if loader is not None:
                loader.record(stream)  # consumed by training now: the position a checkpoint keeps
        return batch

    def error_counts(self, split: str, all_ranks: bool = False) -> dict[str, int]:
        """Skipped-data counts of ``split`` ('train' or 'val'), summed over this rank's workers.

        ``corrupt_samples`` counts every skipped sample (the other reason keys break it down) and
        ``broken_shards`` unreadable/truncated shards. ``all_ranks=True`` also sums over DDP ranks (a
        collective: call it on every rank).
        """
        totals = dict.fromkeys(COUNT_KEYS, 0)
        for worker, info in self._error_state.items():
            if worker.split("/", 1)[0] == split:
                for k in COUNT_KEYS:
                    totals[k] += int(info.get(k, 0))
        if all_ranks and dist.is_available() and dist.is_initialized():
            t = torch.tensor([totals[k] for k in COUNT_KEYS], dtype=torch.long)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            totals = dict(zip(COUNT_KEYS, (int(v) for v in t.tolist())))
        return totals

    def teardown(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            counts = self.error_counts(split)
            if counts["corrupt_samples"] or counts["broken_shards"]:
                details = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
                log.warning("data problems in %s (this rank, skipped and counted): %s", split, details)
