"""Controlled experiments on the toy Stage C: why does the prior learn where a shape goes so much more slowly than
its colour? (docs/toy_alignment.md holds the answers.)

Every experiment drives the framework's own code: :class:`lit_wuerstchen.stages.StageC` trained by a Lightning
``Trainer`` with the :class:`~lit_wuerstchen.callbacks.EMA` callback (its training step, optimiser, schedule,
caption drop and latent normalisation), sampled with :func:`lit_wuerstchen.generation.sample_stage_c` and decoded
with :func:`~lit_wuerstchen.generation.sample_stage_b`. Only the data feeding is the lab's: the shapes set, its
semantic latents (the Stage B checkpoint's compressor) and text states (the toy text encoder) are computed once and
held in memory, so a run costs its training steps and nothing else.

Experiments (subcommands)::

    train      train one Stage C variant, then score its samples of held-out prompts
    locality   how local the compressor's latent is: what moving the shape changes, cell by cell
    sdedit     start sampling from the *true* latent noised to t0: which t range decides each attribute
    sampling   one trained prior under other guidance scales, step counts and caption-drop settings

``train`` variants (flags): ``--target semantic|thumb4|thumb8`` (the compressor's latents, or 4x4 / 8x8 RGB
thumbnails of the same images), ``--network prior|dit`` (ours, or a reference DiT of about the same size with
adaLN-zero, 2-D sinusoidal positions and text cross-attention), the recipe (``--steps --batch_size --lr --ema``,
``--loss_weight --t_sampler --logsnr_shift --caption_drop``) and the prior's structure (``--position_embedding``,
``--width --depth --heads``).

Scores: ``probe_*`` is a small MLP trained on the *true* training targets (latent or thumbnail) that reads the five
caption attributes; applied to held-out true targets it gives the ceiling, applied to generated ones it says which
attributes the generated target carries (no Stage B involved). ``align_*`` (latent targets) is the project's
shapes-alignment metric on images decoded by the Stage B checkpoint (Stage B's own ceiling:
benchmarks/stage_b_ceiling.py). Results print as one JSON line per run and are appended to ``--results``.

Usage (after ``make demo``, which writes the Stage B checkpoint and the shapes set)::

    python benchmarks/prior_lab.py train --steps 3000
    python benchmarks/prior_lab.py train --target thumb4 --steps 3000
    python benchmarks/prior_lab.py train --network dit --steps 3000
    python benchmarks/prior_lab.py locality
    python benchmarks/prior_lab.py sdedit --ckpt outputs/prior_lab/<run>/last.ckpt
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from lit_wuerstchen.callbacks import EMA
from lit_wuerstchen.checkpoints import load_prior, read_checkpoint
from lit_wuerstchen.data import iter_shard
from lit_wuerstchen.data.shapes import PALETTE, POSITIONS, SHAPES, SIZES, parse_caption
from lit_wuerstchen.diffusion import Diffusion, DiffusionConfig, SamplingConfig, linear_t_list
from lit_wuerstchen.evaluation import shapes_alignment
from lit_wuerstchen.generation import sample_stage_b, sample_stage_c
from lit_wuerstchen.models import prior as prior_module
from lit_wuerstchen.models.blocks import AttnBlock, ResBlock, TimestepBlock, position_embedding_2d, timestep_embedding
from lit_wuerstchen.models.prior import Prior, PriorConfig
from lit_wuerstchen.models.text_encoder import TextEncoderConfig
from lit_wuerstchen.stages import StageC
from lit_wuerstchen.stages.base import OptimizerConfig

ATTRIBUTES = ("background", "colour", "shape", "position", "size")
CLASSES = {
    "background": tuple(PALETTE),
    "colour": tuple(PALETTE),
    "shape": SHAPES,
    "position": POSITIONS,
    "size": tuple(SIZES),
}
DEFAULT_STAGE_B = "outputs/toy_stage_b/demo/checkpoints/last.ckpt"
DEFAULT_SHAPES = "data/shapes/64px_n20000_v512_s0"
# The toy Stage C of experiments/toy/stage_c.yaml: the lab's defaults, so a plain `train` is the demo's prior.
TOY_TEXT_ENCODER = TextEncoderConfig(model_name="wuerstchen-tiny-clip", pretrained=None, context_length=16)


# --- data: the shapes set with its latents and text states, in memory -------------------------------------------------
class Split:
    """One split of the shapes set: uint8 images, captions, attribute labels, raw semantic latents, text states."""

    def __init__(self, images: torch.Tensor, captions: list[str], labels: torch.Tensor):
        self.images, self.captions, self.labels = images, captions, labels
        self.semantic: torch.Tensor | None = None
        self.text: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def from_dict(cls, fields: dict) -> Split:
        split = cls(fields["images"], fields["captions"], fields["labels"])
        split.semantic, split.text = fields["semantic"], fields["text"]
        return split

    def pixels(self, index=slice(None)) -> torch.Tensor:
        return self.images[index].float() / 255.0

    def thumbnails(self, side: int) -> torch.Tensor:
        """RGB thumbnails [N, 3, side, side] in [0, 1] (area averages: every pixel counts, nothing is aliased)."""
        return F.adaptive_avg_pool2d(self.pixels(), side)


# Ideal text states: per token the one-hot word and the one-hot token index (64 channels, like the tiny CLIP's).
IDEAL_VOCABULARY = ("a", *SIZES, *PALETTE, *SHAPES, "on", "background", ",", "top", "center", "bottom", "left", "right")
IDEAL_LENGTH, IDEAL_CHANNELS = 16, 64  # the tiny CLIP's context length and width


def ideal_text(captions: list[str]) -> torch.Tensor:
    """Text states that name every word exactly: what a perfect text encoder could give the prior."""
    states = torch.zeros(len(captions), IDEAL_LENGTH, IDEAL_CHANNELS)
    for row, caption in enumerate(captions):
        for index, word in enumerate(caption.replace(",", " ,").split()[:IDEAL_LENGTH]):
            states[row, index, IDEAL_VOCABULARY.index(word)] = 1.0
            states[row, index, len(IDEAL_VOCABULARY) + index] = 1.0
    return states


def labels_of(caption: str) -> list[int]:
    attrs = parse_caption(caption)
    if attrs is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return [CLASSES[name].index(attrs[name]) for name in ATTRIBUTES]


def read_split(pattern: str, limit: int | None = None) -> Split:
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise SystemExit(f"no shards match {pattern!r}: run `make demo` first (it generates the shapes set)")
    images, captions = [], []
    for shard in shards:
        for sample in iter_shard(shard):
            pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            captions.append(sample["txt"].decode())
            if limit is not None and len(captions) == limit:
                break
        if limit is not None and len(captions) == limit:
            break
    return Split(torch.stack(images), captions, torch.tensor([labels_of(c) for c in captions]))


@torch.no_grad()
def encode(split: Split, compressor: nn.Module, text_encoder: nn.Module, batch_size: int = 256) -> None:
    """The frozen models' outputs for a split, as a cache would hold them."""
    semantic, text = [], []
    for start in range(0, len(split), batch_size):
        index = slice(start, start + batch_size)
        semantic.append(compressor(split.pixels(index)))
        text.append(text_encoder(split.captions[index])[0])
    split.semantic, split.text = torch.cat(semantic), torch.cat(text)


def load_data(args, stage: StageC) -> tuple[Split, Split]:
    """Train and held-out splits with the Stage B checkpoint's latents, memoised on disk per checkpoint."""
    digest = hashlib.sha256(f"{Path(args.stage_b).resolve()}|{os.path.getmtime(args.stage_b)}|{args.shapes}".encode())
    memo = Path(args.out) / f"data-{digest.hexdigest()[:12]}.pt"
    if memo.is_file():
        stored = torch.load(memo, weights_only=False)
        return Split.from_dict(stored["train"]), Split.from_dict(stored["val"])
    start = time.perf_counter()
    train = read_split(os.path.join(args.shapes, "train-*.tar"))
    val = read_split(os.path.join(args.shapes, "val-*.tar"))
    for split in (train, val):
        encode(split, stage.compressor, stage.text_encoder)
    memo.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train": vars(train), "val": vars(val)}, memo)
    log(f"encoded {len(train)} training and {len(val)} held-out samples in {time.perf_counter() - start:.0f} s")
    return train, val


class InMemoryData(L.LightningDataModule):
    """Shuffled batches of a split in the layout of the framework's cache batches (``cache.semantic`` and
    ``cache.text_hidden``), so StageC trains exactly as it does from ``data precompute``'s cache."""

    def __init__(self, targets: torch.Tensor, text: torch.Tensor, captions: list[str], batch_size: int, seed: int):
        super().__init__()
        self.targets, self.text, self.captions = targets, text, captions
        self.batch_size, self.seed = batch_size, seed

    def _collate(self, indices: list[int]) -> dict:
        index = torch.tensor(indices)
        return {
            "key": [str(i) for i in indices],
            "caption": [self.captions[i] for i in indices],
            "cache": {"semantic": self.targets[index], "text_hidden": self.text[index]},
        }

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            range(len(self.captions)),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            collate_fn=self._collate,
        )


# --- the prior variants ------------------------------------------------------------------------------------------
class LabPrior(Prior):
    """Our prior with single pieces swapped for the DiT's, to find the one that blocks position:

    * ``text_init``: "released" (the text mapper at N(0, 0.02)) or "default" (PyTorch's Linear init);
    * ``text_attention``: "joint" (text tokens appended to the self-attention's keys/values) or "separate" (a
      cross-attention of their own after every attention block, as the DiT has);
    * ``head``: "released" (``(x_t - a) / (|1 - b| + 1e-5)``) or "direct" (the output conv is the noise estimate);
    * ``grn``: GlobalResponseNorm in the ResBlocks or not;
    * ``conv_init``: "xavier" (released) or "dirac" (the depthwise conv starts as the identity).
    """

    def __init__(self, config: PriorConfig, text_init: str, text_attention: str, head: str, grn: bool, conv_init: str):
        super().__init__(config)
        self.text_attention, self.head = text_attention, head
        if conv_init == "dirac":  # each cell starts by seeing only itself; neighbours are learned
            for block in self.blocks:
                if isinstance(block, ResBlock):
                    nn.init.dirac_(block.depthwise.weight, groups=config.width)
        if not grn:
            for block in self.blocks:
                if isinstance(block, ResBlock):
                    block.mlp[2] = nn.Identity()
        if text_init == "default":
            for layer in self.text_mapper:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        if text_attention == "separate":
            for block in self.blocks:
                if isinstance(block, AttnBlock):
                    block.cond_mapper = None  # self-attention only
            self.cross = nn.ModuleList(
                AttnBlock(config.width, config.width, config.heads, self_attn=False) for _ in range(config.depth)
            )
        if head == "direct":
            self.out[1] = nn.Conv2d(config.width, config.latent_channels, kernel_size=1)
            nn.init.zeros_(self.out[1].weight)
            nn.init.zeros_(self.out[1].bias)

    def forward(self, x_t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        r = r.reshape(-1).expand(x_t.shape[0]) if r.numel() == 1 else r.reshape(-1)
        r_embed = timestep_embedding(r, self.r_embedding_dim).to(x_t.dtype)
        cond = self.text_mapper(text.to(x_t.dtype))
        x = self.embedding(x_t)
        attention_index = 0
        for block in self.blocks:
            if isinstance(block, TimestepBlock):
                x = block(x, r_embed)
            elif isinstance(block, AttnBlock):
                x = block(x, cond if self.text_attention == "joint" else None)
                if self.text_attention == "separate":
                    x = self.cross[attention_index](x, cond)
                attention_index += 1
            else:
                x = block(x)
        if self.head == "direct":
            return self.out(x)
        a, b = self.out(x).chunk(2, dim=1)
        return (x_t - a) / ((1 - b).abs() + 1e-5)


class PositionEmbeddedPrior(nn.Module):
    """Our prior with an absolute position embedding added after its input embedding: learned, or the DiT's fixed
    2-D sine-cosine one."""

    def __init__(self, prior: nn.Module, height: int, width: int, kind: str = "learned"):
        super().__init__()
        self.prior = prior
        self.latent_channels = prior.latent_channels
        self.config = prior.config
        if kind == "learned":
            self.position = nn.Parameter(torch.randn(1, prior.width, height, width) * 0.02)
        else:
            fixed = position_embedding_2d(height, width, prior.width).T.reshape(1, prior.width, height, width)
            self.register_buffer("position", fixed)
        prior.embedding.register_forward_hook(self._add_position)

    def _add_position(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.position

    def forward(self, x_t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.prior(x_t, r, text)


# --- the stage --------------------------------------------------------------------------------------------------------
class LabStageC(StageC):
    """StageC with the lab's swappable pieces: another target (RGB thumbnails), another network, or ideal text
    states. Training, normalisation, caption drop and sampling are StageC's."""

    ideal_text = False

    def empty_prompt_states(self) -> torch.Tensor:
        if self.ideal_text:  # the empty prompt has no word
            return torch.zeros(1, IDEAL_LENGTH, IDEAL_CHANNELS)
        return super().empty_prompt_states()

    def use_network(self, network: nn.Module, channels: int) -> None:
        self.prior = network
        if channels != self.latent_mean.shape[0]:
            self.latent_mean = torch.zeros(channels)
            self.latent_std = torch.ones(channels)
            self.normalization_ready.fill_(False)

    def trained_networks(self) -> dict[str, nn.Module]:
        return {"prior": self.prior}

    @torch.no_grad()
    def measure_normalization(self, dataloader) -> None:
        targets = self.trainer.datamodule.targets.double()
        self.latent_mean.copy_(targets.mean(dim=(0, 2, 3)).float())
        self.latent_std.copy_(targets.std(dim=(0, 2, 3)).float())
        self.normalization_ready.fill_(True)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def normalise_with(self, train_targets: torch.Tensor) -> torch.Tensor:
        """``train_targets`` normalised by their own statistics (what training will measure), before training."""
        mean, std = train_targets.double().mean(dim=(0, 2, 3)), train_targets.double().std(dim=(0, 2, 3))
        return ((train_targets - mean[:, None, None].float()) / std[:, None, None].float()).float()

    def denormalise(self, normalised: torch.Tensor) -> torch.Tensor:
        return normalised * self.latent_std[:, None, None] + self.latent_mean[:, None, None]


def build_stage(args) -> LabStageC:
    network = PriorConfig(
        width=args.width, depth=args.depth, heads=args.heads, text_channels=64, dropout=0.0, r_embedding_dim=64,
        kernel_size=args.kernel_size,
    )  # fmt: skip
    return LabStageC(
        stage_b_checkpoint=args.stage_b,
        network=network,
        text_encoder=TOY_TEXT_ENCODER,
        diffusion=DiffusionConfig(
            target=args.prediction,
            loss_weight=args.loss_weight,
            t_sampler=args.t_sampler,
            logsnr_shift=args.logsnr_shift,
        ),  # fmt: skip
        optimizer=OptimizerConfig(
            lr=args.lr,
            warmup_steps=args.warmup,
            decay="cosine",
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
        ),  # fmt: skip
        caption_drop_prob=args.caption_drop,
        latent_normalization="measured",
        validation_sampling=SamplingConfig(t_list="stage_c_default", guidance_scale=4.0),
        decoder_sampling=SamplingConfig(steps=12),
    )


def targets_of(split: Split, target: str) -> torch.Tensor:
    if target == "semantic":
        return split.semantic
    if target.startswith("thumb"):
        return split.thumbnails(int(target[len("thumb") :]))
    raise SystemExit(f"unknown target {target!r}")


def network_for(args, stage: LabStageC, targets: torch.Tensor) -> nn.Module:
    channels, height, width = targets.shape[1:]
    if args.network == "dit":  # the framework's DiT prior (PriorConfig.architecture)
        if getattr(args, "dit_no_positions", False):  # the ablation: every cell at the same place
            prior_module.position_embedding_2d = lambda h, w, c, device=None: torch.zeros(h * w, c, device=device)
        return Prior(PriorConfig(
            latent_channels=channels, width=args.dit_width, depth=args.dit_depth, heads=args.dit_heads,
            text_channels=64, dropout=0.0, architecture="dit",
        ))  # fmt: skip
    config = PriorConfig(**{**asdict(stage.prior.config), "latent_channels": channels})
    defaults = {
        "text_init": "released",
        "text_attention": "joint",
        "head": "released",
        "grn": True,
        "conv_init": "xavier",
    }
    pieces = tuple(getattr(args, name, default) for name, default in defaults.items())  # older runs: defaults
    prior = Prior(config) if pieces == tuple(defaults.values()) else LabPrior(config, *pieces)
    if not args.position_embedding:
        return prior
    kind = "learned" if args.position_embedding is True else args.position_embedding  # runs saved before sincos
    return PositionEmbeddedPrior(prior, height, width, kind)


# --- scores -----------------------------------------------------------------------------------------------------------
class Probe(nn.Module):
    """An MLP reading the five attributes from a (normalised) target."""

    def __init__(self, inputs: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(512, len(CLASSES[name])) for name in ATTRIBUTES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.body(x.flatten(1))
        return [head(h) for head in self.heads]


def train_probe(inputs: torch.Tensor, labels: torch.Tensor, steps: int = 3000, seed: int = 1234) -> Probe:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = Probe(inputs[0].numel())
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(steps):
        index = torch.randint(len(inputs), (256,), generator=generator)
        # training-time noise: the probe must also read slightly imperfect (generated) targets
        x = inputs[index] + 0.1 * torch.randn(inputs[index].shape, generator=generator)
        loss = sum(F.cross_entropy(logits, labels[index, i]) for i, logits in enumerate(probe(x)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe.eval()


@torch.no_grad()
def probe_scores(probe: Probe, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    logits = probe(inputs)
    return {name: float((logits[i].argmax(1) == labels[:, i]).float().mean()) for i, name in enumerate(ATTRIBUTES)}


@torch.no_grad()
def decoded_scores(stage: LabStageC, normalised: torch.Tensor, captions: list[str], seed: int) -> dict[str, float]:
    """Shapes alignment of the images Stage B + A decode from generated (normalised) semantic latents."""
    semantic = stage.denormalise(normalised)
    diffusion = Diffusion(stage.decoder_diffusion_config)
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([
        sample_stage_b(stage.decoder, stage.stage_a, semantic[i : i + 128], (64, 64), diffusion,
                       stage.decoder_sampling_config, generator)
        for i in range(0, len(semantic), 128)
    ])  # fmt: skip
    scores = shapes_alignment(images, captions)
    return {name: scores[name] for name in (*ATTRIBUTES, "all")}


@torch.no_grad()
def generate(stage: LabStageC, text: torch.Tensor, latent_size, sampling: SamplingConfig, seed: int) -> torch.Tensor:
    """Normalised targets for text states, with the framework's Stage C sampler."""
    generator = torch.Generator().manual_seed(seed)
    negative = stage.empty_prompt_states()
    out = [
        sample_stage_c(stage.prior, text[i : i + 256], negative, latent_size, stage.diffusion, sampling, generator)
        for i in range(0, len(text), 256)
    ]
    return torch.cat(out)


def folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": round(v, 4) for k, v in scores.items()}


# --- experiments --------------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[prior_lab] {message}", file=sys.stderr, flush=True)


def record(args, result: dict) -> None:
    line = json.dumps(result, sort_keys=False)
    print(line, flush=True)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def sampling_from(args, guidance: float) -> SamplingConfig:
    t_list = "stage_c_default" if args.sample_steps == 0 else linear_t_list(args.sample_steps)
    return SamplingConfig(sampler=args.sampler, t_list=t_list, guidance_scale=guidance)


def score(args, stage: LabStageC, val: Split, probe: Probe, val_targets: torch.Tensor) -> dict:
    """Probe (and, for semantic latents, decoded alignment) scores of the prior's samples per guidance scale."""
    result = {}
    count = min(args.eval_prompts, len(val))
    labels = val.labels[:count]
    result.update(prefixed("ceiling_probe", probe_scores(probe, stage.normalise(val_targets[:count]), labels)))
    for guidance in args.guidance:
        generated = generate(stage, val.text[:count], val_targets.shape[-2:], sampling_from(args, guidance), args.seed)
        suffix = f"g{guidance:g}"
        result.update(prefixed(f"probe_{suffix}", probe_scores(probe, generated, labels)))
        if args.target == "semantic" and args.decode:
            result.update(
                prefixed(f"align_{suffix}", decoded_scores(stage, generated, val.captions[:count], args.seed))
            )
    return result


def run_train(args) -> None:
    torch.manual_seed(args.seed)
    stage = build_stage(args)
    train, val = load_data(args, stage)
    if args.text == "ideal":
        stage.ideal_text = True
        train.text, val.text = ideal_text(train.captions), ideal_text(val.captions)
    train_targets, val_targets = targets_of(train, args.target), targets_of(val, args.target)
    stage.use_network(network_for(args, stage, train_targets), train_targets.shape[1])
    parameters = sum(p.numel() for p in stage.prior.parameters())
    data = InMemoryData(train_targets, train.text, train.captions, args.batch_size, seed=args.seed)
    ema = EMA(decay=args.ema, start_step=args.ema_start)
    probe = train_probe(stage.normalise_with(train_targets), train.labels, args.probe_steps)
    curve = LearningCurve(ema, probe, val, val_targets, args) if args.eval_every else None
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, callbacks=[ema] + ([curve] if curve else []), logger=False,
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        enable_progress_bar=not args.no_progress, max_epochs=-1,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(stage, datamodule=data)
    minutes = (time.perf_counter() - start) / 60
    with ema.averaged(stage):  # sample the averaged weights, as validation and checkpoints do
        stage.prior.eval()
        run_dir = Path(args.out) / folder_name(args.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = {"args": vars(args), "shape": tuple(train_targets.shape[1:]), "state": stage.prior.state_dict(),
                 "mean": stage.latent_mean, "std": stage.latent_std}  # fmt: skip
        torch.save(saved, run_dir / "prior.pt")
        result = {
            "experiment": "train", "name": args.name, "target": args.target, "network": args.network,
            "parameters": parameters, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "train_minutes": round(minutes, 2), "final_loss": round(float(trainer.callback_metrics["train/loss"]), 4),
        }  # fmt: skip
        result.update(score(args, stage, val, probe, val_targets))
        if curve is not None:
            result["curve"] = curve.points
        record(args, result)


class LearningCurve(L.Callback):
    """Probe scores of the EMA prior's samples (first guidance scale) every ``--eval_every`` steps."""

    def __init__(self, ema: EMA, probe: Probe, val: Split, val_targets: torch.Tensor, args):
        self.ema, self.probe, self.val, self.val_targets, self.args = ema, probe, val, val_targets, args
        self.points: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.args.eval_every:
            return
        count = min(self.args.eval_prompts, len(self.val))
        with self.ema.averaged(pl_module):
            pl_module.prior.eval()
            try:
                sampling = sampling_from(self.args, self.args.guidance[0])
                generated = generate(
                    pl_module, self.val.text[:count], self.val_targets.shape[-2:], sampling, self.args.seed
                )
                scores = probe_scores(self.probe, generated, self.val.labels[:count])
            finally:
                pl_module.prior.train()
        self.points.append({"step": step, **{k: round(v, 3) for k, v in scores.items()}})
        log(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))


def restore(args, stage: LabStageC, path: str) -> None:
    """A prior saved by ``train`` (``prior.pt``) or a Stage C checkpoint of ``fit`` (its EMA prior)."""
    if path.endswith(".ckpt"):
        state = read_checkpoint(path)["state_dict"]
        saved = {"prior": load_prior(path), "mean": state["latent_mean"], "std": state["latent_std"]}
    else:
        saved = torch.load(path, weights_only=False)
    if "prior" not in saved:
        trained = argparse.Namespace(**saved["args"])
        network = network_for(trained, stage, torch.zeros(1, *saved["shape"]))
        network.load_state_dict(saved["state"])
        saved["prior"] = network
    stage.use_network(saved["prior"], saved["mean"].shape[0])
    stage.latent_mean, stage.latent_std = saved["mean"], saved["std"]
    stage.prior.eval()


def run_sdedit(args) -> None:
    """Noise the true held-out latent to t0 and let the prior finish the trajectory (text-conditioned, guided)."""
    stage = build_stage(args)
    train, val = load_data(args, stage)
    restore(args, stage, args.ckpt)
    probe = train_probe(stage.normalise(targets_of(train, "semantic")), train.labels, args.probe_steps)
    count = min(args.eval_prompts, len(val))
    x0 = stage.normalise(val.semantic[:count])
    full = SamplingConfig(t_list="stage_c_default").resolved_t_list()
    for t0 in args.t0:
        ts = [t for t in full if t <= t0]
        if ts[0] != t0:
            ts = [t0, *ts]
        generator = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = stage.diffusion.schedule.add_noise(x0, torch.full((count,), t0), noise)
        for guidance in args.guidance:
            sampling = SamplingConfig(t_list=ts, guidance_scale=guidance)
            text, negative = val.text[:count], stage.empty_prompt_states().expand(count, -1, -1)
            out = stage.diffusion.sample(
                lambda x, t, text=text: stage.prior(x, t, text), x_t, sampling,
                uncond_fn=lambda x, t, negative=negative: stage.prior(x, t, negative), generator=generator,
            )  # fmt: skip
            result = {"experiment": "sdedit", "ckpt": args.ckpt, "t0": t0, "guidance": guidance}
            result.update(prefixed("probe", probe_scores(probe, out, val.labels[:count])))
            if args.decode:
                result.update(prefixed("align", decoded_scores(stage, out, val.captions[:count], args.seed)))
            record(args, result)


def run_sampling(args) -> None:
    stage = build_stage(args)
    train, val = load_data(args, stage)
    restore(args, stage, args.ckpt)
    probe = train_probe(stage.normalise(targets_of(train, args.target)), train.labels, args.probe_steps)
    result = {"experiment": "sampling", "ckpt": args.ckpt, "sampler": args.sampler, "steps": args.sample_steps}
    result.update(score(args, stage, val, probe, targets_of(val, args.target)))
    record(args, result)


def run_locality(args) -> None:
    """How much of what moving the shape changes lands in the latent cells the shape covers.

    For held-out images, the same shape (colour, size, background) is re-rendered at every grid position; per pair
    of positions, the squared change of the latent is split into the cells under the two shapes (their pixel
    coverage resized to the latent grid) and the rest. A local code puts most of the change under the shapes.
    """
    from lit_wuerstchen.data.shapes import _COLOUR_ARRAYS, _pixel_centres, _shape_mask

    stage = build_stage(args)
    compressor = stage.compressor
    rng = np.random.default_rng(args.seed)
    inside, total, global_share = 0.0, 0.0, []
    resolution = 64
    for _ in range(args.locality_samples):
        shape = SHAPES[rng.integers(3)]
        colour, background = rng.choice(len(PALETTE), 2, replace=False)
        ext = SIZES[("small", "medium")[rng.integers(2)]] * resolution
        images, masks = [], []
        for position in range(9):
            cx, cy = ((position % 3) + 0.5) * resolution / 3, ((position // 3) + 0.5) * resolution / 3
            image = np.empty((resolution, resolution, 3), dtype=np.uint8)
            image[:] = _COLOUR_ARRAYS[background]
            centres = _pixel_centres(resolution)
            mask = _shape_mask(shape, centres, centres, cx, cy, ext)
            image[mask] = _COLOUR_ARRAYS[colour]
            images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
            masks.append(torch.from_numpy(mask).float()[None, None])
        with torch.no_grad():
            latents = compressor(torch.stack(images))
        side = latents.shape[-1]
        coverage = [F.adaptive_avg_pool2d(m, side)[0, 0] > 0.05 for m in masks]
        for a in range(9):
            for b in range(a + 1, 9):
                change = (latents[a] - latents[b]).pow(2).sum(0)
                under = coverage[a] | coverage[b]
                inside += float(change[under].sum())
                total += float(change.sum())
                global_share.append(float(change[~under].mean() / change.mean()) if (~under).any() else 0.0)
    record(args, {
        "experiment": "locality", "stage_b": args.stage_b, "latent": list(latents.shape[1:]),
        "share_under_shapes": round(inside / total, 4),
        "change_elsewhere_vs_mean": round(float(np.mean(global_share)), 4),
    })  # fmt: skip


# The runs of docs/toy_alignment.md's tables, by name: `series` trains them two at a time (one thread each) and prints
# the tables. Every run is 3000 steps of the demo's recipe (batch 32, AdamW 2e-3, cosine, EMA 0.99) unless it says.
RELEASED = ["--network", "prior"]
DIT = ["--network", "dit", "--dit_width", "96"]
SERIES: dict[str, list[str]] = {
    # is it the data? the same prior on pixel thumbnails
    "released": RELEASED,
    "released, thumb4": [*RELEASED, "--target", "thumb4"],
    "dit, thumb4": [*DIT, "--target", "thumb4"],
    # is it our prior? a DiT of the same size on the same latents
    "dit": DIT,
    "dit, no positions": [*DIT, "--dit_no_positions"],
    "dit, ideal text": [*DIT, "--text", "ideal"],
    "dit, v target": [*DIT, "--prediction", "v"],
    # which part of the released prior
    "released + learned positions": [*RELEASED, "--position_embedding", "learned"],
    "released + sincos positions": [*RELEASED, "--position_embedding", "sincos"],
    "released + sincos, conv as identity at init": [*RELEASED, "--position_embedding", "sincos",
                                                    "--conv_init", "dirac"],
    "released + sincos, no GRN": [*RELEASED, "--position_embedding", "sincos", "--no_grn"],
    "released + sincos, text cross-attention": [*RELEASED, "--position_embedding", "sincos",
                                                "--text_attention", "separate"],
    "released + sincos, direct noise head": [*RELEASED, "--position_embedding", "sincos", "--head", "direct"],
    "released + sincos, default text init": [*RELEASED, "--position_embedding", "sincos", "--text_init", "default"],
    "released + sincos, no conv (1x1)": [*RELEASED, "--position_embedding", "sincos", "--kernel_size", "1"],
    "released + sincos, no conv (1x1), seed 1": [*RELEASED, "--position_embedding", "sincos", "--kernel_size", "1",
                                                 "--seed", "1"],
    "released + learned positions, no conv (1x1)": [*RELEASED, "--position_embedding", "learned",
                                                    "--kernel_size", "1"],
    # the budget: steps (a learning curve every 1500 steps)
    "dit, 6000 steps": [*DIT, "--steps", "6000", "--eval_every", "1500"],
    "released, 6000 steps": [*RELEASED, "--steps", "6000", "--eval_every", "1500"],
}  # fmt: skip


def run_series(args) -> None:
    """Train every run of :data:`SERIES` (or those ``--only`` names) two at a time, then print the tables."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    names = [name for name in SERIES if not args.only or name in args.only]
    results = Path(args.results).with_name("series.jsonl")
    common = ["--stage_b", args.stage_b, "--shapes", args.shapes, "--out", args.out, "--results", str(results),
              "--threads", "1", "--no_progress", "--guidance", *map(str, args.guidance)]  # fmt: skip

    def train(name: str) -> int:
        command = [sys.executable, __file__, "train", "--name", name, *common, *SERIES[name]]
        log(f"start: {name}")
        with open(Path(args.out) / f"{folder_name(name)}.log", "w") as output:
            code = subprocess.call(command, stdout=output, stderr=subprocess.STDOUT)
        log(f"done ({code}): {name}")
        return code

    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        codes = list(pool.map(train, names))
    if any(codes):
        failed = [name for name, code in zip(names, codes) if code]
        raise SystemExit(f"{len(failed)} run(s) failed: {failed} (logs in {args.out})")
    print_tables(results, names)


def print_tables(results: Path, names: list[str]) -> None:
    """Markdown rows: per run, the probe (no Stage B) and decoded (Stage B + A) scores of every guidance scale."""
    rows = {}
    for line in results.read_text().splitlines():
        record = json.loads(line)
        rows[record["name"]] = record  # the latest run of a name
    print("| run | params | minutes | guidance | probe: bg / colour / shape / position / size | "
          "decoded: bg / colour / shape / position / size |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        record = rows.get(name)
        if record is None:
            continue
        scales = sorted({key.split("_")[1] for key in record if key.startswith("probe_g")})
        for scale in scales:
            probe = " / ".join(f"{record[f'probe_{scale}_{a}']:.2f}" for a in ATTRIBUTES)
            decoded = " / ".join(f"{record[f'align_{scale}_{a}']:.2f}" if f"align_{scale}_{a}" in record else "-"
                                 for a in ATTRIBUTES)  # fmt: skip
            print(
                f"| {name} | {record['parameters'] / 1e6:.2f}M | {record['train_minutes']:.1f} | {scale[1:]} | "
                f"{probe} | {decoded} |"
            )
        for point in record.get("curve", []):
            print(f"|   step {point['step']} | | | | " + " / ".join(f"{point[a]:.2f}" for a in ATTRIBUTES) + " | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("train", "sdedit", "sampling", "locality", "series"))
    parser.add_argument("--stage_b", default=DEFAULT_STAGE_B, help="the Stage B checkpoint (compressor, decoder)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="folder of the shapes set (train-*.tar, val-*.tar)")
    parser.add_argument("--out", default="outputs/prior_lab", help="folder for memoised data and trained priors")
    parser.add_argument("--results", default="outputs/prior_lab/results.jsonl", help="JSON lines appended here")
    parser.add_argument("--name", default=None, help="run name (default: from the settings)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no_progress", action="store_true")
    # what is trained
    parser.add_argument("--target", default="semantic", help="semantic | thumb4 | thumb8 | thumb<N>")
    parser.add_argument("--network", choices=("prior", "dit"), default="prior")
    parser.add_argument("--text", choices=("clip", "ideal"), default="clip", help="the tiny CLIP's states, or ideal")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kernel_size", type=int, default=3, help="the ResBlocks' depthwise conv (1: none)")
    parser.add_argument("--position_embedding", choices=("learned", "sincos"), help="absolute positions (prior)")
    parser.add_argument("--text_init", choices=("released", "default"), default="released")
    parser.add_argument("--text_attention", choices=("joint", "separate"), default="joint")
    parser.add_argument("--head", choices=("released", "direct"), default="released")
    parser.add_argument("--no_grn", dest="grn", action="store_false")
    parser.add_argument("--conv_init", choices=("xavier", "dirac"), default="xavier")
    parser.add_argument("--dit_width", type=int, default=128)
    parser.add_argument("--dit_depth", type=int, default=4)
    parser.add_argument("--dit_heads", type=int, default=4)
    parser.add_argument("--dit_no_positions", action="store_true", help="the DiT without its position embedding")
    # the recipe (defaults: experiments/toy/stage_c.yaml)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--grad_clip", type=float, default=1.0)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--ema_start", type=int, default=200)
    parser.add_argument("--caption_drop", type=float, default=0.05)
    parser.add_argument("--prediction", choices=("eps", "v"), default="eps")
    parser.add_argument("--loss_weight", default="p2_official")
    parser.add_argument("--t_sampler", default="official")
    parser.add_argument("--logsnr_shift", type=float, default=1.0)
    # sampling and scoring
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    parser.add_argument("--sample_steps", type=int, default=0, help="0: the 29-step Stage C list, else linear")
    parser.add_argument("--eval_prompts", type=int, default=256)
    parser.add_argument("--probe_steps", type=int, default=3000, help="training steps of the attribute probe")
    parser.add_argument("--eval_every", type=int, default=0, help="probe the samples every N steps (a curve)")
    parser.add_argument("--no_decode", dest="decode", action="store_false", help="probe scores only")
    parser.add_argument("--ckpt", help="a prior.pt written by `train` (sdedit, sampling)")
    parser.add_argument("--t0", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    parser.add_argument("--locality_samples", type=int, default=32)
    parser.add_argument("--only", nargs="+", help="series: only these runs (names as in SERIES)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.stage_b).exists():
        print(f"no Stage B checkpoint at {args.stage_b}: run `make demo` first or pass --stage_b", file=sys.stderr)
        return 2
    args.name = args.name or f"{args.experiment}-{args.target}-{args.network}-{int(time.time())}"
    experiments = {"train": run_train, "sdedit": run_sdedit, "sampling": run_sampling, "locality": run_locality,
                   "series": run_series}  # fmt: skip
    experiments[args.experiment](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
