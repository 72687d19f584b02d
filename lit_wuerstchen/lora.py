"""LoRA adapters on the Stage B decoder and the Stage C prior, through peft (docs/finetune.md).

peft (the optional ``interop`` extra) does the work: :func:`inject_lora` puts its ``LoraConfig``'s adapters into a
network in place (``inject_adapter_in_model``: base weights frozen, only the ``lora_A`` / ``lora_B`` weights
trainable), :func:`merge_lora` rebuilds a trained adapter on a base network and folds it into the base weights
(``LoraModel.merge_and_unload``), so a sampled or exported pipeline holds plain networks. peft is imported only when an
adapter is made or merged.

Adapter tensors keep peft's names inside the network (``blocks.2.attention.to_q.lora_A.default.weight``); everything
else in an adapted network's ``state_dict`` (``...to_q.base_layer.weight``, the untargeted layers) is the frozen base.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import CheckpointError, ConfigError

ADAPTER = "default"  # peft's adapter name: one adapter per network
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out", "mlp.0", "mlp.4", "cond_mapper.1", "mapper"]
"""Attention projections (``Attention.to_q/k/v/out``), the ResBlock MLP linears (``mlp.0``, ``mlp.4``), the attention
blocks' text mapping (``cond_mapper.1``) and the TimestepBlock FiLM (``mapper``), in ``models/blocks.py``; in a DiT
prior (``architecture: dit``) its attention projections and MLP linears (the same names)."""


@dataclass
class LoraSettings:
    """LoRA on a stage's network (``model.init_args.lora``); ``rank: 0`` is off.

    ``targets`` are module names as peft's ``target_modules`` matches them: a module is adapted when its name is a
    target or ends with ``.<target>``. The adapter's update is scaled by ``alpha / rank`` (``alpha: null`` = rank,
    scale 1); ``dropout`` is applied to the adapter's input in training.
    """

    rank: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = off), got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive or null (= rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty: name the modules to adapt")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def peft_config(self):
        """peft's ``LoraConfig`` for these settings (biases stay frozen)."""
        try:
            from peft import LoraConfig
        except ImportError:
            raise ConfigError("LoRA needs peft: pip install 'lit_wuerstchen[interop]'") from None
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha if self.alpha is not None else self.rank,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            bias="none",
        )


def is_adapter_key(key: str) -> bool:
    """Whether a ``state_dict`` key of an adapted network is an adapter tensor (not the frozen base)."""
    return any(part.startswith("lora_") for part in key.split("."))


def inject_lora(network: nn.Module, settings: LoraSettings) -> nn.Module:
    """Adapters into ``network``, in place (peft's ``inject_adapter_in_model``): afterwards only the adapter weights
    have ``requires_grad``. A target list that matches nothing is a one-line error."""
    config = settings.peft_config()
    from peft import inject_adapter_in_model

    try:
        return inject_adapter_in_model(config, network, adapter_name=ADAPTER)
    except ValueError as error:  # e.g. "Target modules {...} not found in the base model"
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"lora.targets {settings.targets} on {type(network).__name__}: {text}") from None


def parameter_counts(network: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters of ``network``."""
    parameters = list(network.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def describe(settings: LoraSettings, network: nn.Module) -> str:
    """E.g. "LoRA rank 8: 1,234,567 trainable of 993,636,896 parameters (0.12%)"."""
    trainable, total = parameter_counts(network)
    return (
        f"LoRA rank {settings.rank}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.2f}%)"
    )


def adapter_weights(network: nn.Module) -> dict:
    """The adapter tensors of an adapted network (its ``state_dict`` keys)."""
    return {key: value for key, value in network.state_dict().items() if is_adapter_key(key)}


def merge_lora(network: nn.Module, adapter_state: dict, settings: LoraSettings, source: str = "") -> nn.Module:
    """``network`` (the plain base, with its weights) with the trained adapter ``adapter_state`` (keys as in an
    adapted network's ``state_dict``) folded into its weights: a plain network again, of the same class and keys.

    The adapter must fit these settings and this network exactly (every adapter tensor present, none left over);
    anything else is a one-line :class:`CheckpointError` naming ``source``.
    """
    config = settings.peft_config()
    from peft import LoraModel

    source = source or "the adapter weights"
    requires_grad = {name: p.requires_grad for name, p in network.named_parameters()}
    tuner = LoraModel(network, config, ADAPTER)  # (freezes the base: restored below)
    expected = {key for key in network.state_dict() if is_adapter_key(key)}
    missing, unexpected = sorted(expected - set(adapter_state)), sorted(set(adapter_state) - expected)
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]!r})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})"] if unexpected else []
        raise CheckpointError(f"{source}: the LoRA adapter does not fit its base network: {', '.join(parts)} tensors")
    try:
        network.load_state_dict(adapter_state, strict=False)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
        raise CheckpointError(f"{source}: the LoRA adapter does not fit its base network: {detail}") from None
    merged = tuner.merge_and_unload(safe_merge=True)
    for name, parameter in merged.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    return merged
