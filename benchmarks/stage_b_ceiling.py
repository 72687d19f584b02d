"""What Stage B can show at best: decode the *true* semantic latents of held-out images and score the decoded images.

The semantic compressor encodes real validation images, Stage B samples Stage A latents from those semantic latents,
Stage A decodes them, and the shapes-alignment metric scores the result against each image's caption. No text and
no Stage C are involved, so this is the ceiling any Stage C trained on this Stage B can reach on the metric (the
real images and Stage A reconstructions are scored too, for the metric's own ceiling). Run it per compression
ratio to see what the ratio costs. Results: docs/toy_alignment.md.

Usage: python benchmarks/stage_b_ceiling.py CKPT [--val "data/shapes/64px_n20000_v512_s0/val-*.tar"] [--n 256]
       [--steps 12] [--guidance 1.0]
"""

from __future__ import annotations

import argparse
import glob
import io
import time

import numpy as np
import torch
from PIL import Image

from lit_wuerstchen.checkpoints import load_stage_b
from lit_wuerstchen.data import iter_shard
from lit_wuerstchen.diffusion import Diffusion, SamplingConfig
from lit_wuerstchen.evaluation import shapes_alignment
from lit_wuerstchen.generation import decode_stage_a, sample_stage_b

KEYS = ("background", "colour", "shape", "position", "size", "all")
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def load_validation(pattern: str, n: int) -> tuple[torch.Tensor, list[str]]:
    images, captions = [], []
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise SystemExit(f"no shards match {pattern!r}: run `make demo` first or pass --val")
    for shard in shards:
        for sample in iter_shard(shard):
            data = next(sample[k] for k in IMAGE_KEYS if k in sample)
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
            captions.append(sample["txt"].decode())
            if len(images) == n:
                return torch.stack(images), captions
    return torch.stack(images), captions


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def row(name: str, scores: dict, extra: str = "") -> str:
    return f"{name:8s} " + " ".join(f"{k} {scores[k]:.3f}" for k in KEYS) + extra


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Stage B checkpoint")
    parser.add_argument("--val", default="data/shapes/64px_n20000_v512_s0/val-*.tar", help="held-out shards (glob)")
    parser.add_argument("--n", type=int, default=256, help="images to score")
    parser.add_argument("--steps", type=int, default=12, help="Stage B sampling steps")
    parser.add_argument("--guidance", type=float, default=1.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    parts = load_stage_b(args.checkpoint)
    images, captions = load_validation(args.val, args.n)
    print(row("real", shapes_alignment(images, captions)))
    latents = parts.stage_a.to_stage_b(parts.stage_a.encode(images))
    reconstructed = decode_stage_a(parts.stage_a, latents)
    print(row("stage A", shapes_alignment(reconstructed, captions), f" psnr {psnr(reconstructed, images):.2f}"))
    diffusion = Diffusion(parts.diffusion)
    sampling = SamplingConfig(steps=args.steps, guidance_scale=args.guidance)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    decoded = []
    for i in range(0, len(images), 64):
        semantic = parts.compressor(images[i : i + 64])
        size = tuple(images.shape[-2:])
        decoded.append(sample_stage_b(parts.decoder, parts.stage_a, semantic, size, diffusion, sampling, generator))
    decoded = torch.cat(decoded)
    seconds = time.perf_counter() - start
    latent = "x".join(str(d) for d in semantic.shape[1:])
    print(
        row("stage B", shapes_alignment(decoded, captions), f" psnr {psnr(decoded, images):.2f}")
        + f"  (semantic latent {latent}, {args.steps} steps, guidance {args.guidance}, {seconds:.0f} s)"
    )


if __name__ == "__main__":
    main()
