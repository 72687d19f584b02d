"""``ShardDataModule``: image/caption batches from webdataset tar shards, DDP-safe and error-tolerant.

Shards are any URLs webdataset opens (local brace patterns, ``pipe:`` commands, http(s)), read by webdataset
pipelines (:mod:`.streams`). On top of them, the data layer keeps what webdataset leaves to its users: disjoint
shards per rank, an exact number of batches per epoch, an exact resume (:mod:`.streams`), and counts of what was
skipped (:mod:`.decoding`). Shard specs are resolved by :mod:`.urls`.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from .cache import cache_shard_urls, check_data, open_cache
from .decoding import COUNT_KEYS, Decoder
from .shapes import generate_shapes_dataset, read_manifest, set_name, shapes_args
from .shards import folder_lock
from .streams import ResumableDataLoader, ShardTrainDataset, ShardValDataset
from .urls import dist_info, expand_shards

log = logging.getLogger(__name__)


def _identity(batch: Any) -> Any:
    return batch


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
            if dist_info()[1] == 1:
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
    def _decoder(self, crop: int | None = None, entries: tuple[str, ...] = (), image: bool = True) -> Decoder:
        crop = crop or self.resolution
        resize_to = self.resize_to or self.resolution
        return Decoder(
            crop, resize_to, self.require_caption, self.min_image_side, self.max_caption_length, entries, image
        )

    def centre_crop_decoder(self) -> Decoder:
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
        rank, world = dist_info()
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
        rank, world = dist_info()
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
