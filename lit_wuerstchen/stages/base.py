"""What every stage's LightningModule shares: the optimiser, frozen parts, the EMA contract, checkpoint records and
data-health logging (:class:`Stage`), and the one diffusion training step of Stages B and C (:class:`DiffusionStage`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..checkpoints import RECORD, stage_record
from ..data.cache import check_models
from ..diffusion import Diffusion, DiffusionConfig, SamplingConfig
from ..errors import ConfigError, DivergenceError
from ..lora import LoraSettings, describe, inject_lora, is_adapter_key


@dataclass
class OptimizerConfig:
    """AdamW with a linear warm-up, then a constant or cosine learning rate.

    Paper recipes: lr 1e-4, constant, 10k warm-up steps for Stages B and C. Short runs (toy scale) profit
    from the cosine decay to ``min_lr_ratio * lr`` at ``trainer.max_steps``.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    decay: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    """Gradient-norm clipping (None disables)."""
    max_skipped_steps: int = 0
    """Steps with a non-finite gradient (or loss) that are skipped (counted in ``train/skipped_steps``) before the
    run stops as diverged; 0: stop at the first."""

    def __post_init__(self) -> None:
        if self.max_skipped_steps < 0:
            raise ValueError(f"optimizer.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")

    def lr_factor(self, step: int, total_steps: int | None) -> float:
        warmup = max(self.warmup_steps, 0)
        if step < warmup:
            return (step + 1) / warmup
        if self.decay == "constant" or not total_steps or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def build(
        self, parameters, lr: float | None = None, total_steps: int | None = None
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW and its per-step scheduler; ``total_steps`` (trainer.max_steps) is needed for cosine decay."""
        if self.decay == "cosine" and (total_steps is None or total_steps <= 0):
            raise ValueError("optimizer.decay: cosine needs trainer.max_steps to be set")
        optimizer = torch.optim.AdamW(
            parameters, lr=lr or self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, total_steps))
        return optimizer, scheduler


def as_dataclass(cls, value):
    """Accept a config dataclass or its dict form (how checkpoints store hyper-parameters)."""
    return cls(**value) if isinstance(value, dict) else value


# --- starting from a checkpoint (docs/finetune.md) -------------------------------------------------------------------
def lora_settings(value: LoraSettings | dict, init_checkpoint: str | None) -> LoraSettings:
    """The LoRA settings of a run; LoRA needs a base to adapt (``init_checkpoint``): without one, a one-line error."""
    settings = as_dataclass(LoraSettings, value)
    if settings.enabled and not init_checkpoint:
        raise ConfigError(
            f"lora.rank {settings.rank} needs model.init_args.init_checkpoint: LoRA adapts the networks of a trained "
            f"checkpoint (its base weights are not saved, only the adapters)"
        )
    return settings


def network_from_init(ours: Any, theirs: Any, init_checkpoint: str, option: str, ignore: tuple[str, ...] = ()) -> Any:
    """The config of a network that starts from ``init_checkpoint``'s (whose config is ``theirs``): ``theirs`` when
    this run sets none (``ours`` is None), else ``ours``, which must equal it but for ``ignore``d fields; a mismatch
    is a one-line error naming the differing fields."""
    if ours is None:
        return theirs
    names = [f.name for f in fields(ours) if f.name not in ignore]
    differing = [name for name in names if getattr(ours, name) != getattr(theirs, name)]
    if differing:
        values = ", ".join(f"{name} {getattr(ours, name)!r} (there: {getattr(theirs, name)!r})" for name in differing)
        raise ConfigError(
            f"model.init_args.{option} does not match the network of init_checkpoint {init_checkpoint}: {values}; "
            f"leave {option} out to adopt the checkpoint's"
        )
    return ours


class Stage(L.LightningModule):
    """Base of the stage LightningModules.

    Subclasses set :attr:`stage` ("A", "B", "C") and implement :meth:`trained_networks` (what the optimiser trains
    and the EMA averages: never frozen encoders or metric networks), :meth:`checkpoint_configs` (what the loaders in
    :mod:`lit_wuerstchen.checkpoints` need to rebuild the networks), :meth:`log_images` (named image grids for the
    image logger) and :meth:`evaluation_images` (what evaluation callbacks score).
    """

    stage = ""

    def __init__(self) -> None:
        super().__init__()
        self._frozen: dict[str, tuple[nn.Module, bool]] = {}
        self.register_state_dict_post_hook(_frozen_state_dict_hook)
        self.register_load_state_dict_pre_hook(_frozen_load_state_dict_hook)
        self.skipped_steps = 0  # bad steps skipped so far (kept in the checkpoint record: survives a resume)
        self._last_loss: torch.Tensor | None = None
        # this step's gradient norm from the finiteness check, reused by the clipping (one norm per step, not two)
        self._gradient_norm: torch.Tensor | None = None
        self._logged_counts: dict[str, float] = {}  # last value logged per cumulative counter
        self._lora_base: dict[str, frozenset[str]] = {}  # per LoRA-adapted network: its frozen base's keys
        self._frozen_saved_state: dict[str, dict[str, torch.Tensor]] = {}  # float32 weights of bf16 frozen parts

    # --- frozen parts ---------------------------------------------------------------------------------------------
    def freeze(self, name: str, module: nn.Module, persistent: bool = False) -> nn.Module:
        """Hold a frozen network (an earlier stage, a text encoder, a loss network) as ``self.<name>``.

        It is kept outside the module tree, so it stays out of the optimiser, the EMA, DDP/FSDP wrapping and the
        model summary; it is always in eval mode (its BatchNorm statistics never move) with ``requires_grad``
        off, and moves with the LightningModule (``.to()``, dtype casts). It is in ``state_dict`` (under
        ``<name>.``, loaded back by ``load_state_dict``) only when ``persistent``: for parts that must travel with
        the checkpoint (Stage A inside Stage B, a randomly initialised text encoder inside Stage C).
        """
        module.requires_grad_(False).eval()
        self._frozen[name] = (module, persistent)
        object.__setattr__(self, name, module)  # not nn.Module.__setattr__: no submodule registration
        return module

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {name: module for name, (module, _) in self._frozen.items()}

    def run_frozen_in(self, dtype: torch.dtype) -> None:
        """Cast the frozen parts to ``dtype`` (bf16 under a bf16 precision: half the memory and the fast kernels).
        A persistent part keeps its float32 weights for checkpoints (on the host), so saving never rounds them."""
        for name, (module, persistent) in self._frozen.items():
            if persistent and name not in self._frozen_saved_state:
                self._frozen_saved_state[name] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            module.to(dtype=dtype)
            # Callers also run them outside autocast (callbacks, statistics): each layer takes its inputs in its
            # weights' dtype, so a float32 tensor handed to a bf16 part works anywhere.
            for layer in module.modules():
                if next(layer.parameters(recurse=False), None) is not None and not hasattr(layer, "_casts_inputs"):
                    layer.register_forward_pre_hook(_cast_inputs_to_weights, with_kwargs=True)
                    layer._casts_inputs = True

    def sharded_modules(self) -> list[nn.Module]:
        """What a sharding strategy shards: the direct submodules with parameters (the trained networks, Stage A's
        discriminator); the frozen parts are not submodules."""
        return [module for module in self.children() if next(module.parameters(), None) is not None]

    def configure_model(self) -> None:
        """Once the strategy is set up, before the optimiser is built (for every fit/validate/test/predict): the
        frozen parts run in bf16 under a bf16 precision; a sharding strategy (:class:`lit_wuerstchen.strategies.FSDP`)
        shards the networks; ``compile`` compiles the trained networks (block by block when sharded)."""
        trainer = self._trainer
        if trainer is None:
            return
        if str(trainer.precision).startswith("bf16"):
            self.run_frozen_in(torch.bfloat16)
        shard = getattr(trainer.strategy, "shard_stage", None)
        if shard is not None:
            shard(self.sharded_modules())
        if self.hparams.get("compile", False):
            compile_networks(self.trained_networks().values(), per_block=shard is not None)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for module, _ in self._frozen.values():
            module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for module, _ in self._frozen.values():
            module.eval()
        return self

    # --- what is trained ------------------------------------------------------------------------------------------
    def trained_networks(self) -> dict[str, nn.Module]:
        """The trained networks by attribute name (their ``state_dict`` keys carry that prefix)."""
        raise NotImplementedError

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimiser steps: the trained networks' parameters that need a gradient (all of them, or the
        adapters of a LoRA run)."""
        return [p for network in self.trained_networks().values() for p in network.parameters() if p.requires_grad]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What the EMA averages (and a checkpoint's ``state_dict`` holds of the trained networks), keyed as in
        ``state_dict``: every tensor of the trained networks, less the frozen base of a LoRA-adapted one."""
        return {
            f"{name}.{key}": value
            for name, network in self.trained_networks().items()
            for key, value in network.state_dict().items()
            if key not in self._lora_base.get(name, ())
        }

    def add_lora(self, name: str, settings: LoraSettings) -> None:
        """LoRA adapters into the trained network ``self.<name>`` (:mod:`lit_wuerstchen.lora`): its weights so far
        become the frozen base, which leaves ``state_dict`` (and so checkpoints; it comes back from the stage's
        ``init_checkpoint``); the optimiser and the EMA see only the adapters."""
        network = inject_lora(getattr(self, name), settings)
        self._lora_base[name] = frozenset(key for key in network.state_dict() if not is_adapter_key(key))
        rank_zero_info(f"{describe(settings, network)} in the {name}")

    def store_plain_hparams(self, **configs) -> None:
        """Keep config dataclasses as plain dicts in ``hparams``: checkpoints then load with ``weights_only``."""
        self.hparams.update({name: asdict(config) for name, config in configs.items()})

    def configure_optimizers(self):
        """AdamW over exactly the trained networks, stepped per step (``self.optimizer_config``)."""
        optimizer, scheduler = self.optimizer_config.build(
            self.trained_parameters(), total_steps=self.trainer.max_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.optimizer_config.grad_clip
        algorithm = gradient_clip_algorithm or "norm"
        norm, self._gradient_norm = self._gradient_norm, None
        if not clip:
            return
        if norm is not None and algorithm == "norm":
            # what clip_grad_norm_ does, with the norm on_before_optimizer_step computed over the same parameters
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grads_with_norm_(parameters, clip, norm)
        else:  # fp16 (the scaler must unscale first) or clipping by value: Lightning's way
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)

    # --- divergence -----------------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        if self.automatic_optimization:  # manual optimisation (Stage A) checks before its own steps
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            if not self.gradients_are_finite(parameters):
                for p in parameters:
                    p.grad = None  # AdamW leaves parameters without a gradient alone: the step is skipped
                self._gradient_norm = None

    def gradients_are_finite(self, parameters: list[nn.Parameter]) -> bool:
        """Whether this step's gradients are finite on every rank (one host sync per step: the price of stopping
        at the step that went wrong). A non-finite loss gives non-finite gradients, so it is caught here too.

        A bad step is counted; past ``optimizer.max_skipped_steps`` the run stops with :class:`DivergenceError`
        (before the optimiser touches the weights, so the weights, the EMA and every checkpoint stay finite).
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return True  # fp16: the GradScaler skips steps with inf gradients and lowers its scale by itself
        gradients = [p.grad for p in parameters if p.grad is not None]
        if not gradients:
            return True
        norm = torch.nn.utils.get_total_norm(gradients)
        self._gradient_norm = norm
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(norm)), all=True):
            return True
        self.skipped_steps += 1
        loss = "?" if self._last_loss is None else f"{self._last_loss.item():.6g}"
        what = f"non-finite training at step {self.global_step}: gradient norm {norm.item():.6g}, loss {loss}"
        allowed = self.optimizer_config.max_skipped_steps
        if self.skipped_steps > allowed:
            raise DivergenceError(
                f"diverged: {what} ({self.skipped_steps} bad step(s), optimizer.max_skipped_steps={allowed}); "
                f"no checkpoint was written after it"
            )
        rank_zero_warn(f"{what}: step skipped ({self.skipped_steps} of {allowed} allowed)")
        return False

    def log_training(self, loss: torch.Tensor, batch_size: int) -> None:
        """The per-step training logs every stage writes (host values only: no device sync)."""
        self._last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        # The counters are cumulative: between the steps the logger writes, only a changed value needs logging (so
        # the last value is always the one logged), and each self.log costs about 1 ms on the host (a tenth of a toy
        # step when every counter was logged on every step).
        changed_only = self.global_step % max(1, self.trainer.log_every_n_steps) != 0
        if self._should_log_count("train/skipped_steps", self.skipped_steps, changed_only):
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=batch_size)
        self.log_data_errors("train", changed_only)

    def _should_log_count(self, name: str, value: float, changed_only: bool) -> bool:
        if changed_only and self._logged_counts.get(name) == value:
            return False
        self._logged_counts[name] = value
        return True

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def checkpoint_configs(self) -> dict[str, Any]:
        """The configs (dataclasses or plain values) the checkpoint loaders need to rebuild this stage's networks."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The last line of defence: a checkpoint with a non-finite weight or average is never written.
        for section in ("state_dict", "ema_state_dict"):
            for key, value in checkpoint.get(section, {}).items():
                if value.is_floating_point() and not self._finite(value):
                    raise DivergenceError(
                        f"diverged: {section} entry {key} is non-finite at step {self.global_step}; "
                        f"not writing the checkpoint (the previous one is the last good one)"
                    )
        checkpoint[RECORD] = stage_record(
            self.stage, skipped_steps=self.skipped_steps, rng_states=_gather(rng_states()), **self.checkpoint_configs()
        )

    def _finite(self, value: torch.Tensor) -> bool:
        """Whether every element is finite; a sharded tensor (FSDP) is checked shard by shard on every rank."""
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            local = bool(torch.isfinite(value.to_local()).all())
            return self.trainer.strategy.reduce_boolean_decision(local, all=True)
        return bool(torch.isfinite(value).all())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        record = checkpoint.get(RECORD, {})
        self.skipped_steps = int(record.get("skipped_steps", 0))
        states = record.get("rng_states") or []
        self._rng_to_restore = states[self.global_rank] if self.global_rank < len(states) else None

    def on_train_start(self) -> None:
        # The random streams continue where the checkpoint left them (noise, t, dropout, caption drops: a resumed
        # run draws what the uninterrupted one would have). Restored here, once setup and the sanity check are over.
        if getattr(self, "_rng_to_restore", None) is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # --- images and logging ---------------------------------------------------------------------------------------
    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        return {}

    def evaluation_images(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] that evaluation callbacks (FID, CLIP score, alignment) compare with ``batch``:
        reconstructions of ``batch["image"]`` for Stages A and B, generations from ``batch["caption"]`` for C."""
        raise NotImplementedError

    def log_data_errors(self, split: str, changed_only: bool = False) -> None:
        """Log the skipped-sample counters that the ShardDataModule gathers from its workers (host ints: no sync);
        ``changed_only``: only those that moved since they were last logged."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "error_counts"):
            return
        for name, count in datamodule.error_counts(split).items():
            if not self._should_log_count(f"data/{split}_{name}", count, changed_only):
                continue
            self.log(
                f"data/{split}_{name}",
                float(count),
                on_step=split == "train",
                on_epoch=split != "train",
                reduce_fx="max",
                batch_size=1,
            )

    def training_flops(self, batch: dict) -> int | None:
        """Model FLOPs of one training step on ``batch`` (forward + backward of the trained networks, not the frozen
        parts), for ``perf/tflops_per_sec`` and ``perf/mfu`` (:class:`lit_wuerstchen.callbacks.PerfMonitor` asks
        once); None: not counted."""
        return None


def _cast_inputs_to_weights(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = next(layer.parameters(recurse=False)).dtype

    def cast(value):
        floating = isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype
        return value.to(dtype) if floating else value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def compile_networks(networks, per_block: bool = False) -> None:
    """``torch.compile`` the networks in place (``nn.Module.compile``: parameter names stay as they are, so
    checkpoints do not change). ``per_block``: each block on its own instead (FSDP gathers weights between blocks,
    which a whole-network graph would have to break around)."""
    from ..strategies import blocks_of

    for network in networks:
        for module in (blocks_of(network) or [network]) if per_block else [network]:
            if getattr(module, "_compiled_call_impl", None) is None:  # configure_model runs for every fit/validate
                module.compile()


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
    """``value`` of every rank, in rank order (a collective under DDP: checkpoints are dumped on every rank)."""
    if dist.is_available() and dist.is_initialized():
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def _frozen_state_dict_hook(module: Stage, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, (frozen, persistent) in module._frozen.items():
        if persistent:
            saved = module._frozen_saved_state.get(name) or frozen.state_dict()
            for key, value in saved.items():
                state_dict[f"{prefix}{name}.{key}"] = value
    for name, base in module._lora_base.items():  # a LoRA run saves its adapters, not the base it started from
        for key in base:
            state_dict.pop(f"{prefix}{name}.{key}", None)


def _frozen_load_state_dict_hook(
    module: Stage,
    state_dict: dict,
    prefix: str,
    local_metadata,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Route a persistent frozen part's entries into it (they are not the module tree's, so nn.Module would call them
    unexpected); a persistent part missing from the checkpoint is reported like any missing key."""
    for name, (frozen, persistent) in module._frozen.items():
        head = f"{prefix}{name}."
        own = {key[len(head) :]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(head)]}
        if not persistent:
            unexpected_keys.extend(head + key for key in own)
            continue
        result = frozen.load_state_dict(own, strict=False)
        if name in module._frozen_saved_state:  # a bf16 part: the float32 weights to save are the loaded ones
            module._frozen_saved_state[name].update({k: v.detach().cpu().clone() for k, v in own.items()})
        missing_keys.extend(head + key for key in result.missing_keys)
        unexpected_keys.extend(head + key for key in result.unexpected_keys)
    for name, base in module._lora_base.items():  # an adapter-only state dict: the base stays as it was built
        current = getattr(module, name).state_dict()
        for key in base:
            state_dict.setdefault(f"{prefix}{name}.{key}", current[key])


class DiffusionStage(Stage):
    """The diffusion training step shared by Stages B and C.

    A subclass says only what its network, its clean sample and its conditioning are: :meth:`denoiser` (called as
    ``denoiser(x_t, t, **conditioning)``) and :meth:`diffusion_inputs` (clean samples ``x0`` and the conditioning,
    with the training-time augmentation — caption or semantic-latent dropout — when ``train``).
    """

    def __init__(self, diffusion: DiffusionConfig, validation_sampling: SamplingConfig) -> None:
        super().__init__()
        self.diffusion_config = as_dataclass(DiffusionConfig, diffusion)
        self.sampling_config = as_dataclass(SamplingConfig, validation_sampling)
        self.diffusion = Diffusion(self.diffusion_config)

    def denoiser(self) -> nn.Module:
        raise NotImplementedError

    def diffusion_inputs(self, batch: dict, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # --- the precomputed cache (`data precompute`, lit_wuerstchen.data.cache) -------------------------------------
    cache_keeps_image = False
    """Whether training from the cache still needs the image (Stage B: its compressor is trained on it)."""

    def cache_models(self) -> dict[str, nn.Module]:
        """The frozen models whose outputs the cache holds; their weight fingerprints go into its manifest."""
        raise NotImplementedError

    def cache_entries(self, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        """What the cache stores per sample (``[B, ...]`` tensors), computed from centre-cropped images."""
        raise NotImplementedError

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self.trainer, "datamodule", None)
        manifest = getattr(datamodule, "cache_manifest", None)
        if manifest is not None:  # stale or foreign caches are refused before the first step
            check_models(manifest, datamodule.cache, self.stage, self.cache_models())

    def diffusion_loss(self, batch: dict, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The weighted denoising loss on ``batch``; ``generator`` (on the model's device) fixes t and the noise
        for a comparable validation loss."""
        x0, conditioning = self.diffusion_inputs(batch, train)
        network = self.denoiser()
        return self.diffusion.loss(lambda x_t, t: network(x_t, t, **conditioning), x0, generator)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, train=True)
        self.log_training(loss, len(batch["key"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The same t and noise for a batch at every validation: the loss curve shows the model, not the draw.
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self.diffusion_loss(batch, train=False, generator=generator)
        self.log("val/loss", loss, batch_size=len(batch["key"]), sync_dist=True)
        self.validation_samples(batch, generator)

    def validation_samples(self, batch: dict, generator: torch.Generator) -> None:
        """Stage-specific validation after the loss (e.g. Stage B's reconstruction metrics); none by default."""

    def on_validation_epoch_end(self) -> None:
        self.log_data_errors("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
