"""Exact name maps between our networks and diffusers' Würstchen classes, with their configs (no diffusers import).

Each ``*_key_map(config)`` returns ``{our key: diffusers key}`` for every tensor of the network that config builds;
:func:`rename` applies one and refuses leftovers, missing keys and shape mismatches, so nothing is dropped silently.
The configs are translated both ways (``*_to_diffusers`` / ``*_from_diffusers``); a structure diffusers' class cannot
express (e.g. a Stage B without text conditioning) is a one-line :class:`InteropError`.

- Stage C ``Prior`` <-> ``WuerstchenPrior`` (``c_in, c, c_cond, c_r, depth, nhead, dropout``).
- Stage B ``DiffNeXt`` <-> ``WuerstchenDiffNeXt``: its ``down_blocks[i]`` / ``up_blocks`` are flat lists of
  [downsampler] + per block "C" (ResBlockStageB), "T" (TimestepBlock), "A" (AttnBlock, levels with heads) [+
  upsampler]; ``effnet_mappers`` hold the down mappers at indices ``0..L-1`` and the up mappers at ``L..2L-1``,
  deepest level first.
- Stage A ``VQGAN`` (``residual_block="paella"``) <-> ``PaellaVQModel``.
- Stable Cascade ``CascadeUNet`` (Stage C and Stage B) <-> ``StableCascadeUNet``: the module names are the released
  ones, so only the shared blocks' inner names change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import CheckpointError
from ..models.cascade import CascadeUNet, CascadeUNetConfig
from ..models.diffnext import DiffNeXt, DiffNeXtConfig
from ..models.prior import Prior, PriorConfig
from ..models.vqgan import VQGAN, VQGANConfig


class InteropError(CheckpointError):
    """Weights or a config that cannot move between this framework and diffusers (one line)."""


# --- shared block names ---------------------------------------------------------------------------------------------
_BLOCK_RENAMES = (
    (r"\.mlp\.", ".channelwise."),  # ResBlock MLP
    (r"\.cond_mapper\.", ".kv_mapper."),  # AttnBlock: text tokens into the block's width
    (r"\.attention\.to_out\.", ".attention.to_out.0."),  # diffusers' to_out = [Linear, Dropout]
)


def _rename_block_key(key: str) -> str:
    for pattern, replacement in _BLOCK_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _check_covers(ours: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> None:
    missing = [k for k in ours if k not in key_map]
    if missing:  # a map that forgets a tensor is our bug, not the user's: say which
        raise InteropError(f"no diffusers name for {len(missing)} tensors (e.g. {missing[0]!r})")


# --- Stage C ----------------------------------------------------------------------------------------------------------
def prior_key_map(config: PriorConfig) -> dict[str, str]:
    """``{our Prior key: WuerstchenPrior key}``."""
    with torch.device("meta"):  # names and shapes only: no memory
        state = Prior(config).state_dict()
    key_map = {}
    for key in state:
        if key.startswith("embedding."):
            key_map[key] = "projection." + key[len("embedding.") :]
        elif key.startswith("text_mapper."):
            key_map[key] = "cond_mapper." + key[len("text_mapper.") :]
        else:
            key_map[key] = _rename_block_key(key)
    _check_covers(state, key_map)
    return key_map


def prior_config_to_diffusers(config: PriorConfig) -> dict:
    if config.architecture != "wuerstchen":
        raise InteropError(
            f"diffusers' WuerstchenPrior has the released blocks; this prior is architecture {config.architecture!r} "
            f"(no diffusers class holds it: sample it with lit_wuerstchen)"
        )
    if config.kernel_size != 3:
        raise InteropError(f"WuerstchenPrior has 3x3 depthwise convs; this prior has kernel_size {config.kernel_size}")
    return {
        "c_in": config.latent_channels,
        "c": config.width,
        "c_cond": config.text_channels,
        "c_r": config.r_embedding_dim,
        "depth": config.depth,
        "nhead": config.heads,
        "dropout": config.dropout,
    }


def prior_config_from_diffusers(config: Mapping) -> PriorConfig:
    return PriorConfig(
        latent_channels=config.get("c_in", 16),
        width=config.get("c", 1280),
        depth=config.get("depth", 16),
        heads=config.get("nhead", 16),
        text_channels=config.get("c_cond", 1024),
        r_embedding_dim=config.get("c_r", 64),
        dropout=float(config.get("dropout", 0.1)),
    )


# --- Stage B ----------------------------------------------------------------------------------------------------------
def _block_types(heads: int) -> str:
    return "CTA" if heads else "CT"


_PART_NAMES = {"res": "C", "time": "T", "attn": "A"}


def decoder_key_map(config: DiffNeXtConfig) -> dict[str, str]:
    """``{our DiffNeXt key: WuerstchenDiffNeXt key}`` (needs per-path semantic mappers: diffusers has no shared
    ones)."""
    if config.semantic_mappers != "per_path":
        raise InteropError("WuerstchenDiffNeXt has separate down/up semantic mappers: set semantic_mappers: per_path")
    with torch.device("meta"):
        state = DiffNeXt(config).state_dict()
    levels = len(config.widths)
    key_map = {}
    for key in state:
        parts = key.split(".")
        head, rest = parts[0], ".".join(parts[1:])
        if head == "embedding":
            key_map[key] = key
        elif head == "text_mapper":
            key_map[key] = "clip_mapper." + rest.removeprefix("0.")
        elif head == "out":
            key_map[key] = "clf." + rest
        elif head == "semantic_mappers":
            name, tail = parts[1], ".".join(parts[2:])
            level = int(name.removeprefix("down").removeprefix("up"))
            index = level if name.startswith("down") else 2 * levels - 1 - level
            key_map[key] = f"effnet_mappers.{index}.{tail}"
        elif head in ("down_levels", "up_levels"):
            level, block, part, tail = int(parts[1]), int(parts[2]), parts[3], ".".join(parts[4:])
            types = _block_types(config.heads[level])
            index = block * len(types) + types.index(_PART_NAMES[part])
            if head == "down_levels":
                key_map[key] = _rename_block_key(f"down_blocks.{level}.{index + (level > 0)}.{tail}")
            else:
                key_map[key] = _rename_block_key(f"up_blocks.{levels - 1 - level}.{index}.{tail}")
        elif head == "downsamplers":  # ours[i]: level i -> i + 1; theirs: first module of down_blocks[i + 1]
            key_map[key] = f"down_blocks.{int(parts[1]) + 1}.0.{'.'.join(parts[2:])}"
        elif head == "upsamplers":  # ours[i]: level i + 1 -> i; theirs: last module of the up list of level i + 1
            level = int(parts[1]) + 1
            last = config.blocks[level] * len(_block_types(config.heads[level]))
            key_map[key] = f"up_blocks.{levels - 1 - level}.{last}.{'.'.join(parts[2:])}"
    _check_covers(state, key_map)
    return key_map


def decoder_config_to_diffusers(config: DiffNeXtConfig) -> dict:
    proj = config.semantic_proj_channels
    if config.text_channels <= 0 or not any(config.heads):
        raise InteropError(
            "WuerstchenDiffNeXt always conditions its attention on text: this Stage B has no text_channels/attention "
            "(use DiffNeXtConfig.released_v2() or set text_channels)"
        )
    if proj != config.text_channels:
        raise InteropError(
            f"WuerstchenDiffNeXt projects text and semantic latent to one width c_cond: semantic_proj_channels "
            f"({proj}) must equal text_channels ({config.text_channels})"
        )
    if not config.semantic_align_corners or config.semantic_mappers != "per_path":
        raise InteropError("WuerstchenDiffNeXt resizes with align_corners=True and has per-path semantic mappers")
    return {
        "c_in": config.latent_channels,
        "c_out": config.latent_channels,
        "c_r": config.r_embedding_dim,
        "patch_size": config.patch_size,
        "c_cond": proj,
        "c_hidden": list(config.widths),
        "nhead": [h if h else -1 for h in config.heads],
        "blocks": list(config.blocks),
        "level_config": [_block_types(h) for h in config.heads],
        "inject_effnet": [i in config.semantic_levels for i in range(len(config.widths))],
        "effnet_embd": config.semantic_channels,
        "clip_embd": config.text_channels,
        "kernel_size": config.kernel_size,
        "dropout": config.dropout,
    }


def decoder_config_from_diffusers(config: Mapping) -> DiffNeXtConfig:
    defaults = {
        "c_in": 4,
        "c_out": 4,
        "c_r": 64,
        "patch_size": 2,
        "c_cond": 1024,
        "c_hidden": [320, 640, 1280, 1280],
        "nhead": [-1, 10, 20, 20],
        "blocks": [4, 4, 14, 4],
        "level_config": ["CT", "CTA", "CTA", "CTA"],
        "inject_effnet": [False, True, True, True],
        "effnet_embd": 16,
        "clip_embd": 1024,
        "kernel_size": 3,
        "dropout": 0.1,
    }
    c = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    if c["c_in"] != c["c_out"]:
        raise InteropError(f"WuerstchenDiffNeXt with c_in {c['c_in']} != c_out {c['c_out']} has no equivalent here")
    if c["c_cond"] != c["clip_embd"]:
        raise InteropError(f"c_cond {c['c_cond']} != clip_embd {c['clip_embd']}: not supported (text width)")
    dropout = c["dropout"]
    if isinstance(dropout, list):
        if len(set(dropout)) != 1:
            raise InteropError(f"per-level dropout {dropout} is not supported (one value for all levels)")
        dropout = dropout[0]
    heads = []
    for level_config, nhead in zip(c["level_config"], c["nhead"]):
        if level_config not in ("CT", "CTA"):
            raise InteropError(f"level_config {level_config!r} is not supported (only 'CT' and 'CTA')")
        heads.append(nhead if level_config == "CTA" else 0)
    return DiffNeXtConfig(
        latent_channels=c["c_in"],
        patch_size=c["patch_size"],
        widths=list(c["c_hidden"]),
        blocks=list(c["blocks"]),
        heads=heads,
        semantic_levels=[i for i, inject in enumerate(c["inject_effnet"]) if inject],
        semantic_channels=c["effnet_embd"],
        semantic_proj_channels=c["c_cond"],
        semantic_mappers="per_path",
        semantic_align_corners=True,
        text_channels=c["clip_embd"],
        r_embedding_dim=c["c_r"],
        kernel_size=c["kernel_size"],
        dropout=float(dropout),
    )


# --- Stage A ----------------------------------------------------------------------------------------------------------
def vqgan_key_map(config: VQGANConfig) -> dict[str, str]:
    """``{our VQGAN key: PaellaVQModel key}`` (needs ``residual_block="paella"``)."""
    vqgan_config_to_diffusers(config)  # raises for a structure PaellaVQModel cannot hold
    with torch.device("meta"):
        vqgan = VQGAN(config)
    state = vqgan.state_dict()
    last_encoder = len(vqgan.encoder) - 1  # [..., 1x1 conv, BatchNorm] -> diffusers' last Sequential(conv, BN)
    key_map = {}
    for key in state:
        parts = key.split(".")
        if parts[0] in ("in_block", "out_block"):
            key_map[key] = key
        elif parts[0] == "quantizer":
            key_map[key] = "vquantizer.embedding.weight"
        elif parts[0] == "encoder":
            index = int(parts[1])
            tail = ".".join(parts[2:])
            if index >= last_encoder - 1:
                key_map[key] = f"down_blocks.{last_encoder - 1}.{index - (last_encoder - 1)}.{tail}"
            else:
                key_map[key] = f"down_blocks.{index}.{tail}"
        elif parts[0] == "decoder":
            index = int(parts[1])
            tail = ".".join(parts[2:])
            key_map[key] = f"up_blocks.0.0.{tail}" if index == 0 else f"up_blocks.{index}.{tail}"
    _check_covers(state, key_map)
    return key_map


def vqgan_config_to_diffusers(config: VQGANConfig) -> dict:
    levels = len(config.channels)
    embed_dim = config.channels[-1]
    expected = [embed_dim // 2**i for i in reversed(range(levels))]
    problems = []
    if config.residual_block != "paella":
        problems.append("residual_block must be 'paella'")
    if list(config.channels) != expected:
        problems.append(f"channels must halve per level ({expected})")
    if any(b != 1 for b in config.encoder_blocks):
        problems.append("one encoder block per level")
    if any(b != 1 for b in config.decoder_blocks[:-1]):
        problems.append("one decoder block per level except the deepest")
    if problems:
        raise InteropError(f"PaellaVQModel cannot hold this VQGAN: {'; '.join(problems)}")
    return {
        "in_channels": 3,
        "out_channels": 3,
        "up_down_scale_factor": 2,
        "levels": levels,
        "bottleneck_blocks": config.decoder_blocks[-1],
        "embed_dim": embed_dim,
        "latent_channels": config.latent_channels,
        "num_vq_embeddings": config.codebook_size,
        "scale_factor": config.scale_factor,
    }


def vqgan_config_from_diffusers(config: Mapping) -> VQGANConfig:
    c = {
        "in_channels": 3,
        "out_channels": 3,
        "up_down_scale_factor": 2,
        "levels": 2,
        "bottleneck_blocks": 12,
        "embed_dim": 384,
        "latent_channels": 4,
        "num_vq_embeddings": 8192,
        "scale_factor": 0.3764,
        **config,
    }
    if c["in_channels"] != 3 or c["out_channels"] != 3 or c["up_down_scale_factor"] != 2:
        raise InteropError("only RGB PaellaVQModels with up_down_scale_factor 2 are supported")
    levels = c["levels"]
    return VQGANConfig(
        channels=[c["embed_dim"] // 2**i for i in reversed(range(levels))],
        encoder_blocks=[1] * levels,
        decoder_blocks=[1] * (levels - 1) + [c["bottleneck_blocks"]],
        latent_channels=c["latent_channels"],
        codebook_size=c["num_vq_embeddings"],
        scale_factor=float(c["scale_factor"]),
        residual_block="paella",
    )


# --- Stable Cascade ---------------------------------------------------------------------------------------------
_CASCADE_BLOCKS = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}


def cascade_key_map(config: CascadeUNetConfig) -> dict[str, str]:
    """``{our CascadeUNet key: StableCascadeUNet key}``."""
    with torch.device("meta"):
        state = CascadeUNet(config).state_dict()
    key_map = {key: _rename_block_key(key) for key in state}
    _check_covers(state, key_map)
    return key_map


def cascade_config_to_diffusers(config: CascadeUNetConfig) -> dict:
    """``StableCascadeUNet(**...)`` arguments for the network ``config`` builds (diffusers lists up-path values deepest
    level first)."""
    return {
        "in_channels": config.latent_channels,
        "out_channels": config.latent_channels,
        "timestep_ratio_embedding_dim": config.r_embedding_dim,
        "patch_size": config.patch_size,
        "conditioning_dim": config.cond_channels,
        "block_out_channels": list(config.widths),
        "num_attention_heads": list(config.heads),
        "down_num_layers_per_block": list(config.down_blocks),
        "up_num_layers_per_block": list(reversed(config.up_blocks)),
        "down_blocks_repeat_mappers": list(config.down_repeats),
        "up_blocks_repeat_mappers": list(reversed(config.up_repeats)),
        "block_types_per_layer": [[_CASCADE_BLOCKS[t] for t in ("CTA" if h else "CT")] for h in config.heads],
        "clip_text_in_channels": config.clip_text_channels or None,
        "clip_text_pooled_in_channels": config.clip_text_pooled_channels,
        "clip_image_in_channels": config.clip_image_channels or None,
        "clip_seq": config.clip_tokens,
        "effnet_in_channels": config.effnet_channels or None,
        "pixel_mapper_in_channels": config.pixel_channels or None,
        "kernel_size": config.kernel_size,
        "dropout": [float(p) for p in config.dropout],
        "self_attn": list(config.self_attn),
        "timestep_conditioning_type": list(config.timestep_conditions),
        "switch_level": None if config.level_resize is None else list(config.level_resize),
    }


def cascade_config_from_diffusers(config: Mapping) -> CascadeUNetConfig:
    """Our config for a ``StableCascadeUNet`` config dict (its ``config.json``; missing keys take diffusers' defaults);
    a structure we do not build is an :class:`InteropError`."""
    c = {
        "in_channels": 16,
        "out_channels": 16,
        "timestep_ratio_embedding_dim": 64,
        "patch_size": 1,
        "conditioning_dim": 2048,
        "block_out_channels": [2048, 2048],
        "num_attention_heads": [32, 32],
        "down_num_layers_per_block": [8, 24],
        "up_num_layers_per_block": [24, 8],
        "down_blocks_repeat_mappers": [1, 1],
        "up_blocks_repeat_mappers": [1, 1],
        "block_types_per_layer": [list(_CASCADE_BLOCKS.values())] * 2,
        "clip_text_in_channels": None,
        "clip_text_pooled_in_channels": 1280,
        "clip_image_in_channels": None,
        "clip_seq": 4,
        "effnet_in_channels": None,
        "pixel_mapper_in_channels": None,
        "kernel_size": 3,
        "dropout": [0.1, 0.1],
        "self_attn": True,
        "timestep_conditioning_type": ["sca", "crp"],
        "switch_level": None,
        **{k: v for k, v in config.items() if not k.startswith("_")},
    }
    levels = len(c["block_out_channels"])
    if c["in_channels"] != c["out_channels"]:
        raise InteropError(f"StableCascadeUNet with in_channels {c['in_channels']} != out_channels: not supported")
    if c["down_blocks_repeat_mappers"] is None or c["up_blocks_repeat_mappers"] is None:
        raise InteropError("StableCascadeUNet without repeat mappers runs no level: set them (1 = no repeat)")
    if bool(c["clip_text_in_channels"]) != bool(c["clip_image_in_channels"]):
        raise InteropError("StableCascadeUNet reads clip text and image embeddings together: set both or neither")
    heads = []
    for i, types in enumerate(c["block_types_per_layer"]):
        kind = "".join(k for t in types for k, v in _CASCADE_BLOCKS.items() if v == t)
        if kind not in ("CT", "CTA") or len(kind) != len(types):
            raise InteropError(
                f"level {i}: block types {list(types)} are not supported (ResBlock, TimestepBlock[, Attn])"
            )
        heads.append(c["num_attention_heads"][i] if kind == "CTA" else 0)
    dropout, self_attn = c["dropout"], c["self_attn"]
    try:
        return _cascade_config(c, levels, heads, dropout, self_attn)
    except ValueError as error:  # e.g. a timestep condition other than sca/crp
        raise InteropError(f"StableCascadeUNet config not supported: {error}") from error


def _cascade_config(c: dict, levels: int, heads: list[int], dropout, self_attn) -> CascadeUNetConfig:
    return CascadeUNetConfig(
        latent_channels=c["in_channels"],
        patch_size=c["patch_size"],
        widths=list(c["block_out_channels"]),
        heads=heads,
        down_blocks=list(c["down_num_layers_per_block"]),
        up_blocks=list(reversed(c["up_num_layers_per_block"])),
        down_repeats=list(c["down_blocks_repeat_mappers"]),
        up_repeats=list(reversed(c["up_blocks_repeat_mappers"])),
        cond_channels=c["conditioning_dim"],
        clip_text_pooled_channels=c["clip_text_pooled_in_channels"],
        clip_text_channels=c["clip_text_in_channels"] or 0,
        clip_image_channels=c["clip_image_in_channels"] or 0,
        clip_tokens=c["clip_seq"],
        effnet_channels=c["effnet_in_channels"] or 0,
        pixel_channels=c["pixel_mapper_in_channels"] or 0,
        r_embedding_dim=c["timestep_ratio_embedding_dim"],
        timestep_conditions=list(c["timestep_conditioning_type"]),
        kernel_size=c["kernel_size"],
        dropout=[float(dropout)] * levels if isinstance(dropout, (int, float)) else [float(p) for p in dropout],
        self_attn=[self_attn] * levels if isinstance(self_attn, bool) else list(self_attn),
        level_resize=None if c["switch_level"] is None else list(c["switch_level"]),
    )


# --- applying a map ----------------------------------------------------------------------------------------------
def rename(
    state: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str],
    expected: Mapping[str, torch.Tensor],
    source: str,
    what: str,
) -> dict[str, torch.Tensor]:
    """``state`` renamed through ``key_map`` (``{from: to}``), checked against the ``expected`` state dict: any
    leftover, missing or differently shaped tensor is a one-line :class:`InteropError` naming the first of them."""
    leftover = sorted(set(state) - set(key_map))
    if leftover:
        raise InteropError(
            f"{source}: {len(leftover)} {what} tensor(s) have no place in the target (e.g. {leftover[0]!r}): "
            "not the model this converter expects, or a config that does not match it"
        )
    renamed = {key_map[k]: v for k, v in state.items()}
    missing = sorted(set(expected) - set(renamed))
    if missing:
        raise InteropError(f"{source}: {len(missing)} {what} tensor(s) missing (e.g. {missing[0]!r})")
    for key, value in renamed.items():
        if key not in expected:
            raise InteropError(f"{source}: {what} tensor {key!r} has no place in the target")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InteropError(
                f"{source}: {what} tensor {key!r} has shape {tuple(value.shape)}, the target needs "
                f"{tuple(expected[key].shape)}"
            )
    return renamed
