"""``convert``: released Würstchen v2 weights (a diffusers model or pipeline folder, or the official ``.pt`` files)
-> our stage checkpoints.

Reads safetensors / torch files directly (diffusers itself is not needed to convert). Every tensor goes through an
exact name map (:mod:`.keymaps`): a leftover, missing or misshapen tensor stops the conversion with one line. The
result is a stage checkpoint as training writes it (``lit_wuerstchen`` record + ``state_dict``), loadable by
``sample``, ``export``, Stage B/C training (as their frozen parts) and fine-tuning (``init_checkpoint``); it holds no
optimiser state, so it is a starting point, not a resume point.

What each stage needs besides its own weights:

- Stage A: nothing.
- Stage B: its Stage A (a converted Stage A checkpoint, or the ``vqgan`` next to the decoder in a pipeline folder);
  the semantic compressor's weights (``effnet_state_dict`` of the official ``model_v2_stage_b.pt``; diffusers'
  folders do not ship it) — without them the compressor is left random and the command says so, which
  is enough to *sample* (Stage C makes the semantic latent) but not to fine-tune Stage B or to train Stage C.
  Text: CLIP ViT-H-14 (``laion2b_s32b_b79k``) through open_clip, the same weights as the pipeline's text encoder.
- Stage C: the converted Stage B checkpoint it decodes with; text: CLIP ViT-bigG-14 (``laion2b_s39b_b160k``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from ..checkpoints import read_checkpoint, read_stage_checkpoint, read_state_dict
from ..diffusion import DiffusionConfig, SamplingConfig, decoder_sampling, prior_sampling
from ..errors import guarded
from ..files import atomic_file
from ..models.compressor import CompressorConfig, SemanticCompressor
from ..models.diffnext import DiffNeXt
from ..models.prior import Prior
from ..models.text_encoder import TextEncoderConfig
from ..models.vqgan import VQGAN
from ..records import RECORD_KEY, StageARecord, StageBRecord, StageCRecord, StageRecord, record_from_dict
from .keymaps import (
    InteropError,
    decoder_config_from_diffusers,
    decoder_key_map,
    prior_config_from_diffusers,
    prior_key_map,
    rename,
    vqgan_config_from_diffusers,
    vqgan_key_map,
)

DIFFUSERS_CLASSES = {"A": "PaellaVQModel", "B": "WuerstchenDiffNeXt", "C": "WuerstchenPrior"}
STAGE_OF_CLASS = {name: stage for stage, name in DIFFUSERS_CLASSES.items()}
# The released text encoders, as open_clip names them (the same weights as the diffusers pipelines' CLIPTextModels).
PRIOR_TEXT_ENCODER = TextEncoderConfig(model_name="ViT-bigG-14", pretrained="laion2b_s39b_b160k")
DECODER_TEXT_ENCODER = TextEncoderConfig(model_name="ViT-H-14", pretrained="laion2b_s32b_b79k")
RELEASED_COMPRESSION = 42.67
# The released Stage C models (x + 1) / 42 (diffusers' prior pipeline: latents * 42 - 1).
RELEASED_LATENT_MEAN, RELEASED_LATENT_STD = -1.0, 42.0


# --- finding the weights ------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InteropError(f"{path} is not a readable JSON file: {error}") from None


def find_model_folder(path: str | os.PathLike, stage: str) -> Path:
    """The diffusers model folder of ``stage`` at ``path``: the folder itself (its ``config.json`` names the class)
    or, in a pipeline folder, the subfolder holding that class."""
    path = Path(path)
    wanted = DIFFUSERS_CLASSES[stage]
    if not path.is_dir():
        raise InteropError(f"no diffusers folder at {path}")
    candidates = [path] + sorted(p for p in path.iterdir() if p.is_dir())
    found = {}
    for folder in candidates:
        config = folder / "config.json"
        if config.is_file():
            found[folder] = _read_json(config).get("_class_name")
    for folder, class_name in found.items():
        if class_name == wanted:
            return folder
    kinds = sorted({f"{c} ({STAGE_OF_CLASS[c]})" if c in STAGE_OF_CLASS else str(c) for c in found.values()})
    raise InteropError(
        f"{path} holds no {wanted} (Stage {stage}); found: {', '.join(kinds) if kinds else 'no diffusers model'}"
    )


def read_diffusers_model(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state dict)`` of a diffusers model folder (single or sharded safetensors, or a ``.bin``)."""
    config = _read_json(folder / "config.json")
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return config, read_state_dict(folder / name)
    for name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"):
        index = folder / name
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
                state.update(read_state_dict(folder / shard))
            return config, state
    raise InteropError(f"{folder} has a config.json but no diffusion_pytorch_model weights")


def official_to_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official Würstchen checkpoints' names -> diffusers' (their attention is ``nn.MultiheadAttention``: one
    packed in-projection; the VQGAN's codebook is ``codebook``), as diffusers' own conversion does it."""
    out = {}
    for key, value in state.items():
        if key.endswith("attention.attn.in_proj_weight") or key.endswith("attention.attn.in_proj_bias"):
            kind = key.rsplit("_", 1)[1]
            base = key[: -len(f"attn.in_proj_{kind}")]
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{base}{name}.{kind}"] = part
        elif ".attention.attn.out_proj." in key:
            out[key.replace(".attention.attn.out_proj.", ".attention.to_out.0.")] = value
        elif key.startswith("vquantizer.codebook."):
            out[key.replace("vquantizer.codebook.", "vquantizer.embedding.")] = value
        else:
            out[key] = value
    return out


def _official_stage(checkpoint: dict, path: Path) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """``(stage, diffusers-named state, effnet state or None)`` of an official ``.pt`` file."""
    state = checkpoint.get("ema_state_dict") or checkpoint.get("state_dict")
    if not isinstance(state, dict):
        state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise InteropError(f"{path} holds no state dict (expected state_dict / ema_state_dict)")
    state = official_to_diffusers_names(state)
    if any(k.startswith("vquantizer.") for k in state):
        return "A", state, None
    if any(k.startswith("effnet_mappers.") for k in state):
        return "B", state, checkpoint.get("effnet_state_dict")
    if "cond_mapper.0.weight" in state:
        return "C", state, None
    raise InteropError(f"{path} is not an official Würstchen v2 checkpoint of a known layout")


def _prior_config_from_shapes(state: dict[str, torch.Tensor]) -> dict:
    """The WuerstchenPrior config of official weights (heads: width / 64, as v2's 1536 / 24)."""
    width, c_in = state["projection.weight"].shape[:2]
    depth = sum(1 for k in state if k.endswith(".channelwise.0.weight"))
    return {"c_in": c_in, "c": width, "c_cond": state["cond_mapper.0.weight"].shape[1], "depth": depth,
            "nhead": width // 64, "c_r": state["blocks.1.mapper.weight"].shape[1]}  # fmt: skip


# --- building our checkpoints ---------------------------------------------------------------------------------------
def _expected(module_cls, config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return module_cls(config).state_dict()


def _ours(state, key_map, module_cls, config, source, what) -> dict[str, torch.Tensor]:
    """diffusers-named ``state`` -> our names, checked against the network ``config`` builds."""
    inverse = {theirs: ours for ours, theirs in key_map.items()}
    return rename(state, inverse, _expected(module_cls, config), source, what)


def _checkpoint(record: StageRecord, state_dict: dict) -> dict:
    """A stage checkpoint as training writes one, at step 0."""
    return {"state_dict": state_dict, RECORD_KEY: record.to_dict(), "global_step": 0, "epoch": 0}


def convert_stage_a(config: dict, state: dict, source: str) -> dict:
    vqgan_config = vqgan_config_from_diffusers(config)
    weights = _ours(state, vqgan_key_map(vqgan_config), VQGAN, vqgan_config, source, "Stage A")
    record = StageARecord(vqgan=vqgan_config, converted_from=source)
    return _checkpoint(record, {f"vqgan.{k}": v for k, v in weights.items()})


def _compressor(effnet: dict | None, source: str) -> tuple[CompressorConfig, dict[str, torch.Tensor], bool]:
    """The released EfficientNetV2-S encoder as our compressor: ``backbone.*``, ``mapper.0`` (1x1 conv) ->
    ``mapper``, ``mapper.1`` (affine BatchNorm) -> ``norm``. Without its weights: random (seeded), said by the
    caller; sampling never uses it (Stage C makes the semantic latent)."""
    config = CompressorConfig(affine_norm=True, latent_rounding="ceil", pretrained=False)
    if effnet is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return config, SemanticCompressor(config, RELEASED_COMPRESSION).state_dict(), False
    renamed = {}
    for key, value in effnet.items():
        if key.startswith("mapper.0."):
            key = "mapper." + key[len("mapper.0.") :]
        elif key.startswith("mapper.1."):
            key = "norm." + key[len("mapper.1.") :]
        renamed[key] = value
    with torch.device("meta"):
        expected = SemanticCompressor(config).state_dict()
    return config, rename(renamed, {k: k for k in renamed}, expected, source, "compressor"), True


def convert_stage_b(
    config: dict,
    state: dict,
    source: str,
    stage_a: dict,
    effnet: dict | None,
    text_encoder: TextEncoderConfig = DECODER_TEXT_ENCODER,
) -> tuple[dict, bool]:
    decoder_config = decoder_config_from_diffusers(config)
    weights = _ours(state, decoder_key_map(decoder_config), DiffNeXt, decoder_config, source, "Stage B decoder")
    compressor_config, compressor_state, has_effnet = _compressor(effnet, source)
    stage_a_record = record_from_dict(stage_a[RECORD_KEY], source)
    state_dict = {f"decoder.{k}": v for k, v in weights.items()}
    state_dict.update({f"compressor.{k}": v for k, v in compressor_state.items()})
    state_dict.update({k: v for k, v in stage_a["state_dict"].items() if k.startswith("vqgan.")})
    state_dict = {("stage_a." + k[len("vqgan.") :] if k.startswith("vqgan.") else k): v for k, v in state_dict.items()}
    record = StageBRecord(
        decoder=decoder_config,
        compressor=compressor_config,
        compression=RELEASED_COMPRESSION,
        stage_a=stage_a_record.vqgan,
        diffusion=DiffusionConfig(),
        sampling=decoder_sampling(),
        text_encoder=text_encoder,
        converted_from=source,
    )
    checkpoint = _checkpoint(record, state_dict)
    return checkpoint, has_effnet


def convert_stage_c(
    config: dict,
    state: dict,
    source: str,
    stage_b_checkpoint: str,
    text_encoder: TextEncoderConfig | None = None,
    latent_scaling: tuple[float, float] = (RELEASED_LATENT_STD, -RELEASED_LATENT_MEAN),
) -> dict:
    """``latent_scaling``: the prior pipeline's ``(latent_mean, latent_std)`` config, which diffusers applies as
    ``latents * latent_mean - latent_std`` (ours: ``x * std + mean``)."""
    prior_config = prior_config_from_diffusers(config)
    weights = _ours(state, prior_key_map(prior_config), Prior, prior_config, source, "Stage C prior")
    channels = prior_config.latent_channels
    state_dict = {f"prior.{k}": v for k, v in weights.items()}
    state_dict["latent_mean"] = torch.full((channels,), -float(latent_scaling[1]))
    state_dict["latent_std"] = torch.full((channels,), float(latent_scaling[0]))
    state_dict["normalization_ready"] = torch.tensor(True)
    text = text_encoder or dataclasses.replace(PRIOR_TEXT_ENCODER)
    if text_encoder is None and prior_config.text_channels != 1280:  # v1 / paper priors read ViT-H-14 (1024)
        text = dataclasses.replace(DECODER_TEXT_ENCODER)
    record = StageCRecord(
        prior=prior_config,
        text_encoder=text,
        stage_b_checkpoint=str(stage_b_checkpoint),
        diffusion=DiffusionConfig(),
        sampling=prior_sampling(),
        decoder_sampling=SamplingConfig(steps=12),
        image_size=[1024, 1024],
        converted_from=source,
    )
    return _checkpoint(record, state_dict)


def _pipeline_text_encoder(model_folder: Path, out: Path, notes: list[str]) -> TextEncoderConfig | None:
    """The text encoder of the diffusers pipeline a model folder belongs to (its ``text_encoder/``, a transformers
    CLIP text model), converted to open_clip weights saved beside the checkpoint (``<out>.text_encoder/``); None
    when the folder is not in a pipeline (the released open_clip tag is used then)."""
    folder = model_folder.parent / "text_encoder"
    if not (folder / "config.json").is_file():
        return None
    try:
        from .clip_text import from_transformers

        encoder = from_transformers(folder, out_dir=out.with_name(out.name + ".text_encoder").resolve())
    except ImportError as error:
        notes.append(f"the pipeline's text encoder was not converted ({error}); using the open_clip release instead")
        return None
    notes.append(f"text encoder converted from {folder} to {encoder.config.weights_file}")
    return encoder.config


def convert(
    source: str | os.PathLike,
    stage: str,
    out: str | os.PathLike,
    stage_a: str | os.PathLike | None = None,
    stage_b: str | os.PathLike | None = None,
    effnet: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Convert ``source`` (a diffusers model/pipeline folder or an official ``.pt``) for ``stage`` into our checkpoint
    at ``out``; returns ``(path, notes)`` (notes: what the user must know, e.g. a compressor left at ImageNet)."""
    stage = stage.upper()
    if stage not in DIFFUSERS_CLASSES:
        raise InteropError(f"stage must be A, B or C, got {stage!r}")
    source, out = Path(source), Path(out)
    if out.exists() and not overwrite:
        raise InteropError(f"{out} exists; pass --overwrite to replace it")
    if stage == "C" and stage_b is None:
        raise InteropError("converting Stage C needs the converted Stage B checkpoint it decodes with: --stage_b")
    if stage == "B" and stage_a is None and not source.is_dir():
        raise InteropError("converting Stage B needs its Stage A: pass --stage_a (a converted Stage A checkpoint)")
    notes: list[str] = []
    effnet_state = None
    if source.is_dir():
        folder = find_model_folder(source, stage)
        config, state = read_diffusers_model(folder)
        label = str(folder)
    else:
        checkpoint = read_checkpoint(source)
        found, state, effnet_state = _official_stage(checkpoint, source)
        if found != stage:
            raise InteropError(f"{source} is an official Stage {found} checkpoint; asked to convert Stage {stage}")
        config = _prior_config_from_shapes(state) if stage == "C" else {}
        label = str(source)
    if effnet is not None:
        effnet_checkpoint = read_checkpoint(effnet)
        effnet_state = effnet_checkpoint.get("effnet_state_dict", effnet_checkpoint)

    text_encoder = None
    if stage in "BC" and source.is_dir():
        text_encoder = _pipeline_text_encoder(folder, out, notes)

    if stage == "A":
        result = convert_stage_a(config, state, label)
    elif stage == "B":
        if stage_a is not None:
            stage_a_checkpoint, _ = read_stage_checkpoint(stage_a, "A", needed_by="converting Stage B")
        elif source.is_dir():  # a decoder pipeline folder carries its VQGAN
            vq_config, vq_state = read_diffusers_model(find_model_folder(source, "A"))
            stage_a_checkpoint = convert_stage_a(vq_config, vq_state, label)
        else:
            raise InteropError("converting Stage B needs its Stage A: pass --stage_a (a converted Stage A checkpoint)")
        result, has_effnet = convert_stage_b(
            config, state, label, stage_a_checkpoint, effnet_state, text_encoder or DECODER_TEXT_ENCODER
        )
        if not has_effnet:
            notes.append(
                "the semantic compressor is randomly initialised (no effnet_state_dict given: pass --effnet "
                "model_v2_stage_b.pt): fine for sampling, not for fine-tuning Stage B or training Stage C"
            )
    else:
        if stage_b is None:
            raise InteropError("converting Stage C needs the converted Stage B checkpoint it decodes with: --stage_b")
        read_stage_checkpoint(stage_b, "B", needed_by="converting Stage C")
        scaling = (RELEASED_LATENT_STD, -RELEASED_LATENT_MEAN)
        index = folder.parent / "model_index.json" if source.is_dir() else None
        if index is not None and index.is_file():  # a prior pipeline folder says how it scales its latents
            pipeline_config = _read_json(index)
            scaling = (pipeline_config.get("latent_mean", scaling[0]), pipeline_config.get("latent_std", scaling[1]))
        result = convert_stage_c(config, state, label, str(Path(stage_b).resolve()), text_encoder, scaling)

    with atomic_file(out) as partial:  # an interrupted conversion leaves no half-written checkpoint
        torch.save(result, partial)
    return out, notes


# --- the command ----------------------------------------------------------------------------------------------------
def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert released Würstchen v2 weights into a lit_wuerstchen stage checkpoint: a diffusers model "
        "or pipeline folder (warp-ai/wuerstchen-prior, warp-ai/wuerstchen, or one of their model subfolders) or an "
        "official .pt (model_v2_stage_c.pt, model_v2_stage_b.pt, vqgan_f4_v1_500k.pt). Convert A, then B, then C.",
    )
    parser.add_argument("--stage", required=True, choices=("A", "B", "C", "a", "b", "c"), help="which stage")
    parser.add_argument("--source", required=True, help="diffusers folder or official .pt file")
    parser.add_argument("--out", required=True, help="the checkpoint to write (e.g. checkpoints/v2/stage_c.ckpt)")
    parser.add_argument("--stage_a", help="Stage B: the converted Stage A (default: the vqgan of a pipeline folder)")
    parser.add_argument("--stage_b", help="Stage C: the converted Stage B checkpoint it decodes with")
    parser.add_argument(
        "--effnet",
        help="Stage B: the official model_v2_stage_b.pt holding effnet_state_dict (the semantic compressor; "
        "diffusers folders do not ship it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    out, notes = convert(
        args.source, args.stage, args.out, args.stage_a, args.stage_b, args.effnet, overwrite=args.overwrite
    )
    print(f"converted Stage {args.stage.upper()} from {args.source} to {out}")
    for note in notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str], prog: str = "python -m lit_wuerstchen convert") -> int:
    return guarded(run_convert, build_parser(prog).parse_args(argv))
