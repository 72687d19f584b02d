"""Training performance in TensorBoard under ``perf/``: throughput, achieved FLOP/s and MFU, peak memory and the share
of time spent waiting for data (:class:`PerfMonitor`); the training FLOPs of a step in the model summary
(:class:`TrainingFlopsSummary`)."""

from __future__ import annotations

import collections
import sys
import time
import weakref
from typing import Any

import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size

from lit_wuerstchen.flops import device_peak_flops
from lit_wuerstchen.lightning_private import accumulating, logs_written_now, summary_settings, summary_table

# trainer.precision -> the dtype the peak FLOP/s table is read for
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


class PerfMonitor(Callback):
    """Training performance in TensorBoard under ``perf/``: throughput, FLOP/s, memory and data wait.

    Rank 0 logs, every ``trainer.log_every_n_steps`` training steps (at the step of the other training curves):

    - ``perf/samples_per_sec``: training samples per second, all ranks together (rank 0's rate times the world size:
      every rank takes the same batch size); ``perf/images_per_sec``: the same number, since one sample is one image
      in every stage;
    - ``perf/tflops_per_sec``: model TFLOP/s achieved per device: the FLOPs of one training step, counted once on
      the first batch by ``pl_module.training_flops(batch)`` (forward and backward of the trained networks; see
      :meth:`lit_wuerstchen.stages.base.Stage.training_flops`; counted again when the module's
      ``training_flops_phase`` changes, e.g. Stage A's discriminator starting), times the steps, over the time; not
      logged for a module that counts none;
    - ``perf/mfu``: model FLOPs utilisation, ``tflops_per_sec`` over the device's peak (``peak_tflops``, else
      Lightning's table of GPUs for the run's precision, the H200 at its dense rate:
      :func:`lit_wuerstchen.flops.device_peak_flops`); not logged where neither is known (e.g. on a CPU);
    - ``perf/peak_memory_gb``: peak memory of rank 0's device in GiB: on CUDA the peak allocated by tensors within
      the logging window (reset after each log), elsewhere the process's peak resident set size so far;
    - ``perf/data_wait_fraction``: the share of the time from the end of one training step to the end of the next
      that is spent outside the step: waiting for the next batch from the DataLoader and its copy to the device
      (plus a checkpoint write on the steps that have one). Near 0: the data keeps up; near 1: the device starves.

    Rates are averaged over the last ``window`` logging intervals; validation loops are left out of every time.
    The clock starts at the end of the first training batch (which also counts the FLOPs), so warm-up is left out.

    For a module that counts its training FLOPs, Lightning's model summary (``ModelSummary`` / ``RichModelSummary``,
    the Trainer's default) is replaced by :class:`TrainingFlopsSummary`, which prints the same table at the first
    training batch with that count as its "Total FLOPs" (Lightning's own is 0: it counts a forward of
    ``example_input_array``, which the stages do not have).

    The arithmetic is Lightning's :class:`~lightning.fabric.utilities.throughput.Throughput`; Lightning's
    ``ThroughputMonitor`` callback is not used because it synchronises the device after every batch (and logs under
    ``train|``): this callback synchronises only on logging steps, and reads no device value on other steps.

    Args:
        window: logging intervals each logged rate averages over (1: the steps since the previous log).
        peak_tflops: the device's peak TFLOP/s for MFU, overriding Lightning's table (e.g. a GPU it does not know, or
            the dense rate where the table lists the sparse one).
    """

    def __init__(self, window: int = 1, peak_tflops: float | None = None):
        if window < 1:
            raise ValueError(f"perf window must be >= 1, got {window}")
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"perf peak_tflops must be positive or null, got {peak_tflops}")
        self.window = window
        self.peak_tflops = peak_tflops
        self._reset()

    def _reset(self) -> None:
        self._throughput: Throughput | None = None
        self._flops_per_batch: int | None = None
        self._origin: float | None = None  # active-clock time at the end of the first batch
        self._excluded = 0.0  # seconds spent in validation loops so far
        self._validation_start: float | None = None
        self._last_end: float | None = None  # active-clock time at the end of the previous batch
        self._wait = 0.0  # seconds outside the training step since the origin
        self._batches = self._samples = 0  # since the origin
        self._flops_phase: Any = None  # pl_module.training_flops_phase when the FLOPs were counted
        self._flops_since_update = 0  # FLOPs of the batches since the last Throughput update
        self._waits: collections.deque[tuple[float, float]] = collections.deque(maxlen=self.window + 1)

    # Timing is host wall-clock. On CUDA the device is synchronised only at the end of a logging step, so the time of a
    # window (between two such syncs) is the device's; the data wait is the host's time outside the step (mostly
    # blocked on the DataLoader), which can overlap with device work the host queued: an upper bound of the device's
    # idle time, a tight one since the stages read one value back in every step (the finite-gradient check).
    def _now(self) -> float:
        return time.perf_counter() - self._excluded

    def _sync(self, trainer: Trainer) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and callable(getattr(pl_module, "training_flops", None)):
            use_training_flops_summary(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()
        if not trainer.is_global_zero:
            return
        device = trainer.strategy.root_device
        dtype = _COMPUTE_DTYPES.get(str(trainer.precision).split("-")[0], torch.float32)
        peak, source = device_peak_flops(device, dtype, self.peak_tflops)
        if not peak:
            rank_zero_info(f"perf: {source} ({dtype}): perf/mfu is not logged (set perf.peak_tflops to log it)")
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window + 1)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)  # the sanity check is not training

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero or self._throughput is None:
            return
        phase = getattr(pl_module, "training_flops_phase", None)  # a host value: no device sync
        if self._origin is None or phase != self._flops_phase:  # the first batch of this fit, or other work now
            self._flops_phase = phase
            self._flops_per_batch = self._count_flops(pl_module, batch)
        if self._last_end is not None:
            self._wait += self._now() - self._last_end

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero or self._throughput is None:
            return
        if self._origin is None:  # the clock starts here
            self._sync(trainer)
            self._origin = self._last_end = self._now()
            self._update()
            return
        self._batches += 1
        self._samples += _batch_size(batch)
        if self._flops_per_batch is not None:
            self._flops_since_update += self._flops_per_batch
        # Lightning's own logging cadence (as LearningRateMonitor), once the accumulated batches made their step
        if accumulating(trainer) or not logs_written_now(trainer):
            self._last_end = self._now()
            return
        self._sync(trainer)
        self._last_end = self._now()
        self._update()
        metrics = self._metrics(trainer)
        if metrics:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # where train/loss of this step is logged
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._sync(trainer)  # the training work queued so far belongs to training
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._validation_start is not None:
            self._excluded += time.perf_counter() - self._validation_start
            self._validation_start = None

    # --- the numbers ----------------------------------------------------------------------------------------------
    def _count_flops(self, pl_module: LightningModule, batch: Any) -> int | None:
        flops = training_flops(pl_module, batch)
        if flops is None:
            rank_zero_info(
                f"perf: {type(pl_module).__name__} counts no training FLOPs: perf/tflops_per_sec and perf/mfu "
                "are not logged"
            )
            return None
        rank_zero_info(f"perf: {flops / 1e9:.3g} GFLOP per training step and device (forward + backward)")
        return flops

    def _update(self) -> None:
        assert self._throughput is not None and self._last_end is not None and self._origin is not None
        flops = None if self._flops_per_batch is None else self._flops_since_update
        self._flops_since_update = 0
        elapsed = self._last_end - self._origin
        self._throughput.update(time=elapsed, batches=self._batches, samples=self._samples, flops=flops)
        self._waits.append((elapsed, self._wait))

    def _metrics(self, trainer: Trainer) -> dict[str, float]:
        assert self._throughput is not None
        computed = self._throughput.compute()
        samples = computed.get("samples_per_sec", computed.get("device/samples_per_sec"))
        if samples is None:  # the window is not full yet
            return {}
        metrics = {"perf/samples_per_sec": samples, "perf/images_per_sec": samples}
        if "device/flops_per_sec" in computed:
            metrics["perf/tflops_per_sec"] = computed["device/flops_per_sec"] / 1e12
        if "device/mfu" in computed:
            metrics["perf/mfu"] = computed["device/mfu"]
        memory = _peak_memory_gb(trainer.strategy.root_device)
        if memory is not None:
            metrics["perf/peak_memory_gb"] = memory
        (time0, wait0), (time1, wait1) = self._waits[0], self._waits[-1]
        metrics["perf/data_wait_fraction"] = min(1.0, max(0.0, (wait1 - wait0) / (time1 - time0)))
        return {name: float(value) for name, value in metrics.items()}


# --- the training FLOPs of a step, counted once per batch shape (PerfMonitor and the summary share the count) -------
_COUNTS: weakref.WeakKeyDictionary[LightningModule, dict[tuple, int | None]] = weakref.WeakKeyDictionary()


def training_flops(pl_module: LightningModule, batch: Any) -> int | None:
    """``pl_module.training_flops(batch)`` (else its ``flops_per_batch``), counted once per batch shape and
    ``training_flops_phase``; None where the module counts none or the count fails (warned once: a monitor must not
    stop a run)."""
    key = (_shapes(batch), getattr(pl_module, "training_flops_phase", None))
    counts = _COUNTS.setdefault(pl_module, {})
    if key not in counts:
        count = getattr(pl_module, "training_flops", None)
        try:
            flops = count(batch) if callable(count) else getattr(pl_module, "flops_per_batch", None)
        except Exception as error:
            rank_zero_warn(f"perf: counting the training FLOPs failed ({type(error).__name__}: {error}); no TFLOP/s")
            flops = None
        counts[key] = None if flops is None else int(flops)
    return counts[key]


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, dict):
        return tuple((k, _shapes(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (torch.Tensor, dict, list, tuple)):
            return tuple(_shapes(v) for v in value)
        return len(value)  # captions, keys: how many
    return None


# --- the model summary with the training FLOPs -----------------------------------------------------------------------
def use_training_flops_summary(trainer: Trainer) -> None:
    """Replace Lightning's model summary callback (``ModelSummary`` / ``RichModelSummary`` as such, not a subclass
    someone chose) with :class:`TrainingFlopsSummary` / :class:`RichTrainingFlopsSummary` of the same settings. With
    ``enable_model_summary=False`` there is none: nothing is printed."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in (ModelSummary, RichModelSummary):
            cls = RichTrainingFlopsSummary if type(callback) is RichModelSummary else TrainingFlopsSummary
            max_depth, options = summary_settings(callback)
            trainer.callbacks[index] = cls(max_depth, **options)


class _TrainingFlopsSummaryMixin:
    """Lightning's model summary, printed at the first training batch, with "Total FLOPs" the training FLOPs of one
    step on that batch (``pl_module.training_flops(batch)``: forward + backward, counted on the meta device, the
    count :class:`PerfMonitor` uses) instead of Lightning's 0. The per-layer FLOPs column, which Lightning fills from
    a forward of ``example_input_array``, shows "-" where that is absent."""

    total_flops: int | None = None
    """The count printed (None before the first batch or where the module counts none)."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pending = bool(summary_settings(self)[0])  # the batch's shapes are needed: printed at the first batch

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not getattr(self, "_pending", False) or not trainer.is_global_zero:
            return
        self._pending = False
        self.total_flops = training_flops(pl_module, batch)
        summary, data = summary_table(self, trainer, pl_module)
        if pl_module.example_input_array is None:
            data = [(name, ["-"] * len(values)) if name == "FLOPs" else (name, values) for name, values in data]
        self.summarize(
            data,
            summary.total_parameters,
            summary.trainable_parameters,
            summary.model_size,
            summary.total_training_modes,
            total_flops=self.total_flops or 0,
            **summary_settings(self)[1],
        )
        if self.total_flops:
            rank_zero_info(
                f"Total FLOPs above: one training step (forward + backward) on a batch of {_batch_size(batch)}, "
                f"{self.total_flops:,} FLOPs"
            )


class TrainingFlopsSummary(_TrainingFlopsSummaryMixin, ModelSummary):
    __doc__ = _TrainingFlopsSummaryMixin.__doc__


class RichTrainingFlopsSummary(_TrainingFlopsSummaryMixin, RichModelSummary):
    __doc__ = _TrainingFlopsSummaryMixin.__doc__


def _batch_size(batch: Any) -> int:
    """Samples in a batch: our batches' keys (a host list: no device sync), else Lightning's guess."""
    if isinstance(batch, dict) and "key" in batch:
        return len(batch["key"])
    return extract_batch_size(batch)


def _peak_memory_gb(device: torch.device) -> float | None:
    """CUDA: the peak allocated on ``device`` since the last call (the peak is reset); elsewhere the process's peak
    resident set size (None where the OS does not tell)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20
