"""FID and CLIP-score evaluation during training and at the end of ``validate`` (docs/design.md "Evaluation").

The metric networks (Inception, CLIP) live in these callbacks, never in the LightningModule: they stay out of
checkpoints, out of EMA copies and out of FSDP wrapping, and run in float32 with autocast disabled.

Both callbacks share :class:`GenerativeEvaluation`: every ``every_n_steps`` optimiser steps (and at the end of
``trainer.validate`` when ``on_validate``) each rank generates its share of ``num_images`` images with
``pl_module.evaluation_images(batch, generator)`` from its own shard of ``trainer.datamodule.val_dataloader()``
(the ShardDataModule already splits validation data over ranks), with the EMA weights swapped in when the EMA
callback is present, the model in eval mode and a generator seeded with ``seed + rank`` (every evaluation sees the
same noise). Per-image results (features, scores) are all-gathered with padding for uneven counts; rank 0
computes the metric, broadcasts it, and every rank logs the same value (``eval/fid``, ``eval/clip_score``).

Logging: at the end of ``validate`` through ``pl_module.log`` (epoch-level, returned by ``trainer.validate``);
during training directly to ``trainer.loggers`` at ``trainer.global_step`` (so ``log_every_n_steps`` cannot drop
it) and into ``trainer.callback_metrics`` (visible to ModelCheckpoint monitors and the progress bar).

Under FSDP (sharded networks: every forward pass is a collective) all ranks generate the same number of batches: a
rank whose share is done repeats its last batch, discarding the images, until every rank is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from tqdm.auto import tqdm

from lit_wuerstchen.evaluation import features as metric_features
from lit_wuerstchen.strategies import is_sharded

from .ema import EMA
from .schedule import EveryNSteps

log = logging.getLogger(__name__)


# --- plumbing shared by the metrics -----------------------------------------------------------------------------
def _batch_len(batch: dict) -> int:
    if isinstance(batch.get("image"), torch.Tensor):
        return int(batch["image"].shape[0])
    for value in batch.values():
        if isinstance(value, (torch.Tensor, list, tuple)):
            return len(value)
    raise ValueError("cannot tell the size of a batch without tensors or lists")


def _slice_batch(batch: dict, start: int, stop: int) -> dict:
    return {k: (v[start:stop] if isinstance(v, (torch.Tensor, list, tuple)) else v) for k, v in batch.items()}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
        if k != "data_errors"
    }


def gather_rows(trainer: Trainer, values: torch.Tensor) -> torch.Tensor:
    """All-gather ``values [n_rank, D]`` of uneven lengths over ranks: ``[sum n, D]`` in rank order.

    ``(n, D)`` pairs are gathered first (a rank with nothing may pass ``[0, 0]``); every rank pads to the largest
    count, ``trainer.strategy.all_gather`` collects ``[world, max, D]`` and the padding is cut off again.
    Single process: returned as is.
    """
    if values.ndim != 2:
        raise ValueError(f"gather_rows takes [N, D] tensors, got shape {tuple(values.shape)}")
    if trainer.world_size <= 1:
        return values
    device = trainer.strategy.root_device
    values = values.to(device)
    shape = torch.tensor([values.shape[0], values.shape[1]], device=device, dtype=torch.long)
    shapes = trainer.strategy.all_gather(shape).view(-1, 2).tolist()
    counts = [n for n, _ in shapes]
    biggest, dim = max(counts), max(d for n, d in shapes if n > 0) if any(counts) else 0
    if biggest == 0:
        return values.new_zeros((0, dim))
    padded = values.new_zeros((biggest, dim))
    padded[: values.shape[0]] = values
    gathered = trainer.strategy.all_gather(padded)  # [world, biggest, dim]
    return torch.cat([gathered[r, : counts[r]] for r in range(len(counts))])


def _find_ema(trainer: Trainer) -> EMA | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


class GenerativeEvaluation(Callback):
    """Schedule, generation over validation batches, gathering and logging shared by FID and CLIP score.

    Subclasses set :attr:`metric` and implement :meth:`build` (metric network, at ``setup``), :meth:`process`
    (per generated batch: a dict of per-image tensors to gather) and :meth:`compute` (rank 0: gathered dict
    -> metric value).
    """

    metric = "eval/metric"
    description = "evaluation"

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_images: int = 10000,
        batch_size: int | None = None,
        on_validate: bool = True,
        seed: int = 0,
    ):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: never during training), got {every_n_steps}")
        if num_images < 2:
            raise ValueError(f"num_images must be >= 2, got {num_images}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.batch_size = batch_size
        self.on_validate = on_validate
        self.seed = seed
        self._schedule = EveryNSteps(every_n_steps)

    # -- to implement -------------------------------------------------------------------------------------------
    def build(self, trainer: Trainer, device: torch.device) -> None:
        raise NotImplementedError

    def before_run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called on every rank before an evaluation pass (collectives allowed)."""

    def after_run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Called on every rank after an evaluation pass (also when it failed)."""

    def process(self, trainer: Trainer, batch: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute(self, trainer: Trainer, gathered: dict[str, torch.Tensor]) -> float:
        raise NotImplementedError

    # -- hooks --------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # before any training: a missing weights file fails now, not hours into the run. Randomly initialised metric
        # networks draw from a forked stream: with or without evaluation callbacks, training draws the same numbers.
        with torch.random.fork_rng(devices=[]):
            self.build(trainer, trainer.strategy.root_device)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._schedule.due(trainer.global_step):
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_validate and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.run(trainer, pl_module, in_validation=True)

    # -- the evaluation pass -------------------------------------------------------------------------------------
    def _val_loader(self, trainer: Trainer):
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            return datamodule.val_dataloader()
        loaders = trainer.val_dataloaders
        return loaders[0] if isinstance(loaders, (list, tuple)) else loaders

    def local_count(self, trainer: Trainer) -> int:
        world, rank = trainer.world_size, trainer.global_rank
        return self.num_images // world + (rank < self.num_images % world)

    def _local_batches(self, loader, wanted: int, device: torch.device):
        """This rank's batches for generation (sliced to ``batch_size`` and to its ``wanted`` images), on device."""
        empty = loader is None or (isinstance(loader, (list, tuple)) and not loader)  # no bool(): no __len__
        done = 0
        for full in [] if empty else loader:
            n = _batch_len(full)
            step = self.batch_size or n
            for start in range(0, n, step):
                take = min(step, n - start, wanted - done)
                if take <= 0:
                    return
                yield _to_device(_slice_batch(full, start, start + take), device)
                done += take

    def _generate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        device = pl_module.device
        generator = torch.Generator(device=device).manual_seed(self.seed + trainer.global_rank)
        wanted = self.local_count(trainer)
        done = 0
        results: dict[str, list[torch.Tensor]] = {}
        loader = self._val_loader(trainer)
        batches = self._local_batches(loader, wanted, device)
        # Sharded networks (FSDP): every forward is a collective, so all ranks generate the same number of batches;
        # a rank out of data repeats its last batch and throws the images away until the others are done.
        in_step = is_sharded(trainer)
        last = None
        bar = tqdm(
            total=wanted, desc=self.description, leave=False, dynamic_ncols=True, disable=trainer.global_rank != 0
        )
        try:
            while True:
                batch = next(batches, None)
                if in_step and not trainer.strategy.reduce_boolean_decision(batch is not None, all=False):
                    break
                if batch is None and not in_step:
                    break
                if batch is None and last is None:
                    raise RuntimeError(
                        f"{self.metric}: rank {trainer.global_rank} has no validation data, and under FSDP every rank "
                        f"must generate (give every rank validation shards)"
                    )
                with trainer.precision_plugin.forward_context():
                    images = pl_module.evaluation_images(batch if batch is not None else last, generator)
                if batch is None:
                    continue  # a filler pass: it only kept this rank in step
                last = batch
                images = images.detach().float().clamp(0, 1)
                with torch.autocast(device_type=device.type, enabled=False):
                    for key, value in self.process(trainer, batch, images).items():
                        results.setdefault(key, []).append(value.detach())
                done += len(images)
                bar.update(len(images))
        finally:
            bar.close()
            batches.close()
            del loader  # shuts its worker processes down
        if done < wanted:
            log.warning(
                "%s: rank %d's validation data gave %d of its %d images", self.metric, trainer.global_rank, done, wanted
            )
        return {k: torch.cat(v) for k, v in results.items()}

    def run(self, trainer: Trainer, pl_module: LightningModule, in_validation: bool = False) -> float | None:
        """One evaluation on every rank; returns the metric (the same on all ranks; None if nothing was made).

        ``in_validation``: called from a validation hook, log through ``pl_module.log``; else straight to the
        loggers at ``trainer.global_step`` (and into ``trainer.callback_metrics``)."""
        self.before_run(trainer, pl_module)
        try:
            return self._run(trainer, pl_module, in_validation)
        finally:
            self.after_run(trainer, pl_module)

    def _run(self, trainer: Trainer, pl_module: LightningModule, in_validation: bool) -> float | None:
        ema = _find_ema(trainer)
        was_training = pl_module.training
        with ema.averaged(pl_module) if ema is not None else nullcontext():
            pl_module.eval()
            try:
                with torch.no_grad():
                    local = self._generate(trainer, pl_module)
            finally:
                pl_module.train(was_training)
        keys = self.gather_keys()
        gathered = {}
        for key in keys:
            value = local.get(key)
            if value is None:  # this rank made nothing
                value = torch.zeros((0, 0), device=pl_module.device)
            gathered[key] = gather_rows(trainer, value.float().flatten(1)).cpu()
        value = None
        if trainer.is_global_zero:
            value = self.compute(trainer, gathered)
        value = trainer.strategy.broadcast(value, src=0)
        if value is not None and math.isfinite(value):
            self._log(trainer, pl_module, float(value), in_validation)
        return value

    def gather_keys(self) -> list[str]:
        raise NotImplementedError

    def _log(self, trainer: Trainer, pl_module: LightningModule, value: float, in_validation: bool) -> None:
        if in_validation:
            pl_module.log(self.metric, value, on_step=False, on_epoch=True, batch_size=1, sync_dist=False)
            return
        trainer.callback_metrics[self.metric] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({self.metric: value}, step=trainer.global_step)


# --- FID ---------------------------------------------------------------------------------------------------------
class FIDEvaluation(GenerativeEvaluation):
    """FID (clean-fid's Inception, "clean" mode) of ``evaluation_images`` against the validation images.

    Args:
        every_n_steps: evaluate every N optimiser steps during ``fit`` (0: never).
        num_images: images generated per evaluation (spread over ranks) and real images in the reference.
        batch_size: most images per ``evaluation_images`` call (None: the validation batch size).
        inception_weights: the ``inception-2015-12-05.pt`` file (None: clean-fid's ``/tmp`` location).
        reference_stats: ``.npz`` cache of the reference statistics (None:
            ``outputs/fid_stats/fid_reference_<hash>.npz``, the hash over dataset, resolution, count, extractor
            and world size). Computed once from the same validation batches, reused by later evaluations and runs.
        on_validate: also evaluate at the end of ``trainer.validate``.
        seed: generator seed (``seed + rank``), the same for every evaluation.
        features: ``"inception"`` (clean-fid: the real FID, logged as ``eval/fid``) or ``"random"``: the same
            Fréchet distance on fixed random conv features, which needs no download (offline toy runs; logged as
            ``eval/fid_random_features``: a proxy that shows a trend, never comparable with FID).
        feature_extractor: for tests: any ``images -> [N, D]`` callable instead of ``features``.
    """

    description = "FID"

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_images: int = 10000,
        batch_size: int | None = None,
        inception_weights: str | None = None,
        reference_stats: str | None = None,
        on_validate: bool = True,
        seed: int = 0,
        features: str = "inception",
        feature_extractor: Any = None,
    ):
        super().__init__(every_n_steps, num_images, batch_size, on_validate, seed)
        self.features = metric_features.check_fid_features(
            features
        )  # a typo fails when the config is read, not at setup
        self.metric = "eval/fid" if features == "inception" else "eval/fid_random_features"
        self.inception_weights = inception_weights
        self.reference_stats = reference_stats
        self.extractor = feature_extractor
        self._reference: tuple[np.ndarray, np.ndarray] | None = None
        self._need_reference = False
        self.reference_path: Path | None = None

    def build(self, trainer: Trainer, device: torch.device) -> None:
        if self.extractor is None:
            self.extractor = metric_features.make_fid_features(self.features, self.inception_weights, device)
        elif hasattr(self.extractor, "to"):
            self.extractor = self.extractor.to(device) or self.extractor

    def reference_key(self, trainer: Trainer) -> str:
        dm = getattr(trainer, "datamodule", None)
        dataset: Any = None
        if dm is not None and hasattr(dm, "val_urls"):
            try:
                dataset = [os.path.abspath(u) for u in dm.val_urls()]
            except Exception:
                dataset = None
        if dataset is None:
            dataset = getattr(dm, "val_shards", None) or type(dm).__name__
        resolution = getattr(dm, "val_resolution", None) or getattr(dm, "resolution", None)
        return json.dumps(
            {
                "dataset": dataset,
                "resolution": resolution,
                "count": self.num_images,
                "extractor": metric_features.extractor_name(self.extractor),
                "world_size": trainer.world_size,
            },
            sort_keys=True,
        )

    def _path(self, trainer: Trainer, key: str) -> Path:
        if self.reference_stats:
            return Path(self.reference_stats)
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return Path("outputs") / "fid_stats" / f"fid_reference_{digest}.npz"

    def before_run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        need = False
        if trainer.is_global_zero and self._reference is None:
            key = self.reference_key(trainer)
            self.reference_path = self._path(trainer, key)
            cached = metric_features.read_reference_stats(self.reference_path, key)
            if cached is not None:
                self._reference = (cached["mu"], cached["sigma"])
                log.info("FID reference statistics read from %s", self.reference_path)
            else:
                need = True
        self._need_reference = bool(trainer.strategy.broadcast(need, src=0))

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.extractor(images.float())).float()

    def process(self, trainer: Trainer, batch: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"fake": self._features(images)}
        if self._need_reference:
            out["real"] = self._features(batch["image"].float().clamp(0, 1))
        return out

    def gather_keys(self) -> list[str]:
        return ["fake", "real"] if self._need_reference else ["fake"]

    def compute(self, trainer: Trainer, gathered: dict[str, torch.Tensor]) -> float | None:
        fake = gathered["fake"]
        if self._need_reference:
            real = gathered["real"]
            if real.shape[0] < 2:
                log.warning("FID: fewer than 2 validation images; skipped")
                return None
            mu, sigma = metric_features.feature_statistics(real)
            metric_features.write_reference_stats(
                self.reference_path,
                mu,
                sigma,
                real.shape[0],
                metric_features.extractor_name(self.extractor),
                self.reference_key(trainer),
            )
            log.info("FID reference statistics of %d images written to %s", real.shape[0], self.reference_path)
            self._reference = (mu, sigma)
            self._need_reference = False
        if fake.shape[0] < 2:
            log.warning("FID: fewer than 2 generated images; skipped")
            return None
        return metric_features.frechet_distance_from_statistics(
            *metric_features.feature_statistics(fake), *self._reference
        )


# --- CLIP score --------------------------------------------------------------------------------------------------
class CLIPScoreEvaluation(GenerativeEvaluation):
    """Mean CLIP score (torchmetrics' definition) of images generated from the validation captions.

    Args:
        model_name / pretrained / weights_file / model_config_file: the open_clip model (see
            :class:`lit_wuerstchen.evaluation.ClipScorer`); offline and not cached fails at ``setup``.
        every_n_steps / num_images / batch_size / on_validate / seed: as :class:`FIDEvaluation`.
        offload: keep the CLIP model on the CPU between evaluations (ViT-bigG-14 is ~10 GB in float32) and move
            it to the GPU only for the evaluation pass.
        scorer: for tests: an object with ``score(images, prompts) -> [N]`` instead of building a CLIP model.

    Logged as ``eval/clip_score``; with a randomly initialised CLIP (no ``pretrained`` tag, no ``weights_file``:
    toy runs, plumbing only) as ``eval/clip_score_random_weights``, a number that says nothing about image-text
    agreement and is never reported as a CLIP score.
    """

    description = "CLIP score"

    def __init__(
        self,
        model_name: str = "ViT-bigG-14",
        pretrained: str | None = "laion2b_s39b_b160k",
        weights_file: str | None = None,
        model_config_file: str | None = None,
        every_n_steps: int = 5000,
        num_images: int = 10000,
        batch_size: int | None = None,
        on_validate: bool = True,
        seed: int = 0,
        offload: bool = True,
        scorer: Any = None,
    ):
        super().__init__(every_n_steps, num_images, batch_size, on_validate, seed)
        self.model_name, self.pretrained = model_name, pretrained
        self.weights_file, self.model_config_file = weights_file, model_config_file
        self.offload = offload
        self.scorer = scorer
        random_weights = scorer is None and pretrained is None and weights_file is None
        self.metric = "eval/clip_score_random_weights" if random_weights else "eval/clip_score"

    def build(self, trainer: Trainer, device: torch.device) -> None:
        if self.scorer is None:
            where = torch.device("cpu") if self.offload else device
            self.scorer = metric_features.ClipScorer(
                self.model_name, self.pretrained, self.weights_file, self.model_config_file, device=where
            )

    def before_run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.offload and hasattr(self.scorer, "to"):
            self.scorer.to(pl_module.device)

    def after_run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.offload and hasattr(self.scorer, "to"):
            self.scorer.to("cpu")

    def process(self, trainer: Trainer, batch: dict, images: torch.Tensor) -> dict[str, torch.Tensor]:
        captions = batch.get("caption")
        if captions is None:
            raise ValueError("CLIPScoreEvaluation needs batches with a 'caption' list")
        return {"score": torch.as_tensor(self.scorer.score(images, list(captions))).float().view(-1, 1)}

    def gather_keys(self) -> list[str]:
        return ["score"]

    def compute(self, trainer: Trainer, gathered: dict[str, torch.Tensor]) -> float | None:
        scores = gathered["score"]
        return float(scores.mean()) if scores.numel() else None
