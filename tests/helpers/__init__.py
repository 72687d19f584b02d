"""Tiny models, data and trainer settings shared by the tests (the fixtures that build them live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from lit_wuerstchen.data import ShardDataModule
from lit_wuerstchen.diffusion import SamplingConfig
from lit_wuerstchen.models import CompressorConfig, DiffNeXtConfig, VQGANConfig
from lit_wuerstchen.stages import OptimizerConfig, StageA, StageB

REPO = Path(__file__).resolve().parents[2]


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


class RankRecord(L.Callback):
    """What this rank trained on, for tests that run training in other processes: its global and node rank, the
    training shards its data stream owns and the sample keys of every step, written to ``<out>/rank<r>.json`` at the
    end of fit (``--trainer.callbacks`` can name it as ``helpers.RankRecord`` with tests/ on PYTHONPATH)."""

    def __init__(self, out: str):
        self.out = out
        self.keys: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys[trainer.global_step] = list(batch["key"])

    def on_train_end(self, trainer, pl_module):
        dataset = trainer.train_dataloader.dataset
        record = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "shards": dataset.worker_shards(0, 1),  # num_workers=0: the one reader owns all of the rank's shards
            "keys": self.keys,
        }
        Path(self.out).mkdir(parents=True, exist_ok=True)
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
