import os

# Tests never touch the network: every weight loader must take its offline branch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIT_WUERSTCHEN_OFFLINE", "1")

import torch  # noqa: E402

# CI has 2 cores; tiny models run far faster single-threaded than with threads fighting over them.
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small synthetic shapes set (32 px) shared by the tests that train something."""
    from lit_wuerstchen.data import generate_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(out, num_train=512, num_val=64, resolution=32, seed=0, samples_per_shard=128, progress=False)
    return out


@pytest.fixture()
def in_tmp_cwd(tmp_path, monkeypatch) -> Path:
    """Run in a temporary folder (outputs/ lands there) that still sees the repository's experiments/."""
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    monkeypatch.chdir(tmp_path)
    return tmp_path


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
