"""Fully sharded data parallel training (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``) for any stage.

:func:`shard_network` is the one place a network is sharded (the strategy and ``benchmarks/gpu_throughput.py`` use
it): every block (:data:`BLOCK_TYPES`, the outermost match) becomes its own FSDP unit, optionally with activation
checkpointing, then the network itself (its stem, mappers and head). :class:`FSDP` is Lightning's
``ModelParallelStrategy`` (FSDP2 on a data-parallel device mesh) with those settings; a stage's ``configure_model``
asks it to shard the stage (:meth:`FSDP.shard_stage`). Frozen parts (text encoders, Stage A, Stage B and the
compressor in Stage C) are outside the module tree (``Stage.freeze``): they are never sharded or optimised, each
rank holds them whole, in bf16 under a bf16 precision.

Checkpoints are sharded (a folder, one file per rank, ``torch.distributed.checkpoint``), with the EMA averages
saved sharded beside the weights; :func:`consolidate` turns such a folder into the one-file checkpoint that
``export``, ``sample`` and later stages read (they call it themselves when given a folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from .errors import ConfigError
from .files import atomic_file
from .lightning_private import (
    MultiProcessingLauncher,
    WorkerOutput,
    distributed_checkpoint_load,
    distributed_checkpoint_save,
    load_distributed_checkpoint,
)
from .models.blocks import AttnBlock, DiTBlock, ResBlock
from .models.diffnext import DiffNeXtBlock

BLOCK_TYPES: tuple[type[nn.Module], ...] = (DiffNeXtBlock, ResBlock, AttnBlock, DiTBlock)
"""What becomes one FSDP unit (and one activation-checkpointing region): the repeated blocks of the prior (either
architecture) and the decoder. The prior's TimestepBlocks (one small linear each) stay in the network's own unit."""

EMA_KEY = "ema_state_dict"
METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint folder


def blocks_of(network: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``network`` whose type is in :data:`BLOCK_TYPES`, in module order."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in network.modules():
        if id(module) in inside:
            continue
        if isinstance(module, BLOCK_TYPES):
            found.append(module)
            inside.update(id(child) for child in module.modules())
    return found


def shard_network(
    network: nn.Module,
    mesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shard ``network`` in place over ``mesh``: each block is a unit (gathered just before it runs, freed after),
    then the rest of the network. ``param_dtype``: the dtype parameters are gathered and computed in (bf16 for
    bf16 training; the sharded fp32 weights, the optimiser state and the EMA stay fp32); ``reduce_dtype``: the
    dtype gradients are reduce-scattered in (fp32: bf16 gradient sums lose the small updates of a long run)."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(network, FSDPModule):
        return network  # already sharded (configure_model runs again for validate/test after fit)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks_of(network):
        if activation_checkpointing:
            checkpoint(block)  # the composable form: no wrapper module, so parameter names stay as they are
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return network


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class FSDP(ModelParallelStrategy):
    """Lightning's FSDP2 strategy for the stages: ``trainer.strategy`` in ``experiments/strategies/fsdp.yaml``.

    Lightning's ``FSDPStrategy`` is FSDP1, which refuses to run without an accelerator (so it cannot be tested on a
    CPU) and renames parameters; ``ModelParallelStrategy`` runs FSDP2 on any device but leaves the sharding to the
    LightningModule: this subclass fixes the mesh to pure data parallelism and shards the stage's networks with
    :func:`shard_network`, saves the EMA with the weights, and can fork its processes (tests).
    """

    def __init__(
        self,
        activation_checkpointing: bool = True,
        reshard_after_forward: bool = True,
        reduce_dtype: Literal["float32", "bfloat16"] = "float32",
        save_distributed_checkpoint: bool = True,
        start_method: Literal["popen", "spawn", "fork"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        """
        Args:
            activation_checkpointing: recompute each block's activations in the backward pass (memory for time).
            reshard_after_forward: free each block's gathered weights after its forward (gathered again for the
                backward); False keeps them, trading memory for one all-gather per block and step.
            reduce_dtype: the dtype gradients are averaged in across ranks.
            save_distributed_checkpoint: a sharded checkpoint folder (fast, no rank holds everything); False: the
                full weights gathered on rank 0 into one file.
            start_method: "popen" re-runs the command for every other local rank (the command line); "fork" and
                "spawn" start them from this process (notebooks, tests).
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.reduce_dtype = _dtype(reduce_dtype)
        self.start_method = start_method
        self._sharded_buffers: list[torch.Tensor] = []

    # --- processes and mesh -----------------------------------------------------------------------------------------
    def _configure_launcher(self) -> None:
        if self.start_method == "popen" or self.cluster_environment.creates_processes_externally:
            return super()._configure_launcher()
        self._launcher = _ShardedMultiProcessingLauncher(self, start_method=self.start_method)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every device shards the same networks
        super().setup_environment()

    # --- sharding ---------------------------------------------------------------------------------------------------
    @property
    def param_dtype(self) -> torch.dtype | None:
        """bf16 compute for a bf16 precision; None keeps the parameters' own dtype."""
        return torch.bfloat16 if str(self.precision_plugin.precision).startswith("bf16") else None

    def shard_stage(self, networks: Iterable[nn.Module]) -> None:
        """Shard each of ``networks`` (the stage's modules with trained parameters) over the data-parallel mesh."""
        mesh = self.device_mesh["data_parallel"]
        networks = list(networks)
        for network in networks:
            if self._layer_sync is not None:  # trainer.sync_batchnorm (Stage B's compressor), as FSDPStrategy does
                self._layer_sync.apply(network)
            network.to(self.root_device)  # fully_shard shards the tensors where they are
            shard_network(
                network,
                mesh,
                param_dtype=self.param_dtype,
                reduce_dtype=self.reduce_dtype,
                reshard_after_forward=self.reshard_after_forward,
                activation_checkpointing=self.activation_checkpointing,
            )
        if self.world_size > 1:
            self._sharded_buffers = [buffer for network in networks for buffer in network.buffers()]

    def _sync_buffers(self) -> None:
        """FSDP shards parameters, not buffers: give every rank rank 0's (BatchNorm statistics of Stage B's
        compressor) before each step, as DDP does, and before a checkpoint takes them (rank 0's, as DDP saves)."""
        if self._sharded_buffers:
            from torch.distributed.utils import _sync_params_and_buffers

            _sync_params_and_buffers(torch.distributed.group.WORLD, self._sharded_buffers, 250 * 1024 * 1024, 0)

    def training_step(self, *args: Any, **kwargs: Any):
        self._sync_buffers()
        return super().training_step(*args, **kwargs)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._sync_buffers()
        return super().lightning_module_state_dict()

    # --- checkpoints: the EMA travels sharded with the weights ------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        averages = checkpoint.pop(EMA_KEY, None)
        if averages is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if not self._save_distributed_checkpoint:
            # one file: rank 0 writes the gathered averages (full_tensor is a collective: every rank calls it)
            checkpoint[EMA_KEY] = {key: _full(value) for key, value in averages.items()}
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # One torch.distributed.checkpoint save of weights, optimiser states and averages (every rank writes its
        # shards; a second save into the folder would replace the first's index); the rest goes to meta.pt on rank 0,
        # as Lightning's own sharded save does.
        path = Path(self.broadcast(filepath))
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"state_dict": checkpoint.pop("state_dict"), EMA_KEY: averages}
        tensors.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        distributed_checkpoint_save(tensors, path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / METADATA_FILE)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir() and _sharded_keys(path, EMA_KEY):
            checkpoint[EMA_KEY] = self._load_sharded_averages(path)
        return checkpoint

    def _load_sharded_averages(self, path: Path) -> dict[str, torch.Tensor]:
        """The EMA entries of a sharded folder, as tensors sharded like this run's weights."""
        stage = self.lightning_module
        template = {key: value.detach().clone() for key, value in stage.trained_state().items()}
        wanted = {f"{EMA_KEY}.{key}" for key in template}
        stored = _sharded_keys(path, EMA_KEY)
        if stored != wanted:
            missing = sorted(wanted - stored)[:3]
            extra = sorted(stored - wanted)[:3]
            raise ConfigError(
                f"the EMA weights in {path} do not match the network (different config?): missing {missing}, "
                f"unexpected {extra}"
            )
        state = {EMA_KEY: template}
        distributed_checkpoint_load(state, path)
        return state[EMA_KEY]


class _ShardedMultiProcessingLauncher(MultiProcessingLauncher):
    """Lightning's fork/spawn launcher hands rank 0's ``state_dict`` back to the calling process; under FSDP that
    would be rank 0's shards (which cannot be unpickled outside the process group): hand back the full weights."""

    def _collect_rank_zero_results(self, trainer, results: Any) -> WorkerOutput | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(trainer.lightning_module, options=options)  # a collective: every rank
        if self._strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) if callback else None
        return WorkerOutput(best, weights_path, trainer.state, results, self.get_extra_results(trainer))


def is_sharded(trainer) -> bool:
    """Whether the trainer's networks are sharded (the one way this is asked): then every forward pass is a
    collective, so generation for logging or evaluation must run on every rank, the same number of times, and so is
    every checkpoint save."""
    return isinstance(getattr(trainer, "strategy", None), FSDP)


def is_sharded_tensor(value: torch.Tensor) -> bool:
    """Whether a tensor is a shard of a larger one (an FSDP2 ``DTensor``): its values live on every rank."""
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if is_sharded_tensor(value) else value).detach().cpu()


def _sharded_keys(path: Path, prefix: str) -> set[str]:
    """The flattened keys under ``prefix`` that a sharded checkpoint folder holds."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    return {key for key in metadata.state_dict_metadata if key.startswith(prefix + ".")}


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILE).is_file()


def read_sharded(folder: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a sharded folder, whole, in this process's memory (no process group needed): the same
    layout as a one-file checkpoint (``state_dict``, ``ema_state_dict``, the stage record, loop states), with the
    optimiser states keyed by parameter name (as FSDP saves them: resume from the folder itself)."""
    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise FileNotFoundError(f"{folder} is not a sharded checkpoint folder (no {METADATA_FILE} in it)")
    checkpoint = load_distributed_checkpoint(folder)
    optimizers = sorted((k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if optimizers:
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizers]
    return checkpoint


def consolidate(folder: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """A sharded checkpoint folder -> one checkpoint file (:func:`read_sharded`), by default next to it:
    ``last.ckpt/`` -> ``last.consolidated.ckpt``. One process, no GPU; never replaces a file unless ``overwrite``."""
    folder = Path(folder)
    stem = folder.stem if folder.suffix == ".ckpt" else folder.name
    out = Path(out) if out is not None else folder.with_name(stem + ".consolidated.ckpt")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    checkpoint = read_sharded(folder)
    with atomic_file(out) as partial:  # a crash mid-write leaves no half-written checkpoint under the final name
        torch.save(checkpoint, partial)
    return out


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint file or sharded folder."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
