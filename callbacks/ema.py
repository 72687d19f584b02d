"""Exponential moving average of the trained networks only (``pl_module.trained_state()``: the tensors of
``pl_module.trained_networks()``, less the frozen base of a LoRA-adapted network, whose adapters alone are averaged).

The averaged tensors are stored in the checkpoint under ``ema_state_dict``, with the same keys as in ``state_dict``
(``decoder.…``, ``prior.…``), where :mod:`lit_wuerstchen.checkpoints` reads them. They are swapped in for validation,
testing, prediction and the evaluation callbacks. Under FSDP (:class:`lit_wuerstchen.strategies.FSDP`) the weights
are sharded tensors and so are the averages: each rank averages its own shards, and the strategy saves them sharded
beside the weights.

Not Lightning's ``EMAWeightAveraging``: it deep-copies the whole LightningModule (frozen encoders and metrics: for
Stage C with ViT-bigG another 0.7B parameters in memory), swaps the average in for validation only, and replaces
``state_dict`` with the average on save while later stages must read the trained network's average by key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.distributed.utils import _sync_params_and_buffers

from lit_wuerstchen.strategies import is_sharded_tensor


class EMA(Callback):
    def __init__(self, decay: float = 0.999, start_step: int = 0, update_every: int = 1):
        """
        Args:
            decay: EMA decay per update.
            start_step: until this global step the average just tracks the weights (copies them).
            update_every: update every N optimiser steps (the decay applies per update).
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.decay = decay
        self.start_step = start_step
        self.update_every = update_every
        self._averages: dict[str, torch.Tensor] | None = None
        self._loaded: dict[str, torch.Tensor] | None = None
        self._backup: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _networks(pl_module: LightningModule) -> dict[str, nn.Module]:
        if not hasattr(pl_module, "trained_networks"):
            raise TypeError(f"{type(pl_module).__name__} has no trained_networks(): EMA does not know what to average")
        return pl_module.trained_networks()

    def _state(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """The trained networks' tensors, keyed as in the LightningModule's ``state_dict``."""
        if hasattr(pl_module, "trained_state"):
            return pl_module.trained_state()
        return {
            f"{name}.{key}": value
            for name, network in self._networks(pl_module).items()
            for key, value in network.state_dict().items()
        }

    def _load(self, pl_module: LightningModule, state: dict[str, torch.Tensor]) -> None:
        current = self._state(pl_module)  # state_dict tensors share the weights' storage: copied into in place
        if current.keys() != state.keys():
            raise ValueError("the EMA weights do not match the network (different config?)")
        for key, value in state.items():
            current[key].copy_(value)

    def _ensure_averages(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        if self._averages is None:
            state = self._state(pl_module)
            if self._loaded is not None:
                if self._loaded.keys() != state.keys():
                    raise ValueError("the checkpoint's EMA weights do not match the network (different config?)")
                self._averages = {k: _like(v, state[k]) for k, v in self._loaded.items()}
                self._loaded = None
            else:
                self._averages = {k: v.detach().clone() for k, v in state.items()}
            # The update's key groups, once: one fused lerp per kind (sharded parameters under FSDP, plain tensors),
            # a copy for integer buffers (BatchNorm's num_batches_tracked).
            floating = [k for k, v in self._averages.items() if v.is_floating_point()]
            self._lerp_groups = [
                group
                for group in (
                    [k for k in floating if is_sharded_tensor(self._averages[k])],
                    [k for k in floating if not is_sharded_tensor(self._averages[k])],
                )
                if group
            ]
            self._copied = [k for k in self._averages if not self._averages[k].is_floating_point()]
        return self._averages

    @property
    def averages(self) -> dict[str, torch.Tensor] | None:
        return self._averages

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.update_every:
            return
        averages = self._ensure_averages(pl_module)
        state = self._state(pl_module)
        weight = 1.0 if step < self.start_step else 1.0 - self.decay
        for group in self._lerp_groups:
            torch._foreach_lerp_([averages[k] for k in group], [state[k].detach() for k in group], weight)
        for key in self._copied:
            averages[key].copy_(state[key])

    # --- swapping the average in for evaluation ---------------------------------------------------------
    @torch.no_grad()
    def _sync_buffers(self, pl_module: LightningModule) -> None:
        """Give every rank rank 0's averages of the networks' floating buffers (BatchNorm statistics): parameters are
        equal on all ranks (DDP) or sharded (FSDP), but each rank's buffers move with its own batches, so their
        averages drift apart. Called before the averages are used or saved."""
        if self._averages is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        buffers = [
            self._averages[key]
            for name, network in self._networks(pl_module).items()
            for key in (f"{name}.{buffer}" for buffer, _ in network.named_buffers())
            if key in self._averages and self._averages[key].is_floating_point()
        ]
        if buffers:
            _sync_params_and_buffers(dist.group.WORLD, buffers, 250 * 1024 * 1024, 0)

    @torch.no_grad()
    def _swap_in(self, pl_module: LightningModule) -> None:
        if self._backup is not None:
            return
        averages = self._ensure_averages(pl_module)
        self._sync_buffers(pl_module)
        self._backup = {k: v.detach().clone() for k, v in self._state(pl_module).items()}
        self._load(pl_module, averages)

    @torch.no_grad()
    def _swap_out(self, pl_module: LightningModule) -> None:
        if self._backup is None:
            return
        self._load(pl_module, self._backup)
        self._backup = None

    @property
    def swapped_in(self) -> bool:
        """Whether the module holds the averaged weights now (validation, testing, prediction, ``averaged``)."""
        return self._backup is not None

    @contextmanager
    def averaged(self, pl_module: LightningModule) -> Iterator[None]:
        """The averaged weights in ``pl_module`` for the block, the trained ones back after it. Inside validation
        (already swapped in) it changes nothing, so callbacks can use it wherever they run."""
        if self.swapped_in:
            yield
            return
        self._swap_in(pl_module)
        try:
            yield
        finally:
            self._swap_out(pl_module)

    def _swap_in_hook(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_in(pl_module)

    def _swap_out_hook(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out(pl_module)

    on_validation_start = on_test_start = on_predict_start = _swap_in_hook
    on_validation_end = on_test_end = on_predict_end = _swap_out_hook

    # --- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if self._averages is None and self._loaded is None:
            return
        self._sync_buffers(pl_module)
        averages = self._averages if self._averages is not None else self._loaded
        checkpoint["ema_state_dict"] = {k: _for_checkpoint(v) for k, v in averages.items()}
        if self._backup is not None:
            # Saved while the average is swapped in: the model's own entries must hold the trained weights.
            checkpoint["state_dict"].update({k: _for_checkpoint(v) for k, v in self._backup.items()})

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if "ema_state_dict" in checkpoint:
            self._loaded = checkpoint["ema_state_dict"]
            self._averages = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start_step": self.start_step, "update_every": self.update_every}


def _like(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` laid out as ``weight``: its device and dtype, and its shards under FSDP (a checkpoint
    written unsharded, e.g. by a DDP run, is split like the weights when an FSDP run resumes it)."""
    if is_sharded_tensor(weight) and not is_sharded_tensor(value):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=weight.device, dtype=weight.dtype)
        return distribute_tensor(value, weight.device_mesh, weight.placements)
    return value.to(device=weight.device, dtype=weight.dtype).clone()


def _for_checkpoint(value: torch.Tensor) -> torch.Tensor:
    """A detached copy to save: on the host, or a sharded tensor as it is (the FSDP strategy writes its shards)."""
    return value.detach().clone() if is_sharded_tensor(value) else value.detach().cpu().clone()
