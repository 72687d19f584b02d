"""Offline-aware location of pretrained weights: where each file is expected, and a fast, clear failure without it.

Training machines often have no network. Pretrained weights are read from their usual local caches: torchvision's
ImageNet weights from ``$TORCH_HOME/hub/checkpoints`` (:func:`torch.hub.get_dir`), open_clip weights from the
Hugging Face cache (or open_clip's URL cache). With ``HF_HUB_OFFLINE=1`` or ``LIT_WUERSTCHEN_OFFLINE=1`` a missing
file fails at once with a message that says which file to put where, instead of hanging in download retries;
online it is downloaded once into that cache. Reading the files is :mod:`lit_wuerstchen.checkpoints`' job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import huggingface_hub
import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from .models.text_encoder import open_clip_model_config

_TRUE = {"1", "true"}


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``LIT_WUERSTCHEN_OFFLINE`` is set to ``"1"`` or ``"true"`` (any case)."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "LIT_WUERSTCHEN_OFFLINE")
    )


# --- torchvision ImageNet weights ---------------------------------------------------------------------------------
def torchvision_weights_path(weights: Any) -> Path:
    """Where torchvision caches ``weights`` (a ``WeightsEnum`` member): ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _missing_weights_message(weights: Any, path: Path, reason: str) -> str:
    return (
        f"Pretrained weights {weights!r} are not available: {reason}.\n"
        f"Expected file: {path}\n"
        f"Put the torchvision checkpoint {path.name} there (or point TORCH_HOME at a directory holding "
        f"hub/checkpoints/{path.name}). On a machine with network access, get it with\n"
        f"    wget {weights.url} -O {path.name}\n"
        f"or  python -c \"import torch; torch.hub.load_state_dict_from_url('{weights.url}')\"\n"
        f"(which saves it under that machine's {Path('$TORCH_HOME') / 'hub' / 'checkpoints'}), then copy it over. "
        f"Alternatively build the model with pretrained=False."
    )


def torchvision_weights_file(weights: Any) -> Path:
    """The local file of a torchvision ``WeightsEnum`` member, downloaded into torch's hub cache only when online.

    Offline and missing: :class:`RuntimeError` at once (no network access) naming the expected path and how to get
    the file; online, a failed download gives the same message.
    """
    path = torchvision_weights_path(weights)
    if path.is_file():
        return path
    if is_offline():
        reason = "the file is missing and offline mode is on (HF_HUB_OFFLINE / LIT_WUERSTCHEN_OFFLINE)"
        raise RuntimeError(_missing_weights_message(weights, path, reason))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), progress=True)
    except Exception as err:
        reason = f"the file is missing and the download failed ({err})"
        raise RuntimeError(_missing_weights_message(weights, path, reason)) from err
    return path


# --- open_clip weights ----------------------------------------------------------------------------------------------
def hf_hub_cache_dir() -> Path:
    """The Hugging Face Hub cache folder, read from the environment at call time.

    ``huggingface_hub.constants.HF_HUB_CACHE`` is frozen at import; re-reading ``HF_HUB_CACHE`` /
    ``HUGGINGFACE_HUB_CACHE`` / ``HF_HOME`` here lets a process (or a test) point the cache elsewhere later.
    Lookup and download both use this folder, so they always agree.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expanduser(os.path.expandvars(os.environ[name])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"]))) / "hub"
    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def _pretrained_candidates(pretrained_cfg: dict) -> tuple[str, list[str]] | None:
    """``(repo_id, filenames in preference order)`` for a tag hosted on the HF Hub (as open_clip resolves it)."""
    hf_hub = pretrained_cfg.get("hf_hub", "")
    if not hf_hub:
        return None
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    candidates = []
    # open_clip prefers a safetensors sibling of a pickled checkpoint (pretrained._get_safe_alternatives)
    if filename == HF_WEIGHTS_NAME:
        candidates.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.append(filename[:-4] + ".safetensors")
    candidates.append(filename)
    return repo_id, candidates


def _missing_message(model_name: str, tag: str, expected: list[str], reason: str) -> str:
    where = "\n".join(f"    {p}" for p in expected)
    return (
        f"Pretrained open_clip weights for model {model_name!r}, tag {tag!r} are not available: {reason}.\n"
        f"Expected one of:\n{where}\n"
        f"Fill the cache on a machine with network access, e.g.\n"
        f"    python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{tag}')\"\n"
        f"and copy the Hugging Face cache folder over (or set HF_HUB_CACHE / HF_HOME to where it lives), "
        f"or pass weights_file=<path to a local open_clip checkpoint> (.safetensors/.bin/.pt), "
        f"or pretrained=None for random initialisation."
    )


def resolve_pretrained(model_name: str, tag: str) -> str:
    """Local path of open_clip's ``(model_name, tag)`` checkpoint, downloading it only when online.

    The tag is resolved with ``open_clip.get_pretrained_cfg``. Hub-hosted tags (most) are looked up with
    ``huggingface_hub.try_to_load_from_cache`` in :func:`hf_hub_cache_dir` (safetensors first, as open_clip does);
    URL-hosted tags in ``~/.cache/clip/<file name>`` (open_clip's URL cache). Offline and not cached: raises
    :class:`RuntimeError` immediately, with no network call.
    """
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise ValueError(
            f"Unknown open_clip pretrained tag {tag!r} for model {model_name!r}. "
            f"Known tags: {open_clip.list_pretrained_tags_by_model(model_name)}. "
            f"For a local checkpoint use weights_file=..."
        )
    if "file" in cfg:
        return cfg["file"]
    cache_dir = hf_hub_cache_dir()
    hub = _pretrained_candidates(cfg)
    if hub is not None:
        repo_id, filenames = hub
        for filename in filenames:
            found = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--")) / "snapshots" / "<revision>"
        expected = [str(repo_folder / f) for f in filenames]
    else:
        url = cfg.get("url", "")
        if not url:
            raise ValueError(f"open_clip pretrained config for {model_name!r}/{tag!r} names no file: {cfg}")
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return str(path)
        expected = [str(path)]

    if is_offline():
        reason = "not in the local cache and offline mode is on (HF_HUB_OFFLINE / LIT_WUERSTCHEN_OFFLINE)"
        raise RuntimeError(_missing_message(model_name, tag, expected, reason))
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=str(cache_dir) if hub is not None else None)
    except Exception as err:
        reason = f"not in the local cache and the download failed ({err})"
        raise RuntimeError(_missing_message(model_name, tag, expected, reason)) from err
    if not path or not os.path.isfile(path):
        raise RuntimeError(_missing_message(model_name, tag, expected, "the download returned no file"))
    return path


def resolve_open_clip_model(
    model_name: str, pretrained: str | None, weights_file: str | None, model_config_file: str | None
) -> tuple[dict, str | None]:
    """(open_clip model config, weights file to load or None for random init), before anything is built.

    Registers ``model_config_file`` (automatically for the shipped tiny model); ``weights_file`` wins over the
    ``pretrained`` tag, whose file is looked up (or, online, downloaded) by :func:`resolve_pretrained`. A missing
    file or an unknown model fails here, fast.
    """
    model_cfg = open_clip_model_config(model_name, model_config_file)
    if weights_file is not None:
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"open_clip weights_file not found: {weights_file}")
        return model_cfg, str(weights_file)
    return model_cfg, resolve_pretrained(model_name, pretrained) if pretrained else None
