"""PerfMonitor (``perf/`` in TensorBoard) and the stages' training FLOP counts on meta-device copies."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import datamodule, tiny_stage_a, tiny_stage_b, trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from lit_wuerstchen.callbacks import PerfMonitor
from lit_wuerstchen.callbacks.perf import RichTrainingFlopsSummary, TrainingFlopsSummary
from lit_wuerstchen.errors import ConfigError
from lit_wuerstchen.flops import flop_counter
from lit_wuerstchen.losses import hinge_discriminator_loss, hinge_generator_loss
from lit_wuerstchen.models import PriorConfig, TextEncoderConfig
from lit_wuerstchen.stages import OptimizerConfig, StageC
from lit_wuerstchen.sweep.report import median_value, read_scalars


def first_batch(shapes_dir) -> dict:
    dm = datamodule(shapes_dir, batches=1)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def counted(step) -> int:
    """FLOPs of a real forward + backward on the CPU, with the project's counter (grouped-conv fix: see
    test_benchmarks_gpu_throughput) and the math attention, which every counter sees."""
    counter = flop_counter()
    with sdpa_kernel(SDPBackend.MATH), counter:
        step().backward()
    return counter.get_total_flops()


def test_stage_c_training_flops_equal_a_real_step(shapes_dir, stage_b_checkpoint):
    model = StageC(
        stage_b_checkpoint=str(stage_b_checkpoint),
        network=PriorConfig(width=32, depth=2, heads=2, text_channels=64),
        text_encoder=TextEncoderConfig(model_name="wuerstchen-tiny-clip", pretrained=None),
    )
    batch = first_batch(shapes_dir)
    rng = torch.get_rng_state()
    flops = model.training_flops(batch)
    assert torch.equal(rng, torch.get_rng_state())  # counting draws nothing: a resumed run stays on its stream
    # the real step's loss, on what the frozen compressor and text encoder make of the batch (not counted)
    x0, conditioning = model.diffusion_inputs(batch, train=False)
    real = counted(lambda: model.diffusion.loss(lambda x_t, t: model.prior(x_t, t, **conditioning), x0))
    assert flops == real > 0
    # forward + backward is about 3x the forward alone: the backward was counted
    forward = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), forward, torch.no_grad():
        model.prior(x0, torch.rand(len(x0)), **conditioning)
    assert 2.5 < flops / forward.get_total_flops() < 3.5


def test_stage_b_training_flops_count_decoder_and_compressor(shapes_dir, stage_a_checkpoint):
    model = tiny_stage_b(stage_a_checkpoint)
    batch = first_batch(shapes_dir)
    latents = model.encode_stage_a(batch["image"])  # frozen Stage A: not counted

    def step(train_compressor: bool = True) -> torch.Tensor:
        semantic = model.compressor(batch["image"])
        semantic = semantic if train_compressor else semantic.detach()
        return model.diffusion.loss(lambda x_t, t: model.decoder(x_t, t, semantic), latents)

    # the compressor is trained with the decoder: its backward is part of the step
    rng = torch.get_rng_state()
    flops = model.training_flops(batch)
    assert torch.equal(rng, torch.get_rng_state())
    assert flops == counted(step) > counted(lambda: step(train_compressor=False))


def test_fit_logs_perf_scalars(shapes_dir, stage_a_checkpoint, tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="perf", version="v")
    monitor = PerfMonitor(peak_tflops=0.5)
    fit = trainer(max_steps=6, log_every_n_steps=2, limit_val_batches=0, logger=logger, callbacks=[monitor])
    fit.fit(tiny_stage_b(stage_a_checkpoint), datamodule=datamodule(shapes_dir, batches=6))
    files = read_scalars(tmp_path / "perf" / "v")  # as the sweep report reads a run
    scalars = {tag: events for f in files for tag, events in f.items()}
    logged = {tag: [value for _, _, value in events] for tag, events in scalars.items() if tag.startswith("perf/")}
    assert set(logged) == {
        "perf/samples_per_sec",
        "perf/images_per_sec",
        "perf/tflops_per_sec",
        "perf/mfu",
        "perf/peak_memory_gb",
        "perf/data_wait_fraction",
    }
    for tag, values in logged.items():
        assert len(values) == 3 and all(math.isfinite(v) for v in values), tag  # batches 2, 4, 6
        low = 0.0 if tag == "perf/data_wait_fraction" else 1e-9
        assert all(low <= v for v in values), tag
    assert all(v <= 1 for v in logged["perf/data_wait_fraction"])
    assert logged["perf/images_per_sec"] == logged["perf/samples_per_sec"]
    assert logged["perf/mfu"] == pytest.approx([v / 0.5 for v in logged["perf/tflops_per_sec"]], rel=1e-5)
    # at the steps of the other training curves
    steps = [step for _, step, _ in scalars["perf/samples_per_sec"]]
    assert steps == [1, 3, 5] and set(steps) <= {step for _, step, _ in scalars["train/loss"]}
    assert median_value(files, "perf/images_per_sec") == sorted(logged["perf/images_per_sec"])[1]


class MemoryLogger(Logger):
    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Items(Dataset):
    def __init__(self, delay: float):
        self.delay = delay

    def __len__(self):
        return 64

    def __getitem__(self, index):
        time.sleep(self.delay)
        return torch.randn(16)


class Sleeper(L.LightningModule):
    """A training step of about 40 ms (a stand-in for the device's work)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(16, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(0.04)
        return self.layer(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data_wait(delay: float) -> tuple[list[float], set[str]]:
    logger = MemoryLogger()
    trainer(max_steps=9, log_every_n_steps=4, logger=logger, callbacks=[PerfMonitor()]).fit(
        Sleeper(), DataLoader(Items(delay), batch_size=2)
    )
    perf = [metrics for _, metrics in logger.metrics if "perf/data_wait_fraction" in metrics]
    return [m["perf/data_wait_fraction"] for m in perf], set().union(*perf)


def test_data_wait_fraction_is_high_with_slow_data_and_low_with_fast():
    slow, tags = data_wait(0.04)  # 80 ms per batch of 2 against a 40 ms step
    fast, _ = data_wait(0.0)
    assert len(slow) == len(fast) == 2  # steps 4 and 8 (the clock starts after step 1)
    assert all(0.55 < v <= 1 for v in slow), slow  # 80 / 120 ms
    assert all(0 <= v < 0.2 for v in fast), fast  # the DataLoader's own time, ~0.5 ms
    # a module that counts no FLOPs on a CPU (no peak known): throughput and memory, no TFLOP/s, no MFU
    assert tags == {"perf/samples_per_sec", "perf/images_per_sec", "perf/peak_memory_gb", "perf/data_wait_fraction"}


# --- Stage A's FLOPs, the model summary, the fused AdamW option -------------------------------------------------
def stage_a_step(model, images: torch.Tensor, adversarial: bool) -> torch.Tensor:
    """The loss of StageA.training_step on the real networks (one backward for both players)."""
    out = model.vqgan(images, skip_quantization=torch.rand(len(images)) < 0.5)
    reconstruction = out["reconstruction"]
    loss = torch.nn.functional.mse_loss(reconstruction, images) + out["vq_loss"]
    if model.perceptual_loss is not None:
        loss = loss + model.perceptual_loss(reconstruction, images)
    if adversarial:
        model.discriminator.requires_grad_(False)
        loss = loss + hinge_generator_loss(model.discriminator(reconstruction))
        model.discriminator.requires_grad_(True)
        d_real, d_fake = model.discriminator(images), model.discriminator(reconstruction.detach())
        loss = loss + hinge_discriminator_loss(d_real, d_fake)
    return loss


def test_stage_a_training_flops_equal_a_real_step(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # random stand-in LPIPS backbone weights (test_stage_a)
    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    path = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    batch = {"image": torch.rand(2, 3, 32, 32)}
    plain = tiny_stage_a()
    assert plain.training_flops(batch) == counted(lambda: stage_a_step(plain, batch["image"], False)) > 0
    # from adversarial_start_step the discriminator trains in the same step (global_step is 0 without a trainer)
    model = tiny_stage_a(perceptual_weight=0.1, perceptual_net="squeeze", adversarial_weight=0.1)
    assert not model.training_flops_phase
    without_discriminator = model.training_flops(batch)
    assert without_discriminator == counted(lambda: stage_a_step(model, batch["image"], False))
    assert without_discriminator > plain.training_flops(batch)  # LPIPS: forward on both, backward to the images
    model.hparams.adversarial_start_step = 0
    assert model.training_flops_phase
    assert model.training_flops(batch) == counted(lambda: stage_a_step(model, batch["image"], True))
    assert model.training_flops(batch) > without_discriminator


def test_stage_a_logs_tflops_and_counts_again_when_the_discriminator_starts(shapes_dir):
    torch.manual_seed(0)
    logger, monitor = MemoryLogger(), PerfMonitor()
    model = tiny_stage_a(adversarial_weight=0.1, adversarial_start_step=3)
    trainer(max_steps=6, log_every_n_steps=2, limit_val_batches=0, logger=logger, callbacks=[monitor]).fit(
        model, datamodule=datamodule(shapes_dir, batches=6)
    )
    tflops = [m["perf/tflops_per_sec"] for _, m in logger.metrics if "perf/tflops_per_sec" in m]
    assert len(tflops) == 3 and all(math.isfinite(v) and v > 0 for v in tflops)
    batch = {"image": torch.empty(8, 3, 32, 32)}
    assert monitor._flops_per_batch == model.training_flops(batch)  # the adversarial phase's count at the end
    model.hparams.adversarial_start_step = 10**9
    assert monitor._flops_per_batch > model.training_flops(batch)


def test_model_summary_shows_the_training_flops_of_a_step(shapes_dir, stage_a_checkpoint, caplog):
    torch.manual_seed(0)
    model = tiny_stage_b(stage_a_checkpoint)
    fit = trainer(max_steps=1, limit_val_batches=0, enable_model_summary=True, callbacks=[PerfMonitor()])
    with caplog.at_level("INFO"):
        fit.fit(model, datamodule=datamodule(shapes_dir, batches=1))
    (summary,) = [c for c in fit.callbacks if isinstance(c, ModelSummary)]
    assert isinstance(summary, (TrainingFlopsSummary, RichTrainingFlopsSummary))  # Lightning's, replaced
    assert summary.total_flops == model.training_flops(first_batch(shapes_dir)) > 0
    assert f"on a batch of 8, {summary.total_flops:,} FLOPs" in caplog.text
    # without the summary (enable_model_summary=False) nothing is added
    fit = trainer(max_steps=1, limit_val_batches=0, callbacks=[PerfMonitor()])
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=1))
    assert not [c for c in fit.callbacks if isinstance(c, ModelSummary)]


def test_optimizer_fused_option():
    params = [torch.nn.Parameter(torch.randn(3))]
    # None: fused on CUDA only (on the CPU torch's default: its fused kernel is not bit-identical to it)
    optimizer, _ = OptimizerConfig().build(params)
    assert not optimizer.defaults["fused"]
    cuda = [SimpleNamespace(device=torch.device("cuda"))]
    assert OptimizerConfig().use_fused(cuda) and not OptimizerConfig().use_fused(cuda, scaled_gradients=True)
    assert OptimizerConfig(fused=True).build(params)[0].defaults["fused"]  # torch has a CPU kernel
    assert not OptimizerConfig(fused=False).build(params)[0].defaults["fused"]
    with pytest.raises(ConfigError, match=r"optimizer.fused: true, but torch .* has no fused AdamW for meta"):
        OptimizerConfig(fused=True).build([torch.nn.Parameter(torch.randn(3, device="meta"))])
    with pytest.raises(ConfigError, match="GradScaler"):
        OptimizerConfig(fused=True).build(params, scaled_gradients=True)
    OptimizerConfig(fused=True, grad_clip=None).build(params, scaled_gradients=True)  # no clipping: fine
