"""``data precompute``: run a stage's frozen models once over its training shards and write the cache.

What the cache holds and how training reads it: :mod:`lit_wuerstchen.data.cache`. This module writes it:

* one cache shard per source shard (``shard-<index>.tar``), each written atomically, then a small
  ``shard-<index>.json`` with its counts; a killed run is resumed by running the same command again (finished shards
  are kept, the one in progress is redone);
* over many processes: every process takes the source shards ``rank::world`` (``RANK``/``WORLD_SIZE`` as torchrun
  sets them, or SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``) and needs no process group; whichever process finds every
  shard done writes the finished manifest;
* ``cache.json`` is written first (stage, data settings, source URLs, model fingerprints, ``complete: false``): a run
  that finds a cache made by other models or settings refuses it in one line, or replaces its own shards of it with
  ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..files import write_text_atomic
from .cache import FORMAT, MANIFEST, SHARD_PATTERN, encode_entry, read_cache_manifest, weights_fingerprint
from .datamodule import ShardDataModule
from .decoding import ErrorLog, images_to_tensor
from .shards import IMAGE_EXTENSIONS, ShardWriter, open_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``data precompute`` (besides the ``-c`` configs and ``--key=value`` overrides of a fit)."""
    parser.add_argument("--out", required=True, help="the cache folder (created; resumed if it holds this cache)")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache made by other models or settings")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass of the frozen models")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if any)")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32", help="autocast the frozen models")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process among those sharing the work (torchrun's, or SLURM's, variables)."""
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in os.environ and world_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[world_key])
    return 0, 1


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _header(stage: Any, datamodule: ShardDataModule, urls: list[str], models: dict[str, str]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "stage": stage.stage,
        "data": datamodule.data_settings(),
        "source_urls": urls,
        "models": models,
        "keeps_image": bool(stage.cache_keeps_image),
    }


def _same_cache(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("format", "stage", "data", "source_urls", "models", "keeps_image")
    return all(a.get(k) == b.get(k) for k in keys)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Atomically (several processes may write the same manifest)."""
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def _done_file(out: Path, index: int) -> Path:
    return out / (SHARD_PATTERN % index).replace(".tar", ".json")


def _model_sources(stage: Any) -> dict[str, str]:
    """Where each frozen model came from, for people reading the manifest."""
    hparams = getattr(stage, "hparams", {})
    text = getattr(stage, "text_encoder_config", None)
    sources = {}
    for name in stage.cache_models():
        if name == "text_encoder" and text is not None:
            sources[name] = f"{text.model_name} ({text.weights_file or text.pretrained or 'random weights'})"
        elif name == "compressor":
            sources[name] = str(hparams.get("stage_b_checkpoint", "?"))
        elif name == "stage_a":
            sources[name] = str(hparams.get("stage_a_checkpoint", "?"))
    return sources


def precompute(
    stage: Any,
    datamodule: ShardDataModule,
    out: str | os.PathLike[str],
    batch_size: int = 64,
    device: torch.device | str | None = None,
    precision: str = "32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or finish) the cache of ``stage``'s training data in ``out``; returns the manifest as it stands."""
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    try:
        stage.cache_models()
    except NotImplementedError:
        raise ConfigError(f"Stage {stage.stage} has nothing to precompute (Stages B and C do)") from None
    rank, world = process_rank()
    device = torch.device(device) if device is not None else default_device()
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise ConfigError(f"--out {out_path} is a file, not a folder")
    datamodule.prepare_data()
    datamodule.setup("fit")
    urls = datamodule.train_urls()
    stage.to(device).eval()
    fingerprints = {name: weights_fingerprint(module) for name, module in stage.cache_models().items()}
    sources = _model_sources(stage)
    models = {name: {"fingerprint": fp, "source": sources.get(name, "?")} for name, fp in fingerprints.items()}
    header = _header(stage, datamodule, urls, models)
    mine = list(range(rank, len(urls), world))

    out_path.mkdir(parents=True, exist_ok=True)
    existing = read_cache_manifest(str(out_path))
    if existing is not None and not _same_cache(existing, header):
        if not overwrite:
            raise ConfigError(
                f"{out_path} holds a cache made by other models, data or settings: pass --overwrite to replace it, "
                f"or choose another --out"
            )
        for index in mine:  # this process's part only: the others replace theirs
            for path in (out_path / (SHARD_PATTERN % index), _done_file(out_path, index)):
                path.unlink(missing_ok=True)
        existing = None
    if existing is None:
        _write_json(out_path / MANIFEST, {**header, "complete": False})

    todo = [i for i in mine if not _done_file(out_path, i).exists()]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=f"precompute Stage {stage.stage}" + (f" [rank {rank}/{world}]" if world > 1 else ""),
        unit="shard",
        position=rank if world > 1 else None,
        disable=not progress,
    )
    decoder = datamodule.centre_crop_decoder()
    start = time.perf_counter()
    with bar, torch.no_grad(), autocast:
        for index in todo:
            counts = _cache_shard(stage, decoder, urls[index], out_path, index, batch_size, device)
            _write_json(_done_file(out_path, index), counts)
            bar.update(1)
            bar.set_postfix(samples=counts["samples"])
    return _finish(out_path, header, urls, seconds=time.perf_counter() - start)


def _cache_shard(
    stage: Any, decoder: Any, url: str, out: Path, index: int, batch_size: int, device: torch.device
) -> dict[str, Any]:
    errors = ErrorLog(f"precompute/{index}")
    samples = wds.DataPipeline(wds.SimpleShardList([url]), *open_shards(errors.shard_handler()))
    pending: list[tuple[dict[str, Any], tuple]] = []
    names: set[str] = set()
    written = 0

    def flush(writer: ShardWriter) -> None:
        nonlocal written
        images = images_to_tensor([decoded.image for _, decoded in pending]).to(device)
        entries = stage.cache_entries(images, [decoded.caption for _, decoded in pending])
        arrays = {name: value.float().cpu().numpy() for name, value in entries.items()}
        names.update(arrays)
        for row, (sample, decoded) in enumerate(pending):
            record = {"__key__": decoded.key, "txt": decoded.caption, "json": decoded.meta}
            record.update({f"{name}.npy": encode_entry(array[row]) for name, array in arrays.items()})
            if stage.cache_keeps_image:
                ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
                record[ext] = sample[ext]  # the source's bytes: the loader decodes and centre-crops them again
            writer.write(record)
        written += len(pending)
        pending.clear()

    with ShardWriter(out / SHARD_PATTERN, maxcount=10**12, start_shard=index) as writer:
        for sample in samples:
            item = decoder(sample, errors, None)
            if item is None:
                continue
            pending.append((sample, item))
            if len(pending) == batch_size:
                flush(writer)
        if pending:
            flush(writer)
    return {
        "url": url,
        "name": SHARD_PATTERN % index,
        "samples": written,
        "entries": sorted(names),
        "skipped": {k: v for k, v in errors.counts.items() if v},
    }


def _finish(out: Path, header: dict[str, Any], urls: list[str], seconds: float) -> dict[str, Any]:
    """Write the finished manifest when every shard is done (by any process); return the manifest as it stands."""
    done = [_done_file(out, i) for i in range(len(urls))]
    finished = [json.loads(path.read_text(encoding="utf-8")) for path in done if path.exists()]
    manifest = {**header, "complete": len(finished) == len(urls), "shards_done": len(finished)}
    if manifest["complete"]:
        filled = [entry for entry in finished if entry["samples"]]
        if not filled:
            raise ConfigError(f"no usable training sample in {len(urls)} shard(s): nothing cached in {out}")
        skipped: dict[str, int] = {}
        for entry in finished:
            for reason, count in entry["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + count
        manifest.update(
            shards=[{"name": entry["name"], "samples": entry["samples"]} for entry in finished],
            entries=filled[0]["entries"],
            samples=sum(entry["samples"] for entry in finished),
            skipped=skipped,
        )
        _write_json(out / MANIFEST, manifest)
    return {**manifest, "seconds": seconds}
