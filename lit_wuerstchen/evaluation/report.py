"""``python -m lit_wuerstchen evaluate``: FID, CLIP score and shapes alignment of a ``sample`` output folder.

Reads ``DIR/samples.jsonl`` (written by ``sample`` / ``lit_wuerstchen.callbacks.SampleWriter``: one JSON object per
image with ``prompt`` and ``path`` relative to DIR) and writes a JSON report (default ``DIR/evaluation.json``):

- ``fid``: clean-fid Inception FID against ``--reference`` (a folder of images, searched recursively, or a shard
  pattern whose ``png``/``jpg``/``jpeg``/``webp`` members are read), reference images centre-cropped to the
  samples' aspect and resized to their size (PIL bicubic) first; ``--fid_features random`` computes the same
  Fréchet distance on fixed random conv features instead (offline proxy, ``extractor`` says which);
- ``clip_score``: mean of ``100 * max(cos(image, prompt), 0)`` with an open_clip model;
- ``shapes_alignment``: attribute accuracy for prompts of the synthetic shapes caption grammar (``count`` scored,
  ``unparsed_prompts`` outside the grammar).

A metric that cannot be computed (disabled, no reference, Inception/CLIP weights missing offline, no shapes
prompts) appears as ``{"skipped": reason}``; the rest is still written. Exit code 2 with a one-line error only
when the samples folder itself is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.shards import iter_shard, load_rgb
from ..data.urls import expand_shards
from ..errors import ConfigError
from ..files import write_text_atomic
from ..runs import claim_output_file
from .features import (
    FID_FEATURES,
    ClipScorer,
    RunningStatistics,
    extractor_name,
    frechet_distance_from_statistics,
    make_fid_features,
)
from .shapes_alignment import ShapesAlignment

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class SamplesError(ValueError):
    """The samples folder cannot be evaluated (missing/invalid samples.jsonl or images)."""


# --- inputs ------------------------------------------------------------------------------------------------------
def read_samples(samples_dir: str | os.PathLike) -> list[dict]:
    """Records of ``samples.jsonl`` with an absolute ``file`` added; raises :class:`SamplesError`."""
    root = Path(samples_dir)
    manifest = root / "samples.jsonl"
    if not manifest.is_file():
        raise SamplesError(f"{manifest} not found (expected the output folder of 'python -m lit_wuerstchen sample')")
    records = []
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SamplesError(f"{manifest}:{number}: not JSON ({err})") from err
        if not isinstance(record, dict) or "path" not in record:
            raise SamplesError(f"{manifest}:{number}: a record needs a 'path' field")
        file = root / record["path"]
        if not file.is_file():
            raise SamplesError(f"{manifest}:{number}: image {file} does not exist")
        records.append({**record, "file": str(file)})
    if not records:
        raise SamplesError(f"{manifest} lists no images")
    return records


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre crop to the aspect of ``size`` (W, H), then resize to it (PIL bicubic)."""
    w, h = img.size
    tw, th = size
    if (w, h) == (tw, th):
        return img
    scale = min(w / tw, h / th)
    cw, ch = round(tw * scale), round(th * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch)).resize((tw, th), Image.BICUBIC)


def sample_image_size(records: list[dict]) -> tuple[int, int]:
    """(W, H) of the first sample: the size every other sample and reference image is fitted to."""
    try:
        with Image.open(records[0]["file"]) as img:
            return img.size
    except Exception as err:
        raise SamplesError(f"cannot read {records[0]['file']}: {err}") from err


def iter_sample_batches(records: list[dict], size: tuple[int, int], batch_size: int) -> Iterator[tuple]:
    """``(images [B, 3, H, W] in [0, 1], prompts)`` batch by batch; images of another size are fitted to ``size``."""
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = []
        for record in chunk:
            try:
                with Image.open(record["file"]) as img:
                    images.append(_to_tensor(_fit(img.convert("RGB"), size)))
            except Exception as err:
                raise SamplesError(f"cannot read {record['file']}: {err}") from err
        yield torch.stack(images), [str(r.get("prompt", "")) for r in chunk]


def iter_reference_images(reference: str, size: tuple[int, int], limit: int | None = None) -> Iterator[torch.Tensor]:
    """Reference images ``[3, H, W]`` fitted to ``size`` (W, H): from a folder (recursive) or a shard pattern."""
    count = 0
    if os.path.isdir(reference):
        files = sorted(p for p in Path(reference).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {reference}")
        for file in files:
            if limit is not None and count >= limit:
                return
            with Image.open(file) as img:
                yield _to_tensor(_fit(img.convert("RGB"), size))
            count += 1
        return
    for url in expand_shards(reference):
        for sample in iter_shard(url):
            data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
            if data is None:
                continue
            if limit is not None and count >= limit:
                return
            yield _to_tensor(_fit(load_rgb(data), size))
            count += 1


# --- metric builders ---------------------------------------------------------------------------------------------
def make_clip_scorer(model_name: str, pretrained: str | None, weights_file: str | None, device: torch.device):
    return ClipScorer(
        model_name, pretrained=None if weights_file else pretrained, weights_file=weights_file, device=device
    )


def _reference_statistics(extractor, images: Iterator[torch.Tensor], batch_size: int) -> RunningStatistics:
    stats, chunk = RunningStatistics(), []
    for image in images:
        chunk.append(image)
        if len(chunk) == batch_size:
            stats.update(torch.as_tensor(extractor(torch.stack(chunk))).cpu())
            chunk.clear()
    if chunk:
        stats.update(torch.as_tensor(extractor(torch.stack(chunk))).cpu())
    return stats


# --- the report --------------------------------------------------------------------------------------------------
def evaluate_samples(
    samples_dir: str | os.PathLike,
    reference: str | None = None,
    *,
    fid: bool = True,
    clip: bool = True,
    alignment: bool = True,
    inception_weights: str | None = None,
    fid_features: str = "inception",
    clip_model: str = "ViT-bigG-14",
    clip_pretrained: str | None = "laion2b_s39b_b160k",
    clip_weights: str | None = None,
    num_reference: int | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    feature_extractor: Any = None,
    clip_scorer: Any = None,
) -> dict[str, Any]:
    """The report dict (see the module docstring). ``feature_extractor`` / ``clip_scorer`` replace Inception and
    the open_clip model (tests). Raises :class:`SamplesError` when the samples folder is unusable."""
    device = torch.device(device)
    records = read_samples(samples_dir)
    size = sample_image_size(records)
    report: dict[str, Any] = {
        "samples": str(samples_dir),
        "num_samples": len(records),
        "resolution": [size[1], size[0]],
        "metrics": {},
    }
    metrics = report["metrics"]

    # What each metric needs, built first: a metric that cannot be computed is skipped with the reason.
    extractor = scorer = None
    if not fid:
        metrics["fid"] = {"skipped": "disabled (--no_fid)"}
    elif not reference:
        metrics["fid"] = {"skipped": "no reference given (--reference DIR_OR_SHARDS)"}
    elif len(records) < 2:
        metrics["fid"] = {"skipped": "FID needs at least 2 samples"}
    else:
        try:
            extractor = feature_extractor or make_fid_features(fid_features, inception_weights, device)
        except (RuntimeError, ValueError, FileNotFoundError, OSError) as err:
            metrics["fid"] = {"skipped": str(err)}
    if not clip:
        metrics["clip_score"] = {"skipped": "disabled (--no_clip)"}
    else:
        try:
            scorer = clip_scorer or make_clip_scorer(clip_model, clip_pretrained, clip_weights, device)
        except (RuntimeError, ValueError, FileNotFoundError, OSError) as err:
            metrics["clip_score"] = {"skipped": str(err)}
    alignment_metric = ShapesAlignment() if alignment else None
    if not alignment:
        metrics["shapes_alignment"] = {"skipped": "disabled"}

    # One pass over the samples, batch by batch: memory does not grow with their number.
    fake, scores = RunningStatistics(), []
    batches = iter_sample_batches(records, size, batch_size)
    for images, prompts in tqdm(batches, total=-(-len(records) // batch_size), desc="evaluate", unit="batch"):
        if extractor is not None:
            fake.update(torch.as_tensor(extractor(images)).cpu())
        if scorer is not None:
            scores.append(scorer.score(images, prompts).float().cpu())
        if alignment_metric is not None:
            alignment_metric.update(images, prompts)

    if extractor is not None:
        try:
            real = _reference_statistics(extractor, iter_reference_images(reference, size, num_reference), batch_size)
            if real.count < 2:
                raise ValueError(f"the reference {reference} holds {real.count} usable image(s); FID needs 2+")
            metrics["fid"] = {
                "value": frechet_distance_from_statistics(*fake.result(), *real.result()),
                "num_samples": fake.count,
                "num_reference": real.count,
                "reference": str(reference),
                "extractor": extractor_name(extractor),
            }
        except (RuntimeError, ValueError, FileNotFoundError, OSError) as err:
            metrics["fid"] = {"skipped": str(err)}
    if scorer is not None:
        values = torch.cat(scores)
        metrics["clip_score"] = {
            "value": float(values.mean()),
            "std": float(values.std()) if values.numel() > 1 else 0.0,
            "num_samples": int(values.numel()),
            "model": getattr(scorer, "name", clip_model),
        }
    if alignment_metric is not None:
        result = alignment_metric.compute()
        if result["count"] == 0:
            metrics["shapes_alignment"] = {"skipped": "no prompt follows the synthetic shapes caption grammar"}
        else:
            metrics["shapes_alignment"] = {
                **{k: v for k, v in result.items() if k != "count"},
                "count": int(result["count"]),
                "unparsed_prompts": len(records) - int(result["count"]),
            }
    return report


def format_table(report: dict[str, Any]) -> str:
    rows = [
        f"{report['num_samples']} samples in {report['samples']} ({report['resolution'][0]}x{report['resolution'][1]})"
    ]
    for name, entry in report["metrics"].items():
        if "skipped" in entry:
            reason = entry["skipped"].splitlines()[0]
            rows.append(f"  {name:<18} skipped: {reason}")
        elif name == "shapes_alignment":
            parts = ", ".join(
                f"{k} {entry[k]:.3f}" for k in ("all", "background", "colour", "shape", "position", "size")
            )
            rows.append(f"  {name:<18} {parts} ({entry['count']} prompts)")
        else:
            rows.append(f"  {name:<18} {entry['value']:.4f}")
    return "\n".join(rows)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="FID, CLIP score and shapes alignment of a 'sample' output folder (DIR/samples.jsonl + images). "
        "Metrics that cannot be computed are reported as skipped with the reason.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--samples", required=True, help="output folder of 'sample' (holds samples.jsonl)")
    parser.add_argument("--reference", help="real images for FID: a folder (recursive) or a shard pattern")
    parser.add_argument("--num_reference", type=int, help="use at most this many reference images")
    parser.add_argument("--out", help="report path (default: SAMPLES/evaluation.json)")
    parser.add_argument(
        "--inception_weights", help="clean-fid's inception-2015-12-05.pt (default: where clean-fid keeps it)"
    )
    parser.add_argument(
        "--fid_features",
        choices=FID_FEATURES,
        default="inception",
        help="inception: clean-fid FID; random: Fréchet distance on fixed random conv features (offline proxy)",
    )
    parser.add_argument(
        "--clip_model",
        default="ViT-bigG-14",
        help="open_clip model name (wuerstchen-tiny-clip: random tiny, plumbing only)",
    )
    parser.add_argument(
        "--clip_pretrained", default="laion2b_s39b_b160k", help="open_clip pretrained tag ('none': random weights)"
    )
    parser.add_argument(
        "--clip_weights", help="local open_clip checkpoint for --clip_model (instead of --clip_pretrained)"
    )
    parser.add_argument("--no_fid", action="store_true", help="skip FID")
    parser.add_argument("--no_clip", action="store_true", help="skip the CLIP score")
    parser.add_argument("--no_alignment", action="store_true", help="skip the shapes alignment")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report at --out")
    return parser


def run(args: argparse.Namespace, feature_extractor: Any = None, clip_scorer: Any = None) -> int:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    pretrained = None if (args.clip_pretrained or "").lower() in ("", "none", "null") else args.clip_pretrained
    try:
        out = claim_output_file(args.out or Path(args.samples) / "evaluation.json", args.overwrite)
        report = evaluate_samples(
            args.samples,
            args.reference,
            fid=not args.no_fid,
            clip=not args.no_clip,
            alignment=not args.no_alignment,
            inception_weights=args.inception_weights,
            fid_features=args.fid_features,
            clip_model=args.clip_model,
            clip_pretrained=pretrained,
            clip_weights=args.clip_weights,
            num_reference=args.num_reference,
            batch_size=args.batch_size,
            device=device,
            feature_extractor=feature_extractor,
            clip_scorer=clip_scorer,
        )
    except (SamplesError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m lit_wuerstchen evaluate") -> int:
    return run(build_parser(prog).parse_args(argv))
