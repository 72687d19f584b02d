"""``export --format diffusers``: a trained (or converted) pipeline -> folders diffusers loads.

Writes, under the output folder:

- ``prior/``: a ``WuerstchenPriorPipeline`` folder (``prior/`` = ``WuerstchenPrior``, ``text_encoder/`` +
  ``tokenizer/`` = the prior's CLIP text model, ``scheduler/``), the layout of ``warp-ai/wuerstchen-prior``;
- ``decoder/``: a ``WuerstchenDecoderPipeline`` folder (``decoder/`` = ``WuerstchenDiffNeXt``, ``vqgan/`` =
  ``PaellaVQModel``, ``text_encoder/`` + ``tokenizer/``, ``scheduler/``), the layout of ``warp-ai/wuerstchen``.

``WuerstchenPrior.from_pretrained(out / "prior", subfolder="prior")`` (and likewise the decoder and VQGAN) load the
networks alone; :func:`load_diffusers_pipeline` builds diffusers' ``WuerstchenCombinedPipeline`` from the two
folders (README "Start from the released weights"). Every tensor goes through the exact name maps of
:mod:`.keymaps`; a structure diffusers' classes cannot hold (a Stage B without text, per-channel latent
normalisation, a VQGAN without Paella blocks) is a one-line error before anything is written. Needs the ``interop``
extra (diffusers, transformers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..files import replaced_folder
from ..generation import WuerstchenPipeline
from .keymaps import (
    InteropError,
    decoder_config_to_diffusers,
    decoder_key_map,
    prior_config_to_diffusers,
    prior_key_map,
    vqgan_config_to_diffusers,
    vqgan_key_map,
)


def require(module: str):
    """Import an ``interop`` dependency, or fail in one line saying how to get it."""
    try:
        return __import__(module)
    except ImportError:
        raise InteropError(f"{module} is not installed: pip install 'lit_wuerstchen[interop]'") from None


def _load_strict(model: nn.Module, ours: nn.Module, key_map: dict[str, str]) -> nn.Module:
    state = {key_map[k]: v.detach().clone() for k, v in ours.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[0]
        raise InteropError(f"the diffusers model does not take our weights: {first!r} (a key-map bug)")
    return model.eval()


def diffusers_prior(prior) -> nn.Module:
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    return _load_strict(WuerstchenPrior(**prior_config_to_diffusers(prior.config)), prior, prior_key_map(prior.config))


def diffusers_decoder(decoder) -> nn.Module:
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt

    model = WuerstchenDiffNeXt(**decoder_config_to_diffusers(decoder.config))
    return _load_strict(model, decoder, decoder_key_map(decoder.config))


def diffusers_vqgan(vqgan) -> nn.Module:
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    return _load_strict(PaellaVQModel(**vqgan_config_to_diffusers(vqgan.config)), vqgan, vqgan_key_map(vqgan.config))


def _latent_normalisation(pipeline: WuerstchenPipeline) -> tuple[float, float]:
    """diffusers' prior pipeline returns ``latents * latent_mean - latent_std`` (its names): one scale and one
    shift for all channels."""
    mean, std = pipeline.latent_mean.flatten().tolist(), pipeline.latent_std.flatten().tolist()
    if len(set(mean)) != 1 or len(set(std)) != 1:
        raise InteropError(
            "diffusers' Würstchen prior pipeline scales the semantic latent by one number: this model's per-channel "
            "normalisation (latent_normalization: measured) cannot be exported; train with latent_normalization: v2"
        )
    return std[0], -mean[0]


def diffusers_pipelines(pipeline: WuerstchenPipeline):
    """``(WuerstchenPriorPipeline, WuerstchenDecoderPipeline)`` holding this pipeline's weights (fp32, CPU)."""
    require("diffusers")
    require("transformers")
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDecoderPipeline, WuerstchenPriorPipeline

    from .clip_text import to_transformers

    if pipeline.decoder_text_encoder is None:
        raise InteropError("diffusers' Würstchen decoder is text-conditioned: this Stage B has no text encoder")
    if pipeline.config.semantic_rounding != "ceil":
        raise InteropError(
            "diffusers' Würstchen pipeline sizes the semantic latent as ceil(side / compression); this model was "
            "trained with compressor.latent_rounding: half_up (set ceil to export)"
        )
    latent_mean, latent_std = _latent_normalisation(pipeline)
    pipeline = pipeline.float().cpu()
    prior_text, prior_tokenizer = to_transformers(pipeline.text_encoder, with_projection=False)
    decoder_text, decoder_tokenizer = to_transformers(pipeline.decoder_text_encoder, with_projection=False)
    prior_pipeline = WuerstchenPriorPipeline(
        tokenizer=prior_tokenizer,
        text_encoder=prior_text,
        prior=diffusers_prior(pipeline.prior),
        scheduler=DDPMWuerstchenScheduler(),
        latent_mean=latent_mean,
        latent_std=latent_std,
        resolution_multiple=pipeline.config.compression,
    )
    decoder_pipeline = WuerstchenDecoderPipeline(
        tokenizer=decoder_tokenizer,
        text_encoder=decoder_text,
        decoder=diffusers_decoder(pipeline.decoder),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=diffusers_vqgan(pipeline.stage_a),
        latent_dim_scale=pipeline.config.compression / pipeline.stage_a.config.downsampling,
    )
    return prior_pipeline, decoder_pipeline


def export_diffusers(pipeline: WuerstchenPipeline, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``out/prior`` and ``out/decoder`` (see the module docstring); refuses an existing folder unless
    ``overwrite``. Written to a temporary folder first, so an interrupted export leaves nothing half-written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InteropError(f"{out} exists; pass --overwrite to replace it")
    prior_pipeline, decoder_pipeline = diffusers_pipelines(pipeline)
    with replaced_folder(out) as partial, torch.no_grad():
        prior_pipeline.save_pretrained(partial / "prior", safe_serialization=True)
        decoder_pipeline.save_pretrained(partial / "decoder", safe_serialization=True)
    return out


def load_diffusers_pipeline(folder: str | os.PathLike):
    """diffusers' ``WuerstchenCombinedPipeline`` from an exported folder (``prior/`` + ``decoder/``), built from its
    components: diffusers >= 0.36 keeps Würstchen under ``pipelines.deprecated``, where ``from_pretrained`` cannot
    resolve the networks named in any ``model_index.json`` (the released repos' too). The prior and decoder
    pipelines' own settings (latent scaling, resolution multiple, latent_dim_scale) are applied to the combined
    pipeline, which would otherwise use the released defaults."""
    require("diffusers")
    require("transformers")
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import (
        PaellaVQModel,
        WuerstchenCombinedPipeline,
        WuerstchenDiffNeXt,
        WuerstchenPrior,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    prior, decoder = folder / "prior", folder / "decoder"
    for path in (prior / "model_index.json", decoder / "model_index.json"):
        if not path.is_file():
            missing = path.relative_to(folder)
            raise InteropError(f"{folder} is not an exported diffusers Würstchen folder (no {missing})")
    prior_config = json.loads((prior / "model_index.json").read_text())
    decoder_config = json.loads((decoder / "model_index.json").read_text())
    combined = WuerstchenCombinedPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(decoder / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(decoder / "text_encoder"),
        decoder=WuerstchenDiffNeXt.from_pretrained(decoder / "decoder"),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(decoder / "scheduler"),
        vqgan=PaellaVQModel.from_pretrained(decoder / "vqgan"),
        prior_tokenizer=CLIPTokenizer.from_pretrained(prior / "tokenizer"),
        prior_text_encoder=CLIPTextModel.from_pretrained(prior / "text_encoder"),
        prior_prior=WuerstchenPrior.from_pretrained(prior / "prior"),
        prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(prior / "scheduler"),
    )
    combined.prior_pipe.register_to_config(
        **{k: prior_config[k] for k in ("latent_mean", "latent_std", "resolution_multiple") if k in prior_config}
    )
    if "latent_dim_scale" in decoder_config:
        combined.decoder_pipe.register_to_config(latent_dim_scale=decoder_config["latent_dim_scale"])
    return combined
