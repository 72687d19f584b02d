"""Training throughput of the toy stages: full Lightning training steps vs the trained network alone.

For each toy stage (built from ``experiments/<stage>.yaml`` + ``experiments/toy/<stage>.yaml``, so Stages B and C
need the checkpoints ``make demo`` writes), measures in the same run:
  * the reference: forward + backward + AdamW step of the trained network alone on random tensors of the
    training shapes (no data loading, no frozen encoders, no Lightning);
  * the full step: ``Trainer.fit`` with the real data module (2 DataLoader workers), frozen encoders, EMA and
    logging, timed after a warm-up.
The ratio reference/full is the share of a training step spent in the trained network itself.
Usage: python benchmarks/training_throughput.py [--steps 60] [--warmup 10] [--stages stage_a stage_b stage_c]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import lightning as L
import torch
from torch import nn

from lit_wuerstchen.callbacks import EMA
from lit_wuerstchen.checkpoints import CheckpointError
from lit_wuerstchen.cli import run_lightning_cli


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.steps += 1

    def steps_per_second(self) -> float:
        return self.steps / (time.perf_counter() - self.start)


def _reference_inputs(stage: str, model, batch_size: int, image_side: int):
    """(network, function making one loss) for the trained network alone, on random inputs."""
    if stage == "stage_a":
        images = torch.rand(batch_size, 3, image_side, image_side)
        return model.vqgan, lambda: torch.nn.functional.mse_loss(model.vqgan(images)["reconstruction"], images)
    if stage == "stage_b":
        side = image_side // model.stage_a.config.downsampling
        x = torch.randn(batch_size, model.decoder.latent_channels, side, side)
        images = torch.rand(batch_size, 3, image_side, image_side)
        t = torch.rand(batch_size)
        network = nn.ModuleDict(model.trained_networks())
        return network, lambda: model.decoder(x, t, model.compressor(images)).pow(2).mean()
    side = model.compressor.latent_size(image_side)
    x = torch.randn(batch_size, model.prior.latent_channels, *side)
    text = torch.randn(batch_size, model.text_encoder.context_length, model.text_encoder.width)
    t = torch.rand(batch_size)
    return model.prior, lambda: model.prior(x, t, text).pow(2).mean()


def benchmark(stage: str, steps: int, warmup: int) -> dict:
    cli = run_lightning_cli(["-c", f"experiments/{stage}.yaml", "-c", f"experiments/toy/{stage}.yaml"], run=False)
    model, data = cli.model, cli.datamodule
    batch_size, side = data.batch_size, data.resolution

    network, loss_fn = _reference_inputs(stage, model, batch_size, side)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    network.train()
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    reference = steps / (time.perf_counter() - start)

    full = full_step_rate(model, data, steps, warmup)
    return {"stage": stage, "batch": batch_size, "side": side, "reference": reference, "full": full}


def full_step_rate(model, datamodule, steps: int, warmup: int) -> float:
    """Steps/s of ``Trainer.fit`` (EMA, no validation, logger or checkpoints) after ``warmup`` steps."""
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, EMA(decay=0.99)],
    )
    trainer.fit(model, datamodule=datamodule)
    return timer.steps_per_second()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--stages", nargs="+", default=["stage_a", "stage_b", "stage_c"])
    args = parser.parse_args()
    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.platform()} | {platform.machine()} | torch threads {torch.get_num_threads()}")
    rows = []
    for stage in args.stages:
        try:
            rows.append(benchmark(stage, args.steps, args.warmup))
        except CheckpointError as error:  # Stages B and C need the demo's checkpoints
            print(f"{stage}: skipped ({error})")
    print(
        f"\n{'stage':<9} {'batch':>5} {'px':>4} {'network alone (steps/s)':>24} "
        f"{'full step (steps/s)':>20} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['stage']:<9} {r['batch']:>5} {r['side']:>4} {r['reference']:>24.2f} {r['full']:>20.2f} "
            f"{r['full'] / r['reference']:>6.2f}"
        )


if __name__ == "__main__":
    main()
