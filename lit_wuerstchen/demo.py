"""``make demo``: the toy pipeline on the built-in synthetic set, on the CPU, in minutes.

Trains toy Stages A -> B -> C through the same commands a user runs
(``fit -c experiments/<stage>.yaml -c experiments/toy/<stage>.yaml``; Stages B and C from the cache that
``data precompute`` with the same configs writes into ``data/cache/toy_<stage>/``) into fixed run folders
``outputs/toy_<stage>/demo/`` (replaced on every demo run), then samples held-out validation prompts into
``outputs/demo/`` and scores them with the shapes alignment metric. Extra arguments are passed to every ``fit``
(e.g. ``--trainer.max_steps=100`` for a quick look).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

from .cli import main_precompute, run_lightning_cli
from .data import iter_shard
from .evaluation import shapes_alignment
from .sample import main_sample

RUN_VERSION = "demo"
STAGES = ("stage_a", "stage_b", "stage_c")
# Stages B and C train from the cache `data precompute` writes: their frozen models run once per image, not per step.
CACHED_STAGES = ("stage_b", "stage_c")
CACHE_DIR = Path("data/cache")
SAMPLES_DIR = Path("outputs/demo")
NUM_PROMPTS = 64


def _fit_stage(stage: str, extra: list[str]) -> dict:
    run_dir = Path("outputs") / f"toy_{stage}" / RUN_VERSION
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a previous demo's checkpoints would be versioned, not replaced
    configs = ["-c", f"experiments/{stage}.yaml", "-c", f"experiments/toy/{stage}.yaml"]
    precompute_minutes = None
    if stage in CACHED_STAGES:
        cache = CACHE_DIR / f"toy_{stage}"
        start = time.perf_counter()
        # --overwrite: the demo's cache is replaced on every demo run, like its run folders
        code = main_precompute([*configs, *extra, "--out", str(cache), "--overwrite"])
        if code:
            raise SystemExit(code)
        precompute_minutes = (time.perf_counter() - start) / 60
        extra = [*extra, f"--data.init_args.cache={cache}"]
    start = time.perf_counter()
    cli = run_lightning_cli(["fit", *configs, f"--trainer.logger.init_args.version={RUN_VERSION}", *extra])
    return {
        "stage": stage,
        "precompute_minutes": precompute_minutes,
        "minutes": (time.perf_counter() - start) / 60,
        "log_dir": Path(cli.trainer.log_dir),
        "metrics": {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")},
        "val_shards": cli.datamodule.val_urls(),
    }


def _held_out_prompts(val_shards: list[str], count: int) -> list[str]:
    """Captions of the synthetic set's validation split (never trained on)."""
    prompts = []
    for shard in val_shards:
        for sample in iter_shard(str(shard)):
            prompts.append(sample["txt"].decode())
            if len(prompts) == count:
                return prompts
    return prompts


def _sample(stage_c_checkpoint: Path, val_shards: list[str]) -> dict:
    prompts_file = SAMPLES_DIR.parent / "demo_prompts.txt"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(_held_out_prompts(val_shards, NUM_PROMPTS)) + "\n")
    start = time.perf_counter()
    code = main_sample(
        [
            "--ckpt",
            str(stage_c_checkpoint),
            "--prompts_file",
            str(prompts_file),
            "--out",
            str(SAMPLES_DIR),
            "--batch_size",
            "16",
            "--seed",
            "0",
            "--overwrite",  # the demo's samples folder is replaced on every demo run
        ]
    )
    if code:
        raise SystemExit(code)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (SAMPLES_DIR / "samples.jsonl").read_text().splitlines()]
    images = [Image.open(SAMPLES_DIR / record["path"]).convert("RGB") for record in records]
    return {
        "seconds_per_image": seconds / len(records),
        "count": len(records),
        "alignment": shapes_alignment(images, [record["prompt"] for record in records]),
    }


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    if not Path("experiments/stage_a.yaml").is_file():
        print("run the demo from the repository root (where experiments/ is)", file=sys.stderr)
        return 2
    total_start = time.perf_counter()
    runs = [_fit_stage(stage, extra) for stage in STAGES]
    sampled = _sample(runs[-1]["log_dir"] / "checkpoints" / "last.ckpt", runs[-1]["val_shards"])

    print("\n=== lit_wuerstchen demo finished ===")
    for run in runs:
        cache = f" (+ {run['precompute_minutes']:.1f} min precompute)" if run["precompute_minutes"] is not None else ""
        print(f"{run['stage']}: {run['minutes']:.1f} min{cache}, logs and checkpoints in {run['log_dir']}")
        for name, value in sorted(run["metrics"].items()):
            print(f"    {name:<26} {value:.4f}")
    print(
        f"samples: {sampled['count']} images of held-out prompts in {SAMPLES_DIR}/ (manifest: samples.jsonl), "
        f"{sampled['seconds_per_image']:.2f} s per image"
    )
    alignment = sampled["alignment"]
    print(
        "shapes alignment: "
        + ", ".join(f"{k} {alignment[k]:.3f}" for k in ("background", "colour", "shape", "position", "size", "all"))
    )
    print(f"total wall time: {(time.perf_counter() - total_start) / 60:.1f} min")
    print("watch the runs: .venv/bin/tensorboard --logdir outputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
