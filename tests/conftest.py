import os

# Tests never touch the network: every weight loader must take its offline branch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIT_WUERSTCHEN_OFFLINE", "1")

import torch  # noqa: E402

# CI has 2 cores; tiny models run far faster single-threaded than with threads fighting over them.
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import REPO, datamodule, tiny_stage_a, tiny_stage_b, trainer  # noqa: E402

from lit_wuerstchen.data import generate_shapes_dataset  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small synthetic shapes set (32 px) shared by the tests that train something."""
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(
        out,
        num_train=512,
        num_val=64,
        resolution=32,
        seed=5,
        samples_per_shard=128,
        progress=False,  # not 0
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


@pytest.fixture(scope="session")
def stage_a_checkpoint(tmp_path_factory, shapes_dir):
    """A briefly trained tiny Stage A, saved like a real run."""
    path = tmp_path_factory.mktemp("stage_a") / "stage_a.ckpt"
    torch.manual_seed(101)  # fixture seeds stay apart from the tests' and the production ones (0, 42)
    model = tiny_stage_a()
    fit = trainer(max_steps=20, limit_val_batches=0)
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=20))
    fit.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def stage_b_checkpoint(tmp_path_factory, shapes_dir, stage_a_checkpoint):
    """A briefly trained tiny Stage B (on the tiny Stage A), saved like a real run."""
    path = tmp_path_factory.mktemp("stage_b") / "stage_b.ckpt"
    torch.manual_seed(102)
    model = tiny_stage_b(stage_a_checkpoint)
    fit = trainer(max_steps=10, limit_val_batches=0)
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=10))
    fit.save_checkpoint(path)
    return path
