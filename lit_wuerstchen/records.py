"""The ``lit_wuerstchen`` record of a stage checkpoint: one typed, versioned dataclass per stage.

A stage checkpoint is Lightning's usual dict plus ``checkpoint["lit_wuerstchen"]``: the record of its stage, which
holds what the loaders need to rebuild its networks (the configs) and what a resumed run needs beyond Lightning's own
state (:class:`TrainingState`). Training (``Stage.on_save_checkpoint``) and ``convert`` write it through the same
classes (:meth:`StageRecord.to_dict`); every loader reads it through :func:`record_from_dict`, with the strict config
reader (:func:`config_from_dict`: an unknown or missing key is a one-line :class:`CheckpointError`, never silently
dropped).

Versions: :data:`FORMAT` is written. Format 1 (lit_wuerstchen before the typed records: ``skipped_steps`` and
``rng_states`` at the top level) is upgraded on load; any other format is refused in one line that names the fix.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .diffusion import DiffusionConfig, SamplingConfig
from .errors import CheckpointError, first_line
from .lora import LoraSettings
from .models.compressor import CompressorConfig
from .models.diffnext import DiffNeXtConfig
from .models.prior import PriorConfig
from .models.text_encoder import TextEncoderConfig
from .models.vqgan import VQGANConfig

FORMAT = 2
RECORD_KEY = "lit_wuerstchen"
STAGE_NAMES = {"A": "Stage A", "B": "Stage B", "C": "Stage C"}


def config_from_dict(cls: type, data: Any, source: str | os.PathLike, where: str = "") -> Any:
    """A config dataclass (nested ones included) from its ``asdict`` form; unknown or missing keys are one line."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: {where} should be a mapping, found {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(f"{source}: unknown {where} setting(s) {unknown} (written by a newer lit_wuerstchen?)")
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise CheckpointError(f"{source}: {where} lacks the required setting(s) {missing}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if not dataclasses.is_dataclass(hint):  # an optional config (``Config | None``) is its dataclass or None
            options = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
            hint = options[0] if len(options) == 1 and value is not None else hint
        nested = dataclasses.is_dataclass(hint)
        values[name] = config_from_dict(hint, value, source, f"{where}.{name}") if nested else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: invalid {where}: {first_line(error)}") from None


@dataclass(kw_only=True)
class TrainingState:
    """What a resumed run needs beyond Lightning's loop state."""

    skipped_steps: int = 0
    """Optimiser steps the divergence guard skipped (non-finite gradients) so far."""
    rng_states: list[Any] = field(default_factory=list)
    """The random generators' states of every global rank (:func:`lit_wuerstchen.stages.parts.rng_states`)."""


@dataclass(kw_only=True)
class StageRecord:
    """What every stage's record holds; a subclass per stage adds its configs."""

    STAGE: ClassVar[str]
    training: TrainingState = field(default_factory=TrainingState)
    init_checkpoint: str | None = None
    """The checkpoint training started from (a LoRA run's adapters adapt its networks)."""
    lora: LoraSettings | None = None
    """Set (rank > 0) when the checkpoint's ``state_dict`` holds LoRA adapters only, not full weights."""
    converted_from: str | None = None
    """The released weights ``convert`` made this checkpoint from."""

    @property
    def adapters(self) -> LoraSettings | None:
        """The LoRA settings when the checkpoint holds adapters only (None: full weights)."""
        return self.lora if self.lora is not None and self.lora.enabled else None

    def to_dict(self) -> dict[str, Any]:
        """The plain form stored in the checkpoint (configs as dicts; the RNG states' tensors as they are)."""
        data: dict[str, Any] = {"format": FORMAT, "stage": self.STAGE}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TrainingState):  # not ``asdict``: it would deep-copy every rank's RNG tensors
                value = {"skipped_steps": value.skipped_steps, "rng_states": value.rng_states}
            data[f.name] = asdict(value) if dataclasses.is_dataclass(value) else value
        return data


@dataclass(kw_only=True)
class StageARecord(StageRecord):
    STAGE: ClassVar[str] = "A"
    vqgan: VQGANConfig


@dataclass(kw_only=True)
class DiffusionStageRecord(StageRecord):
    """Stages B and C: their diffusion (training) and validation sampling settings."""

    diffusion: DiffusionConfig
    sampling: SamplingConfig


@dataclass(kw_only=True)
class StageBRecord(DiffusionStageRecord):
    STAGE: ClassVar[str] = "B"
    decoder: DiffNeXtConfig
    compressor: CompressorConfig
    compression: float
    stage_a: VQGANConfig
    """The frozen Stage A, whose weights travel in the checkpoint under ``stage_a.``."""
    text_encoder: TextEncoderConfig | None = None
    """The frozen text encoder of a text-conditioned decoder (a random-init one travels under ``text_encoder.``)."""


@dataclass(kw_only=True)
class StageCRecord(DiffusionStageRecord):
    STAGE: ClassVar[str] = "C"
    prior: PriorConfig
    text_encoder: TextEncoderConfig
    """The frozen text encoder (a random-init one travels under ``text_encoder.``)."""
    stage_b_checkpoint: str
    decoder_sampling: SamplingConfig
    image_size: list[int] | None = None
    """The (height, width) training saw, the sampling default."""


RECORDS: dict[str, type[StageRecord]] = {cls.STAGE: cls for cls in (StageARecord, StageBRecord, StageCRecord)}


def _upgrade_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: the resume state moved from the top level into ``training``."""
    data = dict(data)
    training = {key: data.pop(key) for key in ("skipped_steps", "rng_states") if key in data}
    return {**data, "format": 2, "training": training}


UPGRADES = {1: _upgrade_format_1}


def record_from_dict(data: Any, source: str | os.PathLike) -> StageRecord:
    """The typed record of a checkpoint's ``lit_wuerstchen`` entry (older formats upgraded); anything else is one
    line naming the file."""
    if not isinstance(data, dict) or "stage" not in data:
        raise CheckpointError(f"{source} has no lit_wuerstchen record: not a stage checkpoint")
    version = data.get("format")
    while version in UPGRADES:
        data = UPGRADES[version](data)
        version = data["format"]
    if version != FORMAT:
        newer = isinstance(version, int) and version > FORMAT
        fix = "upgrade lit_wuerstchen to read it" if newer else "convert or retrain it with this version"
        raise CheckpointError(f"{source} has checkpoint format {version!r}, this version reads {FORMAT}: {fix}")
    cls = RECORDS.get(data["stage"])
    if cls is None:
        raise CheckpointError(f"{source} names an unknown stage {data['stage']!r} (expected one of {list(RECORDS)})")
    body = {key: value for key, value in data.items() if key not in ("format", "stage")}
    return config_from_dict(cls, body, source, f"{STAGE_NAMES[cls.STAGE]} record")
