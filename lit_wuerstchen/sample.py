"""``python -m lit_wuerstchen sample`` (text -> images) and ``export`` (a self-contained pipeline folder)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from tqdm.auto import tqdm

from .checkpoints import load_pipeline, save_pipeline
from .data.prompts import read_prompts
from .diffusion import SamplingConfig
from .errors import guarded
from .generation import check_image_size
from .runs import claim_output

DEFAULT_IMAGE_SIZE = 256


def write_samples(out_dir: Path, images, prompts, indices, settings: dict) -> list[dict]:
    """Save images as ``images/<index>.png`` and return their manifest records (paths relative to out_dir)."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for image, prompt, index in zip(images, prompts, indices):
        relative = f"images/{int(index):06d}.png"
        torchvision.utils.save_image(image.float().cpu(), out_dir / relative)
        records.append({"index": int(index), "prompt": prompt, "path": relative, **settings})
    return records


def build_sample_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Generate images from text with a trained Würstchen: text -> Stage C -> Stage B -> Stage A. "
        "Writes OUT/images/<index>.png and OUT/samples.jsonl (one JSON object per image: prompt, path relative "
        "to OUT, seed and every setting used). For very large sets across GPUs use the Lightning 'predict' "
        "command with lit_wuerstchen.data.PromptDataModule and lit_wuerstchen.callbacks.SampleWriter (see README).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--ckpt", required=True, help="Stage C checkpoint (.ckpt file or sharded folder) or an exported pipeline folder"
    )
    parser.add_argument("--stage_b_ckpt", help="override the Stage B checkpoint the Stage C run was trained with")
    parser.add_argument("--stage_a_ckpt", help="override the Stage A inside the Stage B checkpoint")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    parser.add_argument("--prompts_file", help="one prompt per line (.txt) or JSON lines with a 'prompt' field")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="batch b uses seed + b")
    parser.add_argument("--images_per_prompt", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--height", type=int, help="image height (default: the training resolution)")
    parser.add_argument("--width", type=int, help="image width (default: the training resolution)")
    parser.add_argument("--negative_prompt", default="", help="prompt of the unconditional branch of guidance")
    prior = parser.add_argument_group("Stage C sampling (defaults: the checkpoint's validation settings)")
    prior.add_argument("--prior_sampler", choices=["ddpm", "ddim"])
    prior.add_argument("--prior_steps", type=int, help="evaluations on a linear t grid (default: the 29-step list)")
    prior.add_argument("--prior_guidance", type=float, help="classifier-free guidance scale (1: off)")
    decoder = parser.add_argument_group("Stage B sampling")
    decoder.add_argument("--decoder_sampler", choices=["ddpm", "ddim"])
    decoder.add_argument("--decoder_steps", type=int)
    decoder.add_argument("--decoder_guidance", type=float)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto")
    parser.add_argument("--no_ema", action="store_true", help="use the trained weights instead of their EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUT already holds")
    return parser


def _sampling(base: SamplingConfig, sampler: str | None, steps: int | None, guidance: float | None) -> SamplingConfig:
    """The pipeline's sampling defaults with the command line's overrides."""
    config = replace(base)
    if sampler is not None:
        config.sampler = sampler
    if steps is not None:
        config.steps, config.t_list = steps, None
    if guidance is not None:
        config.guidance_scale = guidance
    return config


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_sample(args: argparse.Namespace) -> int:
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        print("error: give at least one --prompt or a --prompts_file", file=sys.stderr)
        return 2
    if args.images_per_prompt < 1 or args.batch_size < 1:
        print("error: --images_per_prompt and --batch_size must be >= 1", file=sys.stderr)
        return 2
    prompts = [prompt for prompt in prompts for _ in range(args.images_per_prompt)]
    out = claim_output(args.out, args.overwrite)  # before the model is loaded

    pipeline = load_pipeline(args.ckpt, args.stage_b_ckpt, args.stage_a_ckpt, use_ema=not args.no_ema)
    pipeline = pipeline.to(_device(args.device))
    config = pipeline.config
    trained_size = config.image_size or [DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE]
    height, width = args.height or trained_size[0], args.width or trained_size[1]
    check_image_size(pipeline.decoder, pipeline.stage_a, height, width)
    prior_sampling = _sampling(config.prior_sampling, args.prior_sampler, args.prior_steps, args.prior_guidance)
    decoder_sampling = _sampling(
        config.decoder_sampling, args.decoder_sampler, args.decoder_steps, args.decoder_guidance
    )

    settings = {
        "height": height,
        "width": width,
        "negative_prompt": args.negative_prompt,
        "checkpoint": str(args.ckpt),
        "prior_sampling": prior_sampling.used(),
        "decoder_sampling": decoder_sampling.used(),
    }
    records = []
    start = time.perf_counter()
    batches = range(0, len(prompts), args.batch_size)
    for batch_number, first in enumerate(tqdm(batches, desc="sampling", unit="batch")):
        batch = prompts[first : first + args.batch_size]
        seed = args.seed + batch_number
        generator = torch.Generator(device=pipeline.device).manual_seed(seed)
        images = pipeline.generate(
            batch, height, width, prior_sampling, decoder_sampling, args.negative_prompt, generator
        )
        new = write_samples(out, images, batch, range(first, first + len(batch)), {"seed": seed, **settings})
        records += new
        with open(out / "samples.jsonl", "a") as manifest:  # appended per batch: an interrupted job keeps its images
            manifest.writelines(json.dumps(record) + "\n" for record in new)
    elapsed = time.perf_counter() - start
    print(
        f"wrote {len(records)} images to {out / 'images'} and {out / 'samples.jsonl'} "
        f"({elapsed / len(records):.2f} s per image on {pipeline.device})"
    )
    return 0


def build_export_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export a Stage C checkpoint (with its Stage B and Stage A) as a self-contained "
        "pipeline folder: safetensors weights per part + pipeline.json ('sample --ckpt FOLDER' accepts it), or "
        "with --format diffusers as diffusers Würstchen folders (OUT/prior, OUT/decoder; needs the interop extra).",
    )
    parser.add_argument(
        "--ckpt", required=True, help="Stage C checkpoint (file or sharded folder) or an exported pipeline folder"
    )
    parser.add_argument(
        "--format",
        choices=("lit_wuerstchen", "diffusers"),
        default="lit_wuerstchen",
        help="lit_wuerstchen: our pipeline folder; diffusers: WuerstchenPriorPipeline + WuerstchenDecoderPipeline "
        "folders (a LoRA checkpoint is exported merged)",
    )
    parser.add_argument("--stage_b_ckpt", help="override the Stage B checkpoint the Stage C run was trained with")
    parser.add_argument("--stage_a_ckpt", help="override the Stage A inside the Stage B checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no_ema", action="store_true", help="export the trained weights instead of their EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace what OUT already holds")
    return parser


def run_export(args: argparse.Namespace) -> int:
    if args.format == "diffusers":
        from .interop.export import export_diffusers

        if Path(args.out).exists() and not args.overwrite:  # before the model is loaded
            raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
        pipeline = load_pipeline(args.ckpt, args.stage_b_ckpt, args.stage_a_ckpt, use_ema=not args.no_ema)
        out = export_diffusers(pipeline, args.out, overwrite=args.overwrite)
        print(f"exported diffusers folders to {out}/prior and {out}/decoder")
        return 0
    out = claim_output(args.out, args.overwrite)  # before the model is loaded
    pipeline = load_pipeline(args.ckpt, args.stage_b_ckpt, args.stage_a_ckpt, use_ema=not args.no_ema)
    out = save_pipeline(pipeline, out)
    print(f"exported the pipeline to {out}")
    return 0


def main_sample(argv: list[str], prog: str = "python -m lit_wuerstchen sample") -> int:
    return guarded(run_sample, build_sample_parser(prog).parse_args(argv))


def main_export(argv: list[str], prog: str = "python -m lit_wuerstchen export") -> int:
    return guarded(run_export, build_export_parser(prog).parse_args(argv))
