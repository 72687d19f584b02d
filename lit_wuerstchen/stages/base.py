"""What every stage's LightningModule shares (:class:`Stage`: the optimiser, the EMA contract, the checkpoint record,
data-health logging, composed with the parts of :mod:`.parts`), and the one diffusion training step of Stages B and C
(:class:`DiffusionStage`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..data.cache import check_models
from ..diffusion import Diffusion, DiffusionConfig, SamplingConfig
from ..errors import ConfigError
from ..lora import LoraSettings, describe, inject_lora, is_adapter_key
from ..records import RECORD_KEY, StageRecord, TrainingState, record_from_dict
from ..strategies import blocks_of, is_sharded
from .parts import DivergenceGuard, FrozenParts, RandomStreams


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
    fused: bool | None = None
    """torch's fused AdamW kernel (one kernel over all parameters). None: fused where every parameter is on a CUDA
    device, else torch's default (foreach on CUDA, a per-tensor loop on the CPU). Not the CPU default: there the
    fused kernel rounds differently from the loop (not bit-identical; docs/benchmarks.md "AdamW: fused vs
    default"). True where torch has no fused kernel for the parameters' device is a one-line error."""

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

    def use_fused(self, parameters: list[torch.Tensor], scaled_gradients: bool = False) -> bool:
        """Whether :meth:`build` makes the fused AdamW for ``parameters`` (see :attr:`fused`). ``scaled_gradients``:
        a GradScaler (``16-mixed``) scales them, which a fused AdamW unscales inside its step, too late for
        Lightning's gradient clipping: not fused by default, and an error when asked for with clipping."""
        devices = sorted({p.device.type for p in parameters})
        if self.fused is None:
            return devices == ["cuda"] and not scaled_gradients
        if self.fused and scaled_gradients and self.grad_clip:
            raise ConfigError(
                "optimizer.fused: true with a GradScaler (precision 16-mixed) cannot clip gradients (the fused step "
                "unscales them itself); use precision bf16-mixed, optimizer.fused: null or optimizer.grad_clip: null"
            )
        if self.fused:
            from torch.optim.optimizer import _get_fused_kernels_supported_devices

            supported = _get_fused_kernels_supported_devices()
            unsupported = [d for d in devices if d not in supported]
            if unsupported or not all(torch.is_floating_point(p) for p in parameters):
                what = f"{', '.join(unsupported)} parameters" if unsupported else "non-floating-point parameters"
                raise ConfigError(
                    f"optimizer.fused: true, but torch {torch.__version__} has no fused AdamW for {what} (it has "
                    f"one for {', '.join(supported)}); set optimizer.fused: null (fused where available) or false"
                )
        return self.fused

    def build(
        self, parameters, lr: float | None = None, total_steps: int | None = None, scaled_gradients: bool = False
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW and its per-step scheduler; ``total_steps`` (trainer.max_steps) is needed for cosine decay;
        ``scaled_gradients``: see :meth:`use_fused`."""
        if self.decay == "cosine" and (total_steps is None or total_steps <= 0):
            raise ValueError("optimizer.decay: cosine needs trainer.max_steps to be set")
        parameters = list(parameters)
        # Not fused: no `fused=False` to torch, which would also turn its foreach default off (a slow loop on CUDA).
        fused = {"fused": True} if self.use_fused(parameters, scaled_gradients) else {}
        optimizer = torch.optim.AdamW(
            parameters, lr=lr or self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay, **fused
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
    and the EMA averages: never frozen encoders or metric networks), :meth:`checkpoint_record` (what the loaders in
    :mod:`lit_wuerstchen.checkpoints` need to rebuild the networks), :meth:`log_images` (named image grids for the
    image logger) and :meth:`evaluation_images` (what evaluation callbacks score).
    """

    stage = ""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = FrozenParts()
        self.divergence = DivergenceGuard()
        self.random_streams = RandomStreams()
        self.register_state_dict_post_hook(_state_dict_hook)
        self.register_load_state_dict_pre_hook(_load_state_dict_hook)
        self._logged_counts: dict[str, float] = {}  # last value logged per cumulative counter
        self._lora_base: dict[str, frozenset[str]] = {}  # per LoRA-adapted network: its frozen base's keys

    @property
    def skipped_steps(self) -> int:
        """Bad steps the divergence guard skipped so far (this run and the runs it resumes)."""
        return self.divergence.skipped_steps

    # --- frozen parts ---------------------------------------------------------------------------------------------
    def freeze(self, name: str, module: nn.Module, persistent: bool = False) -> nn.Module:
        """Hold a frozen network (an earlier stage, a text encoder, a loss network) as ``self.<name>``.

        It is kept outside the module tree, so it stays out of the optimiser, the EMA, DDP/FSDP wrapping and the
        model summary; it is always in eval mode (its BatchNorm statistics never move) with ``requires_grad``
        off, and moves with the LightningModule (``.to()``, dtype casts). It is in ``state_dict`` (under
        ``<name>.``, loaded back by ``load_state_dict``) only when ``persistent``: for parts that must travel with
        the checkpoint (Stage A inside Stage B, a randomly initialised text encoder inside Stage C).
        """
        self.frozen.add(name, module, persistent)
        object.__setattr__(self, name, module)  # not nn.Module.__setattr__: no submodule registration
        return module

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self.frozen.modules()

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
        if str(trainer.precision).startswith("bf16"):  # half the memory and the fast kernels
            self.frozen.run_in(torch.bfloat16)
        sharded = is_sharded(trainer)
        if sharded:
            trainer.strategy.shard_stage(self.sharded_modules())
        if self.hparams.get("compile", False):
            compile_networks(self.trained_networks().values(), per_block=sharded)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.frozen.apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
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

    @property
    def scaled_gradients(self) -> bool:
        """Whether a GradScaler scales the gradients (precision ``16-mixed``)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def configure_optimizers(self):
        """AdamW over exactly the trained networks, stepped per step (``self.optimizer_config``)."""
        optimizer, scheduler = self.optimizer_config.build(
            self.trained_parameters(),
            total_steps=self.trainer.max_steps,
            scaled_gradients=self.scaled_gradients,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.optimizer_config.grad_clip
        algorithm = gradient_clip_algorithm or "norm"
        norm = self.divergence.take_norm()
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

    def gradients_are_finite(self, parameters: list[nn.Parameter]) -> bool:
        """Whether this step's gradients are finite on every rank (:class:`DivergenceGuard`; past
        ``optimizer.max_skipped_steps`` bad steps the run stops with a :class:`DivergenceError`)."""
        if self.scaled_gradients:
            return True  # fp16: the GradScaler skips steps with inf gradients and lowers its scale by itself
        allowed = self.optimizer_config.max_skipped_steps
        return self.divergence.gradients_finite(parameters, self.trainer.strategy, self.global_step, allowed)

    def log_training(self, loss: torch.Tensor, batch_size: int) -> None:
        """The per-step training logs every stage writes (host values only: no device sync)."""
        self.divergence.last_loss = loss.detach()
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
    def checkpoint_record(self) -> StageRecord:
        """What the loaders need to rebuild this stage's networks (:mod:`lit_wuerstchen.records`); the training state
        is added by :meth:`on_save_checkpoint`."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.divergence.check_checkpoint(checkpoint, self.trainer.strategy, self.global_step)
        record = self.checkpoint_record()
        record.training = TrainingState(skipped_steps=self.skipped_steps, rng_states=self.random_streams.capture())
        checkpoint[RECORD_KEY] = record.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        source = getattr(self._trainer, "ckpt_path", None) or "the checkpoint being loaded"
        self.restore_from_record(record_from_dict(checkpoint.get(RECORD_KEY), source))

    def restore_from_record(self, record: StageRecord) -> None:
        """What a resumed run takes back from its checkpoint's record (a subclass adds its own)."""
        self.divergence.skipped_steps = record.training.skipped_steps
        self.random_streams.restore_later(record.training.rng_states, self.global_rank)

    def on_train_start(self) -> None:
        self.random_streams.restore()

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


def compile_networks(networks, per_block: bool = False) -> None:
    """``torch.compile`` the networks in place (``nn.Module.compile``: parameter names stay as they are, so
    checkpoints do not change). ``per_block``: each block on its own instead (FSDP gathers weights between blocks,
    which a whole-network graph would have to break around)."""
    for network in networks:
        for module in (blocks_of(network) or [network]) if per_block else [network]:
            if getattr(module, "_compiled_call_impl", None) is None:  # configure_model runs for every fit/validate
                module.compile()


def _state_dict_hook(module: Stage, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    module.frozen.save_into(state_dict, prefix)
    for name, base in module._lora_base.items():  # a LoRA run saves its adapters, not the base it started from
        for key in base:
            state_dict.pop(f"{prefix}{name}.{key}", None)


def _load_state_dict_hook(
    module: Stage,
    state_dict: dict,
    prefix: str,
    local_metadata,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    module.frozen.load_from(state_dict, prefix, missing_keys, unexpected_keys)
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
