"""The training and validation streams of webdataset shards, and the training loader's exact resume.

Shards are read by webdataset pipelines (``wds.DataPipeline``: ``ResampledShards`` or ``SimpleShardList`` ->
``url_opener`` -> our tar reading stage -> ``wds.shuffle``).

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
"""

from __future__ import annotations

import itertools
import logging
import random
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decoding import Decoder, ErrorLog, Sample, collate
from .shards import open_shards

log = logging.getLogger(__name__)

# A worker that skips this many samples in a row has no usable data: fail loudly instead of spinning.
MAX_CONSECUTIVE_SKIPS = 20_000


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# -- stream seeding -----------------------------------------------------------------------------------------------
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


# -- datasets -----------------------------------------------------------------------------------------------------
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
        decoder: Decoder,
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
        batch: list[Sample] = []
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
                yield {**collate(batch, errors), "stream": stream_info}
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

    def __init__(self, shards: list[str], decoder: Decoder, batch_size: int, rank: int = 0, world: int = 1):
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
        batch: list[Sample] = []
        try:
            for sample in raw:
                item = self.decoder(sample, errors, None)
                if item is None:
                    continue
                # a full batch waits for the next good sample: the final batch, emitted after the stream has
                # ended, then carries every error this reader found (a broken shard at the very end included)
                if len(batch) == self.batch_size:
                    yield collate(batch, errors)
                    batch = []
                batch.append(item)
            if batch:
                yield collate(batch, errors)
        finally:
            raw.close()
