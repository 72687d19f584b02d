"""Throughput of the data layer: synthetic generation and ShardDataModule training batches.

Generates a synthetic shapes set into a temporary directory, then measures, in the same run:
  * raw tar reading (``iter_shard``: tar parsing and byte reads, no image decoding) as the reference,
  * webdataset's own tar reader (no decoding) for comparison,
  * ShardDataModule training samples/s (decode + resize + crop + collate) with 0 and 2 workers,
after a warm-up epoch (worker start-up excluded). Usage::

    python benchmarks/loader_throughput.py [--num 4000] [--resolution 64] [--batch_size 64]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

import torch

from lit_wuerstchen.data import ShardDataModule, generate_shapes_dataset, iter_shard


def _train_rate(data_dir: str, resolution: int, batch_size: int, num_workers: int, batches: int) -> float:
    dm = ShardDataModule(
        train_shards=os.path.join(data_dir, "train-*.tar"),
        val_shards=os.path.join(data_dir, "val-*.tar"),
        resolution=resolution,
        batch_size=batch_size,
        num_workers=num_workers,
        train_batches_per_epoch=batches,
        shuffle_buffer=1000,
    )
    loader = dm.train_dataloader()
    for batch in loader:  # warm-up epoch: worker start-up, file cache, shuffle-buffer fill
        dm.on_before_batch_transfer(batch, 0)
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        batch = dm.on_before_batch_transfer(batch, 0)
        n += batch["image"].shape[0]
    rate = n / (time.perf_counter() - t0)
    del loader  # stops persistent workers
    return rate


def _raw_rate(paths: list[str], repeats: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for p in paths:
            for sample in iter_shard(p):
                n += len(sample["png"]) > 0
    return n / (time.perf_counter() - t0)


def _wds_rate(paths: list[str], repeats: int) -> float:
    import webdataset as wds

    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
            n += len(sample["png"]) > 0
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=4000, help="training samples to generate")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader configuration")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"os.cpu_count()={os.cpu_count()} | usable cpus={len(os.sched_getaffinity(0))}")  # fmt: skip
    print(f"software  python {platform.python_version()} | torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        result = generate_shapes_dataset(
            tmp, args.num, 256, args.resolution, seed=0, samples_per_shard=250, progress=False
        )
        gen_rate = (args.num + 256) / result["seconds"]
        print(f"generation: {args.num + 256} samples at {args.resolution}px in {result['seconds']:.2f}s "
              f"= {gen_rate:.0f} samples/s (one process)\n")  # fmt: skip
        paths = [os.path.join(tmp, n) for n in result["shards"]["train"]]
        _raw_rate(paths, 1)  # page cache warm-up
        raw = _raw_rate(paths, 2)
        rows = [
            ("raw tar read, no decode (iter_shard)", raw),
            ("raw tar read, no decode (webdataset)", _wds_rate(paths, 2)),
        ]
        for workers in (0, 2):
            rate = _train_rate(tmp, args.resolution, args.batch_size, workers, args.batches)
            rows.append((f"ShardDataModule train, num_workers={workers}", rate))
    print(f"{'path':<42} {'samples/s':>10} {'vs raw':>8}")
    for name, rate in rows:
        print(f"{name:<42} {rate:>10.0f} {rate / raw:>8.3f}")
    print(f"\n(batch_size={args.batch_size}, {args.batches} timed batches per loader, "
          f"decode+resize+crop to {args.resolution}px)")  # fmt: skip


if __name__ == "__main__":
    main()
