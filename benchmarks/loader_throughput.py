"""Throughput of the data layer: tar reading and ShardDataModule training batches, at toy and realistic sizes.

Writes three shard sets into a temporary folder (64 px synthetic shapes as PNG; 256 px and 512 px textured JPEGs,
~30-90 kB like web photos) and measures on each, in the same run:
  * raw tar reading, no image decoding: our reader (``iter_shard``, the stage the loader runs inside webdataset's
    pipeline) and webdataset's own (``wds.WebDataset``, ``tarfile`` underneath);
  * ShardDataModule training samples/s (webdataset pipeline + decode + crop + collate) with 0 and 2 workers, after a
    warm-up epoch (worker start-up excluded);
  * with ``--reference CHECKOUT``: the same training stream with the code of another checkout (e.g. a git worktree of
    the commit before a change), 2 workers, in a subprocess, so the ratio new/reference is measured in this run.
Usage::

    python benchmarks/loader_throughput.py [--sets 64 256 512] [--batches 40] [--reference /tmp/old_checkout]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from lit_wuerstchen.data import ShardDataModule, ShardWriter, generate_shapes_dataset, iter_shard

SET_SIZES = {64: 4000, 256: 2000, 512: 800}  # training samples per set


def _textured_jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A photo-like JPEG: smooth colour fields plus fine noise (compresses like a web image, not like flat shapes)."""
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.normal(0, 12, size=img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_set(folder: str, side: int, count: int) -> float:
    """The shard set of one size; returns the mean image size in kB."""
    if side == 64:
        generate_shapes_dataset(folder, count, 64, 64, seed=0, samples_per_shard=250, progress=False)
        return float("nan")
    rng = np.random.default_rng(side)
    sizes = []
    with ShardWriter(os.path.join(folder, "train-%06d.tar"), 250) as writer:
        for i in range(count):
            data = _textured_jpeg(rng, side)
            sizes.append(len(data))
            writer.write({"__key__": f"s{i:07d}", "jpg": data, "txt": f"a textured image number {i}"})
    return sum(sizes) / len(sizes) / 1000


def train_rate(data_dir: str, resolution: int, batch_size: int, num_workers: int, batches: int) -> float:
    dm = ShardDataModule(
        train_shards=os.path.join(data_dir, "train-*.tar"),
        val_shards=None,
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
        n += dm.on_before_batch_transfer(batch, 0)["image"].shape[0]
    rate = n / (time.perf_counter() - t0)
    del loader  # stops persistent workers
    return rate


def _reference_rate(checkout: str, data_dir: str, resolution: int, batch_size: int, batches: int) -> float:
    env = {**os.environ, "PYTHONPATH": checkout}
    command = [sys.executable, __file__, "--measure", data_dir, str(resolution), str(batch_size), str(batches)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=checkout).stdout
    return float(out.strip().splitlines()[-1])


def _raw_rate(paths: list[str], repeats: int) -> float:
    t0, n = time.perf_counter(), 0
    for _ in range(repeats):
        for p in paths:
            for _sample in iter_shard(p):
                n += 1
    return n / (time.perf_counter() - t0)


def _wds_rate(paths: list[str], repeats: int) -> float:
    import webdataset as wds

    t0, n = time.perf_counter(), 0
    for _ in range(repeats):
        for _sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
            n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, nargs="+", default=[64, 256, 512], choices=sorted(SET_SIZES))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader configuration")
    parser.add_argument("--reference", default=None, help="a checkout whose training stream is the reference")
    parser.add_argument("--measure", nargs=4, metavar=("DIR", "RES", "BATCH", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:  # the --reference subprocess: one training-stream rate with the code on PYTHONPATH
        folder, res, batch, batches = args.measure
        print(train_rate(folder, int(res), int(batch), 2, int(batches)))
        return

    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"os.cpu_count()={os.cpu_count()} | usable cpus={len(os.sched_getaffinity(0))}")  # fmt: skip
    print(f"software  python {platform.python_version()} | torch {torch.__version__}")
    table = []
    for side in args.sets:
        with tempfile.TemporaryDirectory() as folder:
            kb = _write_set(folder, side, SET_SIZES[side])
            paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("train-"))
            _raw_rate(paths, 1)  # page cache warm-up
            raw = _raw_rate(paths, 2)
            rows = [("raw tar read, ours (iter_shard)", raw), ("raw tar read, webdataset's", _wds_rate(paths, 2))]
            rates = {}
            for workers in (0, 2):
                rates[workers] = train_rate(folder, side, args.batch_size, workers, args.batches)
                rows.append((f"train stream, num_workers={workers}", rates[workers]))
            if args.reference:
                ref = _reference_rate(args.reference, folder, side, args.batch_size, args.batches)
                rows.append(("train stream, reference checkout, 2 workers", ref))
                rows.append(("  new / reference (2 workers)", rates[2] / ref))
            label = "shapes PNG" if side == 64 else f"JPEG, mean {kb:.0f} kB"
            table.append((f"{side} px ({label}, {SET_SIZES[side]} samples)", rows, raw))
    for title, rows, raw in table:
        print(f"\n{title}\n{'path':<46} {'samples/s':>10} {'vs raw':>8}")
        for name, rate in rows:
            if name.startswith("  "):
                print(f"{name:<46} {rate:>10.3f}")
            else:
                print(f"{name:<46} {rate:>10.0f} {rate / raw:>8.3f}")
    print(f"\n(batch_size={args.batch_size}, {args.batches} timed batches per loader, decode + crop at the set's size)")


if __name__ == "__main__":
    main()
