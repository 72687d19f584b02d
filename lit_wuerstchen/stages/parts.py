"""The small parts a :class:`~lit_wuerstchen.stages.base.Stage` composes, one job each.

- :class:`FrozenParts`: networks a stage holds frozen, outside its module tree (earlier stages, text encoders).
- :class:`DivergenceGuard`: one gradient norm per optimiser step, used for the finiteness decision on every rank, the
  skipped-step budget and the clipping; and the check that no non-finite tensor is ever checkpointed.
- :class:`RandomStreams`: every rank's random generator states into the checkpoint and back, so a resumed run draws
  what the uninterrupted one would have.

None of them knows Lightning's loop: the stage passes in what they need (the strategy, the step).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..errors import DivergenceError
from ..strategies import is_sharded_tensor


class FrozenParts:
    """Frozen networks held by name: always in eval mode with ``requires_grad`` off, outside the optimiser, the EMA,
    DDP/FSDP wrapping and the model summary. A *persistent* part is saved in the stage's ``state_dict`` under
    ``<name>.`` and loaded back from it (a part that must travel with the checkpoint: Stage A inside Stage B, a
    randomly initialised text encoder)."""

    def __init__(self) -> None:
        self._parts: dict[str, tuple[nn.Module, bool]] = {}
        # float32 weights of persistent parts that run in bf16: what checkpoints save, never the rounded ones
        self._float32_state: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, module: nn.Module, persistent: bool) -> nn.Module:
        module.requires_grad_(False).eval()
        self._parts[name] = (module, persistent)
        return module

    def modules(self) -> dict[str, nn.Module]:
        return {name: module for name, (module, _) in self._parts.items()}

    def run_in(self, dtype: torch.dtype) -> None:
        """Cast every part to ``dtype``; a persistent part first keeps its float32 weights (on the host) for
        checkpoints. Each layer then takes its inputs in its weights' dtype, so callers outside autocast (callbacks,
        statistics) can hand a float32 tensor to a bf16 part."""
        for name, (module, persistent) in self._parts.items():
            if persistent and name not in self._float32_state:
                self._float32_state[name] = _host_copy(module.state_dict())
            module.to(dtype=dtype)
            for layer in module.modules():
                if next(layer.parameters(recurse=False), None) is not None and not hasattr(layer, "_casts_inputs"):
                    layer.register_forward_pre_hook(_cast_inputs_to_weights, with_kwargs=True)
                    layer._casts_inputs = True

    def apply(self, fn, recurse: bool = True) -> None:
        """What ``nn.Module._apply`` does to the stage (``.to()``, dtype casts) happens to the parts too."""
        for module, _ in self._parts.values():
            module._apply(fn, recurse)

    def eval(self) -> None:
        for module, _ in self._parts.values():
            module.eval()

    def save_into(self, state_dict: dict, prefix: str) -> None:
        for name, (module, persistent) in self._parts.items():
            if persistent:
                saved = self._float32_state.get(name) or module.state_dict()
                state_dict.update({f"{prefix}{name}.{key}": value for key, value in saved.items()})

    def load_from(self, state_dict: dict, prefix: str, missing_keys: list, unexpected_keys: list) -> None:
        """Take the parts' entries out of ``state_dict`` (they are not the module tree's, so ``nn.Module`` would call
        them unexpected) into the persistent parts; a persistent part missing from it is reported like any missing
        key, a non-persistent part's entries as unexpected."""
        for name, (module, persistent) in self._parts.items():
            head = f"{prefix}{name}."
            own = {key[len(head) :]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(head)]}
            if not persistent:
                unexpected_keys.extend(head + key for key in own)
                continue
            result = module.load_state_dict(own, strict=False)
            if name in self._float32_state:  # a bf16 part: the float32 weights to save are the loaded ones
                self._float32_state[name].update(_host_copy(own))
            missing_keys.extend(head + key for key in result.missing_keys)
            unexpected_keys.extend(head + key for key in result.unexpected_keys)


def _host_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def _cast_inputs_to_weights(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = next(layer.parameters(recurse=False)).dtype

    def cast(value):
        floating = isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype
        return value.to(dtype) if floating else value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


class DivergenceGuard:
    """Stops a run at the step that went wrong, before the optimiser touches the weights (so the weights, the EMA and
    every checkpoint stay finite); up to ``max_skipped_steps`` bad steps are skipped and counted instead.

    One gradient norm per step: :meth:`gradients_finite` computes it for the decision (one host sync per step) and
    :meth:`take_norm` hands it to the clipping, which would otherwise compute it again.
    """

    def __init__(self) -> None:
        self.skipped_steps = 0  # kept in the checkpoint record: survives a resume
        self.last_loss: torch.Tensor | None = None  # for the message of a bad step
        self._norm: torch.Tensor | None = None

    def gradients_finite(self, parameters: list[nn.Parameter], strategy: Any, step: int, allowed: int) -> bool:
        """Whether the gradients are finite on every rank (a non-finite loss gives non-finite gradients, so it is
        caught here too). A bad step is counted; past ``allowed`` bad steps: :class:`DivergenceError`."""
        self._norm = None
        gradients = [p.grad for p in parameters if p.grad is not None]
        if not gradients:
            return True
        norm = torch.nn.utils.get_total_norm(gradients)
        if strategy.reduce_boolean_decision(bool(torch.isfinite(norm)), all=True):
            self._norm = norm
            return True
        self.skipped_steps += 1
        loss = "?" if self.last_loss is None else f"{self.last_loss.item():.6g}"
        what = f"non-finite training at step {step}: gradient norm {norm.item():.6g}, loss {loss}"
        if self.skipped_steps > allowed:
            raise DivergenceError(
                f"diverged: {what} ({self.skipped_steps} bad step(s), optimizer.max_skipped_steps={allowed}); "
                f"no checkpoint was written after it"
            )
        rank_zero_warn(f"{what}: step skipped ({self.skipped_steps} of {allowed} allowed)")
        return False

    def take_norm(self) -> torch.Tensor | None:
        """This step's gradient norm, once (None: not computed, or the step is skipped)."""
        norm, self._norm = self._norm, None
        return norm

    @staticmethod
    def check_checkpoint(checkpoint: dict, strategy: Any, step: int) -> None:
        """The last line of defence: a checkpoint with a non-finite weight or average is never written. A sharded
        tensor (FSDP) is checked shard by shard on every rank."""
        for section in ("state_dict", "ema_state_dict"):
            for key, value in checkpoint.get(section, {}).items():
                if not value.is_floating_point():
                    continue
                if is_sharded_tensor(value):
                    finite = strategy.reduce_boolean_decision(bool(torch.isfinite(value.to_local()).all()), all=True)
                else:
                    finite = bool(torch.isfinite(value).all())
                if not finite:
                    raise DivergenceError(
                        f"diverged: {section} entry {key} is non-finite at step {step}; "
                        f"not writing the checkpoint (the previous one is the last good one)"
                    )


class RandomStreams:
    """The random streams (torch, CUDA, numpy, Python) continue after a resume where the checkpoint left them: noise,
    t, dropout and caption drops of a resumed run are those the uninterrupted run would have drawn."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @staticmethod
    def capture() -> list[dict[str, Any]]:
        """Every rank's states, in rank order (a collective under DDP: checkpoints are dumped on every rank)."""
        return _gather(rng_states())

    def restore_later(self, states: list[dict[str, Any]], rank: int) -> None:
        """Keep this rank's states of a checkpoint for :meth:`restore` (none kept when the checkpoint has fewer ranks:
        a resume on another world size draws anew)."""
        self._pending = states[rank] if rank < len(states) else None

    def restore(self) -> None:
        """Set the kept states, once (at train start: after setup and the sanity check, which draw too)."""
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


def rng_states() -> dict[str, Any]:
    """This process's random generator states, as plain values (so checkpoints load with ``weights_only``)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _gather(value: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]
