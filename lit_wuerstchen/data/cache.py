"""The precomputed training cache: what the frozen models make of the training set, written once and read by training.

``python -m lit_wuerstchen data precompute`` (:mod:`lit_wuerstchen.data.precompute`) writes, for the stage a config
trains, one cache shard per source shard (``shard-%06d.tar``, webdataset, the source's keys) holding per sample the
caption (``txt``), the metadata (``json``) and the stage's *entries* in fp16 ``.npy`` members:

* Stage C: ``text_hidden.npy`` (the text encoder's hidden states ``[L, W]``), ``text_pooled.npy`` (``[D]``),
  ``semantic.npy`` (the frozen compressor's latent ``[C, h, w]``). No image: Stage C trains with no image decoding
  and no frozen model in its step.
* Stage B: ``latent.npy`` (Stage A's latent of the image, ``[4, H/4, W/4]``) and the source's image member as it was
  (the compressor is trained with Stage B, so it still sees the image; decoding it is the data workers' job).

Every image is taken as the validation loader takes it: the centre crop at ``resolution`` (after the shorter side is
resized to ``resize_to``). A cache therefore freezes the augmentation: no random crops, and no horizontal flips (a
flipped caption would also be wrong for words like "left"). Samples the loader would skip (undecodable, too small, no
caption when required, ...) are skipped and counted the same way.

``cache.json`` is the manifest: the stage, the data settings the images were cropped with, the source shard URLs, the
fingerprints (SHA-256 of the weights and of the text encoder's ``padding_mask``/``final_layer_norm`` settings) of the
frozen models that made the entries, with the checkpoints and encoder names they came from, and, once every shard is
done, ``complete`` with the counts. A training run refuses, in one line, a cache that is incomplete or was made by
other weights or encoder settings, another stage, other data or other crop settings.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch import nn

from ..errors import ConfigError

MANIFEST = "cache.json"
FORMAT = 1
SHARD_PATTERN = "shard-%06d.tar"
DATA_SETTINGS = ("resolution", "resize_to", "min_image_side", "max_caption_length", "require_caption")


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes, bytes) and, for a module whose outputs depend on
    more than its weights, its ``fingerprint_settings()`` (the text encoder's ``padding_mask`` and
    ``final_layer_norm``): equal exactly when the weights and those settings are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = getattr(module, "fingerprint_settings", None)
    if callable(settings):
        digest.update(("settings|" + json.dumps(settings(), sort_keys=True)).encode())
    return digest.hexdigest()


def cache_url(cache: str, name: str) -> str:
    """The URL of file ``name`` of a cache: ``cache`` is a folder (local path or URL prefix) or a template with
    ``{name}``, e.g. ``pipe:aws s3 cp s3://bucket/cache/{name} -`` for a cache uploaded to an object store."""
    if "{name}" in cache:
        return cache.replace("{name}", name)
    if urlparse(cache).scheme in ("", "file"):
        return os.path.join(cache, name)
    return cache.rstrip("/") + "/" + name


def read_cache_manifest(cache: str) -> dict[str, Any] | None:
    """The manifest of a cache, or None when there is none (a local folder without ``cache.json``)."""
    url = cache_url(cache, MANIFEST)
    if urlparse(url).scheme in ("", "file") and not os.path.isfile(url):
        return None
    try:
        with wds.gopen(url, "rb") as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the cache manifest {url}: {error}") from error


def open_cache(cache: str) -> dict[str, Any]:
    """The manifest of a finished cache; a missing or unfinished one is a :class:`ConfigError` saying what to run."""
    manifest = read_cache_manifest(cache)
    if manifest is None:
        raise ConfigError(
            f"no cache at {cache} (no {MANIFEST}): make it with `python -m lit_wuerstchen data precompute`"
        )
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"the cache at {cache} has format {manifest.get('format')}, this version reads {FORMAT}")
    if not manifest.get("complete"):
        done = manifest.get("shards_done", "?")
        raise ConfigError(
            f"the cache at {cache} is unfinished ({done} of {len(manifest.get('source_urls', []))} shards): run the "
            f"same `data precompute` command again to finish it"
        )
    return manifest


def cache_shard_urls(cache: str, manifest: dict[str, Any]) -> list[str]:
    """URLs of the cache's shards that hold samples, in source order."""
    return [cache_url(cache, entry["name"]) for entry in manifest["shards"] if entry["samples"]]


def check_data(manifest: dict[str, Any], cache: str, settings: dict[str, Any], source_urls: list[str]) -> None:
    """Refuse a cache made from other shards or with other crop/filter settings than this DataModule's."""
    for key in DATA_SETTINGS:
        if manifest["data"].get(key) != settings.get(key):
            raise ConfigError(
                f"the cache at {cache} was made with data {key}={manifest['data'].get(key)!r}, this run has "
                f"{settings.get(key)!r}: make a new cache for these settings (data precompute --out another folder)"
            )
    if list(manifest["source_urls"]) != list(source_urls):
        made = manifest["source_urls"]
        raise ConfigError(
            f"the cache at {cache} was made from other training shards ({len(made)} starting {made[:1]}) than this "
            f"run's ({len(source_urls)} starting {source_urls[:1]})"
        )


def check_models(manifest: dict[str, Any], cache: str, stage: str, models: dict[str, nn.Module]) -> None:
    """Refuse a cache made for another stage or by other weights than the frozen models of this run."""
    if manifest["stage"] != stage:
        raise ConfigError(f"the cache at {cache} holds Stage {manifest['stage']} inputs; this run trains Stage {stage}")
    for name, module in models.items():
        made = manifest["models"].get(name, {}).get("fingerprint")
        now = weights_fingerprint(module)
        if made != now:
            source = manifest["models"].get(name, {}).get("source", "?")
            raise ConfigError(
                f"the cache at {cache} is stale: its {name} (from {source}) had weights/settings {str(made)[:12]}, "
                f"this run's has {now[:12]}; run `data precompute` again with --overwrite"
            )


def encode_entry(array: np.ndarray) -> bytes:
    """An fp16 ``.npy`` member."""
    return wds.numpy_dumps(np.ascontiguousarray(array, dtype=np.float16))


def decode_entry(data: bytes) -> np.ndarray:
    """A ``.npy`` member as a read-only view of ``data``.

    The header is parsed once per distinct header (one per entry in a cache) instead of by ``np.load``, whose
    ``ast.literal_eval`` of every header cost about a tenth of a cached toy Stage C step.
    """
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy member")
    header_end = (
        (10 + int.from_bytes(data[8:10], "little")) if data[6] == 1 else (12 + int.from_bytes(data[8:12], "little"))
    )
    dtype, shape = _npy_header(bytes(data[:header_end]))
    array = np.frombuffer(data, dtype=dtype, offset=header_end)
    if array.size != math.prod(shape):
        raise ValueError(f".npy member holds {array.size} values, its header says {shape}")
    return array.reshape(shape)


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if fortran_order or dtype.hasobject:
        raise ValueError("cache .npy members are C-ordered numeric arrays")
    return dtype, shape
