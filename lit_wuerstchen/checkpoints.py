"""Every load of network weights goes through here: Lightning checkpoints of the three stages, exported pipeline
folders (safetensors + ``pipeline.json``), local weight files of pretrained parts (text tower, ImageNet backbones).

Files are read on the CPU with ``torch.load(..., weights_only=True)`` (or safetensors): a checkpoint can carry
tensors and plain Python values, never code. A file that cannot be used raises :class:`CheckpointError` with one
line that names the file and says what was found against what was expected ("... is a Stage A checkpoint; Stage C
needs a Stage B checkpoint"), never a bare ``EOFError`` or a dump of state-dict keys.

Layout of a stage checkpoint: Lightning's usual dict plus its typed record under ``checkpoint["lit_wuerstchen"]``
(:mod:`lit_wuerstchen.records`: one dataclass per stage, versioned). The trained networks' weights are under their
attribute names in ``state_dict`` (``vqgan.``, ``decoder.``/``compressor.``, ``prior.``) and, when the EMA callback
ran, under the same keys in ``ema_state_dict``; frozen parts that must travel with a checkpoint (Stage A inside Stage
B, a randomly initialised text encoder inside Stage B or C) are in ``state_dict`` under theirs. A LoRA run's checkpoint
(``record.lora`` with a rank > 0) holds only the adapters of its adapted network under that network's prefix and names
its base in ``record.init_checkpoint``; the loaders build the base, merge the adapters into it and return plain
networks (:mod:`lit_wuerstchen.lora`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip.model
import safetensors
import safetensors.torch
import torch
import torchvision
from torch import nn

from .diffusion import DiffusionConfig, SamplingConfig
from .errors import CheckpointError, first_line
from .files import current_umask, replaced_folder
from .generation import PipelineConfig, WuerstchenPipeline
from .lora import merge_lora
from .models.compressor import CompressorConfig, SemanticCompressor
from .models.diffnext import DiffNeXt
from .models.image_encoder import ImageEncoder, ImageEncoderConfig
from .models.prior import Prior
from .models.text_encoder import TextEncoder, TextEncoderConfig
from .models.vqgan import VQGAN
from .offline import resolve_open_clip_model, torchvision_weights_file
from .records import (
    RECORD_KEY,
    STAGE_NAMES,
    StageBRecord,
    StageCRecord,
    StageRecord,
    config_from_dict,
    record_from_dict,
)
from .strategies import METADATA_FILE, is_sharded_checkpoint, read_sharded

EXPORT_CONFIG = "pipeline.json"
EXPORT_PARTS = ("text_encoder", "prior", "decoder", "stage_a")


# --- reading files ------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The dict of a ``torch.save`` file, loaded on the CPU with ``weights_only=True``."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _read_sharded_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}" + (" (a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted write?")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects that are not loaded for safety (weights_only): {first_line(error)}"
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {first_line(error)}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint folder of an FSDP run, read whole into memory (``strategies.read_sharded``)."""
    try:
        return read_sharded(path)
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable sharded checkpoint (incomplete?): {first_line(error)}"
        ) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: ``.safetensors``, or a torch file holding a state dict (or a dict with one under
    ``state_dict``)."""
    path = Path(path)
    if str(path).endswith(".safetensors"):
        if not path.is_file():
            raise CheckpointError(f"no weights file at {path}")
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {first_line(error)}") from None
    try:
        state = read_checkpoint(path, mmap=True)
    except CheckpointError:  # the legacy (non-zip) torch format cannot be memory-mapped
        state = read_checkpoint(path)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike, what: str) -> None:
    """``module.load_state_dict(state)`` (strict); a mismatch is one line, not a key dump."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of other shapes
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), first_line(error))
        raise CheckpointError(f"{source}: the {what} weights do not match its config: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]!r})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]!r})")
        raise CheckpointError(f"{source}: the {what} weights do not match its config: {', '.join(parts)} tensors")


# --- stage checkpoints --------------------------------------------------------------------------------------------
def read_stage_checkpoint(
    path: str | os.PathLike, stage: str, needed_by: str = "", metadata_only: bool = False
) -> tuple[dict, StageRecord]:
    """``(checkpoint, record)`` of a ``stage`` ("A", "B", "C") checkpoint, the record typed
    (:mod:`lit_wuerstchen.records`: a :class:`StageARecord`, ...); anything else is a one-line error.
    ``metadata_only``: a sharded folder's tensors are not read (the record, step and loop states are)."""
    wanted = STAGE_NAMES[stage]
    purpose = f"{needed_by} needs a {wanted} checkpoint" if needed_by else f"expected a {wanted} checkpoint"
    if not (Path(path).is_file() or is_sharded_checkpoint(path)):
        raise CheckpointError(f"{wanted} checkpoint not found: {path} ({purpose}; train it first or fix the path)")
    try:  # memory-mapped: reading the record of a large checkpoint costs little
        if metadata_only and is_sharded_checkpoint(path):
            checkpoint = read_checkpoint(Path(path) / METADATA_FILE)
        else:
            checkpoint = read_checkpoint(path, mmap=True)
    except CheckpointError:
        checkpoint = read_checkpoint(path)  # the legacy (non-zip) torch format cannot be memory-mapped
    raw = checkpoint.get(RECORD_KEY)
    if not isinstance(raw, dict) or "stage" not in raw:
        found = "a weights file" if "state_dict" not in checkpoint else "a checkpoint"
        raise CheckpointError(f"{path} is {found} without a lit_wuerstchen record, not a stage checkpoint; {purpose}")
    if raw["stage"] != stage:
        found = STAGE_NAMES.get(raw["stage"], repr(raw["stage"]))
        raise CheckpointError(f"{path} is a {found} checkpoint; {purpose}")
    return checkpoint, record_from_dict(raw, path)


def network_weights(checkpoint: dict, prefix: str, use_ema: bool, source: str | os.PathLike) -> dict:
    """The weights of the network stored under ``prefix`` (its attribute name): the EMA average when ``use_ema`` and
    the checkpoint has one, else the trained (or frozen) weights."""
    weights = checkpoint.get("ema_state_dict") if use_ema else None
    if weights is None or not any(k.startswith(prefix + ".") for k in weights):
        weights = checkpoint.get("state_dict", {})
    state = {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    if not state:
        raise CheckpointError(f"{source} holds no {prefix} weights")
    return state


def load_stage_a(path: str | os.PathLike, use_ema: bool = True, needed_by: str = "") -> VQGAN:
    """The VQGAN of a Stage A checkpoint, in eval mode (EMA weights when present)."""
    checkpoint, record = read_stage_checkpoint(path, "A", needed_by)
    vqgan = VQGAN(record.vqgan)
    load_weights(vqgan, network_weights(checkpoint, "vqgan", use_ema, path), path, "Stage A")
    return vqgan.eval()


@dataclass
class StageBParts:
    """What a Stage B checkpoint holds, built: the decoder, the compressor and the frozen Stage A (eval mode),
    and the settings Stage C and sampling need."""

    decoder: DiffNeXt
    compressor: SemanticCompressor
    stage_a: VQGAN
    compression: float
    diffusion: DiffusionConfig
    sampling: SamplingConfig
    text_encoder: TextEncoder | None = None
    """The frozen text encoder of a text-conditioned decoder (None without text conditioning)."""


def load_stage_b(path: str | os.PathLike, use_ema: bool = True, needed_by: str = "") -> StageBParts:
    """The networks of a Stage B checkpoint (EMA weights of decoder and compressor when present)."""
    checkpoint, record = read_stage_checkpoint(path, "B", needed_by)
    decoder, compressor = _stage_b_networks(checkpoint, record, path, use_ema)
    stage_a = VQGAN(record.stage_a)
    load_weights(stage_a, network_weights(checkpoint, "stage_a", False, path), path, "Stage A")
    text_encoder = None
    if record.text_encoder is not None:
        text_encoder = _checkpoint_text_encoder(checkpoint, record.text_encoder, path)
    return StageBParts(
        decoder.eval(),
        compressor.eval(),
        stage_a.eval(),
        float(record.compression),
        record.diffusion,
        record.sampling,
        text_encoder,
    )


def _checkpoint_text_encoder(checkpoint: dict, config: TextEncoderConfig, path: str | os.PathLike) -> TextEncoder:
    """The frozen text encoder of a Stage B or C checkpoint, in eval mode: a randomly initialised one travels in its
    ``state_dict``; a pretrained one is loaded from the weights its config names."""
    if not config.random_init:
        return load_text_encoder(config).eval()
    text_encoder = TextEncoder(config)
    load_weights(text_encoder, network_weights(checkpoint, "text_encoder", False, path), path, "text encoder")
    return text_encoder.eval()


def load_stage_b_networks(
    path: str | os.PathLike, use_ema: bool = True, needed_by: str = ""
) -> tuple[DiffNeXt, SemanticCompressor]:
    """The trained networks of a Stage B checkpoint, decoder and compressor in eval mode (EMA weights when present; a
    LoRA checkpoint's adapters merged into its base's decoder), without its frozen parts."""
    checkpoint, record = read_stage_checkpoint(path, "B", needed_by)
    return _stage_b_networks(checkpoint, record, path, use_ema)


def _stage_b_networks(
    checkpoint: dict, record: StageBRecord, path: str | os.PathLike, use_ema: bool
) -> tuple[DiffNeXt, SemanticCompressor]:
    compressor_config = dataclasses.replace(record.compressor, pretrained=False)  # its weights are in the checkpoint
    decoder_config = record.decoder
    compressor = SemanticCompressor(compressor_config, record.compression)
    lora = record.adapters
    if lora is None:
        decoder = DiffNeXt(decoder_config)
        load_weights(decoder, network_weights(checkpoint, "decoder", use_ema, path), path, "Stage B decoder")
        load_weights(compressor, network_weights(checkpoint, "compressor", use_ema, path), path, "compressor")
    else:  # adapters on the base's decoder, merged; the compressor stayed frozen: the base's
        base = lora_base(record, path)
        base_decoder, base_compressor = load_stage_b_networks(base, needed_by=f"the LoRA checkpoint {path}")
        _check_base_config(base_decoder.config, decoder_config, path, "decoder")
        load_weights(compressor, base_compressor.state_dict(), base, "compressor")
        adapter = network_weights(checkpoint, "decoder", use_ema, path)
        decoder = merge_lora(base_decoder, adapter, lora, f"{path} (decoder)")
    return decoder.eval(), compressor.eval()


def load_prior(path: str | os.PathLike, use_ema: bool = True, needed_by: str = "") -> Prior:
    """The prior of a Stage C checkpoint, in eval mode (EMA weights when present; a LoRA checkpoint's adapters merged
    into its base's prior)."""
    checkpoint, record = read_stage_checkpoint(path, "C", needed_by)
    return _stage_c_prior(checkpoint, record, path, use_ema)


def _stage_c_prior(checkpoint: dict, record: StageCRecord, path: str | os.PathLike, use_ema: bool) -> Prior:
    config = record.prior
    weights = network_weights(checkpoint, "prior", use_ema, path)
    lora = record.adapters
    if lora is None:
        prior = Prior(config)
        load_weights(prior, weights, path, "Stage C prior")
        return prior.eval()
    base = load_prior(lora_base(record, path), needed_by=f"the LoRA checkpoint {path}")
    _check_base_config(base.config, config, path, "prior")
    return merge_lora(base, weights, lora, f"{path} (prior)").eval()


# --- LoRA checkpoints (lit_wuerstchen.lora, docs/finetune.md) ------------------------------------------------------
def lora_base(record: StageRecord, path: str | os.PathLike) -> str:
    """The checkpoint a LoRA checkpoint's adapters were trained on (its ``init_checkpoint``; always its EMA
    weights, as training started from them)."""
    base = record.init_checkpoint
    if not base:
        raise CheckpointError(f"{path} holds LoRA adapters but names no init_checkpoint (the weights they adapt)")
    return str(base)


def _check_base_config(base: Any, ours: Any, path: str | os.PathLike, what: str) -> None:
    if base != ours:
        differing = [f.name for f in dataclasses.fields(ours) if getattr(ours, f.name) != getattr(base, f.name)]
        raise CheckpointError(
            f"{path}: its {what} config differs from that of its init_checkpoint {differing} (the base changed?)"
        )


# --- pretrained parts ---------------------------------------------------------------------------------------------
def load_torchvision_weights(weights: Any) -> dict[str, torch.Tensor]:
    """State dict of a torchvision ``WeightsEnum`` member from torch's hub cache (offline-aware, see
    :func:`lit_wuerstchen.offline.torchvision_weights_file`)."""
    return read_state_dict(torchvision_weights_file(weights))


def build_compressor(config: CompressorConfig, compression: float) -> SemanticCompressor:
    """The semantic compressor, from torchvision's ImageNet weights when ``config.pretrained``."""
    compressor = SemanticCompressor(config, compression)
    if config.pretrained:
        weights = torchvision.models.get_model_weights(config.backbone).IMAGENET1K_V1
        state = {
            k.removeprefix("features."): v
            for k, v in load_torchvision_weights(weights).items()
            if k.startswith("features.")
        }
        load_weights(compressor.backbone, state, torchvision_weights_file(weights), config.backbone)
    return compressor


RANDOM_TEXT_ENCODER_SEED = 0
_TEXT_PREFIXES = ("", "text.", "module.", "module.text.", "model.", "model.text.")


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Random weights (toy runs) drawn from a fixed seed, not from the caller's random state: every process that
    builds the same config (a fit, a resumed fit, ``data precompute``) gets the same network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """The text encoder with the weights its config names (``weights_file``, else the ``pretrained`` tag from the
    local cache; neither: random). A missing file fails before the tower is built."""
    _, weights_file = resolve_open_clip_model(
        config.model_name, config.pretrained, config.weights_file, config.model_config_file
    )
    if weights_file is None:
        return _seeded(lambda: TextEncoder(config), RANDOM_TEXT_ENCODER_SEED)
    encoder = TextEncoder(config)
    keys = set(encoder.text.state_dict())
    state = {}
    for key, value in read_state_dict(weights_file).items():  # a full CLIP file: keep the text tower's tensors
        name = next((key[len(p) :] for p in _TEXT_PREFIXES if key.startswith(p) and key[len(p) :] in keys), None)
        if name is not None:
            state[name] = value
    if not state:
        raise CheckpointError(f"{weights_file} holds no text-tower weights for {config.model_name!r}")
    try:  # open_clip interpolates another context length; another width it refuses with a bare assert
        open_clip.model.resize_text_pos_embed(state, encoder.text)
    except AssertionError as error:
        raise CheckpointError(
            f"{weights_file}: the {config.model_name} text tower weights do not match its config ({error or 'shape'})"
        ) from None
    load_weights(encoder.text, state, weights_file, f"{config.model_name} text tower")
    return encoder


RANDOM_IMAGE_ENCODER_SEED = 0
# a full open_clip CLIP file shares key names between its towers ("transformer.*"): the "visual." prefixes go first
_VISION_PREFIXES = ("visual.", "module.visual.", "model.visual.", "", "module.", "model.")


def load_image_encoder(config: ImageEncoderConfig) -> ImageEncoder:
    """The image encoder with the weights its config names (``weights_file``, else the ``pretrained`` tag from the
    local cache; neither: random, from a fixed seed). A missing file fails before the tower is built; a file without
    vision-tower weights, or with other shapes, is a one-line :class:`CheckpointError`."""
    _, weights_file = resolve_open_clip_model(
        config.model_name, config.pretrained, config.weights_file, config.model_config_file
    )
    if weights_file is None:
        return _seeded(lambda: ImageEncoder(config), RANDOM_IMAGE_ENCODER_SEED)
    encoder = ImageEncoder(config)
    what = f"{config.model_name} vision tower"
    raw = read_state_dict(weights_file)
    if any(key.startswith("vision_model.") for key in raw):  # transformers' layout (the released image_encoder/)
        from .interop.clip_text import vision_from_transformers_state_dict

        try:
            state = vision_from_transformers_state_dict(raw, encoder.visual, str(weights_file))
        except ValueError as error:  # its message names the file and the key
            raise CheckpointError(str(error)) from None
    else:
        keys = set(encoder.visual.state_dict())
        state = {}
        for prefix in _VISION_PREFIXES:
            state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix) and k[len(prefix) :] in keys}
            if state:
                break
        # under a vision prefix every key is the tower's: one it lacks means another architecture (e.g. attn_pool)
        extra = [k for k in raw if prefix.endswith("visual.") and k.startswith(prefix) and k[len(prefix) :] not in keys]
        if state and extra:
            raise CheckpointError(
                f"{weights_file}: the {what} weights do not match its config: {len(extra)} unexpected "
                f"(e.g. {extra[0]!r}) tensors"
            )
    if not state:
        raise CheckpointError(f"{weights_file} holds no vision-tower weights for {config.model_name!r}")
    load_weights(encoder.visual, state, weights_file, what)
    return encoder


# --- pipelines ----------------------------------------------------------------------------------------------------
def load_pipeline(
    path: str | os.PathLike,
    stage_b_checkpoint: str | os.PathLike | None = None,
    stage_a_checkpoint: str | os.PathLike | None = None,
    use_ema: bool = True,
) -> WuerstchenPipeline:
    """A frozen pipeline in eval mode from an exported folder or a Stage C checkpoint (whose Stage B, holding its
    frozen Stage A, is found through the path it was trained with). ``stage_b_checkpoint`` / ``stage_a_checkpoint``
    replace those parts."""
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        pipeline = _pipeline_from_export(path)
        if stage_b_checkpoint is not None:
            raise CheckpointError(f"{path} is an exported pipeline: its Stage B cannot be replaced; export again")
    elif path.exists():
        pipeline = _pipeline_from_stage_c(path, stage_b_checkpoint, use_ema)
    else:
        raise CheckpointError(f"no Stage C checkpoint or exported pipeline at {path}")
    if stage_a_checkpoint is not None:
        pipeline.stage_a = load_stage_a(stage_a_checkpoint, use_ema, needed_by="--stage_a_ckpt")
        pipeline.config.stage_a = pipeline.stage_a.config
    return pipeline.requires_grad_(False).eval()


def _pipeline_from_stage_c(path: Path, stage_b_checkpoint: str | os.PathLike | None, use_ema: bool):
    checkpoint, record = read_stage_checkpoint(path, "C", needed_by="sampling")
    stage_b_path = stage_b_checkpoint or record.stage_b_checkpoint
    stage_b = load_stage_b(stage_b_path, use_ema, needed_by=f"the Stage C checkpoint {path}")
    state = checkpoint["state_dict"]
    config = PipelineConfig(
        text_encoder=record.text_encoder,
        prior=record.prior,
        decoder=stage_b.decoder.config,
        stage_a=stage_b.stage_a.config,
        compression=stage_b.compression,
        latent_mean=state["latent_mean"].flatten().tolist(),
        latent_std=state["latent_std"].flatten().tolist(),
        prior_diffusion=record.diffusion,
        decoder_diffusion=stage_b.diffusion,
        prior_sampling=record.sampling,
        decoder_sampling=record.decoder_sampling,
        image_size=record.image_size,
        decoder_text_encoder=stage_b.text_encoder.config if stage_b.text_encoder is not None else None,
        semantic_rounding=stage_b.compressor.config.latent_rounding,
    )
    text_encoder = _checkpoint_text_encoder(checkpoint, record.text_encoder, path)
    prior = _stage_c_prior(checkpoint, record, path, use_ema)
    return WuerstchenPipeline(
        text_encoder, prior, stage_b.decoder, stage_b.stage_a, config, decoder_text_encoder=stage_b.text_encoder
    )


def save_pipeline(pipeline: WuerstchenPipeline, directory: str | os.PathLike) -> Path:
    """A self-contained pipeline folder: one safetensors file per part and ``pipeline.json`` (the
    :class:`PipelineConfig`), swapped in whole (:func:`lit_wuerstchen.files.replaced_folder`)."""
    directory = Path(directory)
    with replaced_folder(directory) as partial:
        for name in EXPORT_PARTS + (("decoder_text_encoder",) if pipeline.decoder_text_encoder is not None else ()):
            state = {k: v.detach().cpu().contiguous() for k, v in getattr(pipeline, name).state_dict().items()}
            safetensors.torch.save_file(state, partial / f"{name}.safetensors")
        (partial / EXPORT_CONFIG).write_text(json.dumps(asdict(pipeline.config), indent=2) + "\n")
        umask = current_umask()
        for file in partial.iterdir():  # ordinary permissions (safetensors writes 0600), as any file the user makes
            file.chmod(0o666 & ~umask)
    return directory


def _pipeline_from_export(directory: Path) -> WuerstchenPipeline:
    config_path = directory / EXPORT_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not an exported pipeline (no {EXPORT_CONFIG})")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    config = config_from_dict(PipelineConfig, data, config_path)
    parts = {
        "text_encoder": TextEncoder(config.text_encoder),  # every weight comes from the export
        "prior": Prior(config.prior),
        "decoder": DiffNeXt(config.decoder),
        "stage_a": VQGAN(config.stage_a),
    }
    if config.decoder_text_encoder is not None:
        parts["decoder_text_encoder"] = TextEncoder(config.decoder_text_encoder)
    for name, module in parts.items():
        file = directory / f"{name}.safetensors"
        load_weights(module, read_state_dict(file), file, name)
    return WuerstchenPipeline(**parts, config=config)
