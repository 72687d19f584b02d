import os

# Tests never touch the network: every weight loader must take its offline branch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIT_WUERSTCHEN_OFFLINE", "1")

import torch  # noqa: E402

# CI has 2 cores; tiny models run far faster single-threaded than with threads fighting over them.
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small synthetic shapes set (32 px) shared by the tests that train something."""
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(
        out, num_train=512, num_val=64, resolution=32, seed=0, samples_per_shard=128, progress=False
    )
    return out


@pytest.fixture()
def in_tmp_cwd(tmp_path, monkeypatch) -> Path:
    """Run in a temporary folder (outputs/ lands there) that still sees the repository's experiments/."""
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and offline mode: a pretrained tag can only fail, at once."""
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LIT_WUERSTCHEN_OFFLINE", "1")
    return cache


def toy_data_args(shapes_dir: Path) -> list[str]:
    """CLI overrides pointing the toy data config at the test shapes set, single-process loading."""
    return [
        f"--data.init_args.train_shards={shapes_dir}/train-{{000000..000003}}.tar",
        f"--data.init_args.val_shards={shapes_dir}/val-000000.tar",
        "--data.init_args.resolution=32",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--data.init_args.shuffle_buffer=64",
    ]


# --- tiny models shared by the stage tests --------------------------------------------------------------------
from lit_wuerstchen.data import ShardDataModule, generate_shapes_dataset  # noqa: E402
from lit_wuerstchen.diffusion import SamplingConfig  # noqa: E402
from lit_wuerstchen.models import CompressorConfig, DiffNeXtConfig, VQGANConfig  # noqa: E402
from lit_wuerstchen.stages import OptimizerConfig, StageA, StageB  # noqa: E402

TINY = VQGANConfig(channels=[16, 32], encoder_blocks=[1, 1], decoder_blocks=[1, 1], codebook_size=64)


def tiny_stage_a(**kwargs) -> StageA:
    kwargs.setdefault("optimizer", OptimizerConfig(lr=2e-3, warmup_steps=0))
    return StageA(vqgan=TINY, **kwargs)


def datamodule(shapes_dir, batches: int = 40) -> ShardDataModule:
    return ShardDataModule(
        train_shards=f"{shapes_dir}/train-{{000000..000003}}.tar",
        val_shards=f"{shapes_dir}/val-000000.tar",
        resolution=32,
        batch_size=8,
        num_workers=0,
        train_batches_per_epoch=batches,
        shuffle_buffer=64,
    )


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


TINY_NETWORK = DiffNeXtConfig(widths=[16, 32], blocks=[1, 1], heads=[0, 2], semantic_levels=[0, 1], r_embedding_dim=16)
TINY_COMPRESSOR = CompressorConfig(backbone="tiny", pretrained=False, tiny_widths=[8, 16])


def tiny_stage_b(stage_a_checkpoint, **kwargs) -> StageB:
    kwargs.setdefault("optimizer", OptimizerConfig(lr=2e-3, warmup_steps=0))
    kwargs.setdefault("validation_sampling", SamplingConfig(sampler="ddim", steps=4))
    return StageB(
        stage_a_checkpoint=str(stage_a_checkpoint),
        compression=8,
        network=TINY_NETWORK,
        compressor=TINY_COMPRESSOR,
        **kwargs,
    )


@pytest.fixture(scope="session")
def stage_a_checkpoint(tmp_path_factory, shapes_dir):
    """A briefly trained tiny Stage A, saved like a real run."""
    path = tmp_path_factory.mktemp("stage_a") / "stage_a.ckpt"
    torch.manual_seed(0)
    model = tiny_stage_a()
    fit = trainer(max_steps=20, limit_val_batches=0)
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=20))
    fit.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def stage_b_checkpoint(tmp_path_factory, shapes_dir, stage_a_checkpoint):
    """A briefly trained tiny Stage B (on the tiny Stage A), saved like a real run."""
    path = tmp_path_factory.mktemp("stage_b") / "stage_b.ckpt"
    torch.manual_seed(0)
    model = tiny_stage_b(stage_a_checkpoint)
    fit = trainer(max_steps=10, limit_val_batches=0)
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=10))
    fit.save_checkpoint(path)
    return path
