"""Runs never lie and never lose work: divergence, preemption, exact resume, atomic data, errors at the door,
input limits, no overwriting. Each test is a row of docs/reliability.md."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import lightning as L
import numpy as np
import pytest
import torch
from helpers import TINY, datamodule, tiny_stage_a
from PIL import Image

from lit_wuerstchen.callbacks import EMA, RunLifecycle
from lit_wuerstchen.checkpoints import read_checkpoint
from lit_wuerstchen.cli import main
from lit_wuerstchen.data import ShardDataModule, ShardWriter, convert_folder, encode_png, read_manifest
from lit_wuerstchen.errors import DivergenceError
from lit_wuerstchen.stages import OptimizerConfig, StageA


class KeyRecorder(L.Callback):
    """The sample keys each training step consumed, by global step (a resumed run overwrites redone steps)."""

    def __init__(self):
        self.keys: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys[trainer.global_step] = list(batch["key"])


class StopAt(L.Callback):
    """Ends fit gracefully after ``step`` (as a preempted run that saved its checkpoint does)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _resumable_fit(shapes_dir, root, max_steps, callbacks, ckpt_path=None, workers=2):
    torch.manual_seed(0)
    model = tiny_stage_a(optimizer=OptimizerConfig(lr=2e-3, warmup_steps=2, decay="cosine"))
    dm = datamodule(shapes_dir, batches=4)
    dm.num_workers = workers
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True)
    fit = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=1, val_check_interval=3, limit_val_batches=1,
        callbacks=[checkpoint, EMA(decay=0.9), *callbacks],
    )  # fmt: skip
    fit.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, fit


def test_a_resumed_run_continues_exactly_where_it_stopped(shapes_dir, tmp_path):
    """Stopped after step 5 (mid-epoch, an odd batch of 2 workers) and resumed: the same batches in the same order,
    the same noise, the same weights and EMA as the uninterrupted run."""
    straight_keys = KeyRecorder()
    straight, _ = _resumable_fit(shapes_dir, tmp_path / "straight", 10, [straight_keys])

    resumed_keys = KeyRecorder()
    _resumable_fit(shapes_dir, tmp_path / "resumed", 10, [resumed_keys, StopAt(5)])
    assert sorted(resumed_keys.keys) == list(range(5))
    resumed, fit = _resumable_fit(
        shapes_dir, tmp_path / "resumed", 10, [resumed_keys], ckpt_path=tmp_path / "resumed" / "last.ckpt"
    )
    assert fit.global_step == 10
    assert resumed_keys.keys == straight_keys.keys  # no sample seen twice or skipped, same order
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    ema_straight = read_checkpoint(tmp_path / "straight" / "last.ckpt")["ema_state_dict"]
    ema_resumed = read_checkpoint(tmp_path / "resumed" / "last.ckpt")["ema_state_dict"]
    assert all(torch.equal(ema_straight[k], ema_resumed[k]) for k in ema_straight)


class Poison(L.Callback):
    """Makes the training loss non-finite at the given steps (a NaN in the inputs)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["image"][0, 0, 0, 0] = float("nan")


def test_divergence_stops_at_the_step_and_writes_no_non_finite_checkpoint(shapes_dir, tmp_path):
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)
    lifecycle = RunLifecycle()
    fit = L.Trainer(accelerator="cpu", devices=1, max_steps=8, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0,
                    callbacks=[checkpoint, EMA(decay=0.9), lifecycle, Poison([3])])  # fmt: skip
    model = tiny_stage_a()
    with pytest.raises(DivergenceError, match=r"diverged: non-finite training at step 3: gradient norm nan, loss nan"):
        fit.fit(model, datamodule=datamodule(shapes_dir, batches=8))
    last = read_checkpoint(tmp_path / "last.ckpt")
    assert last["global_step"] == 3  # the last good state
    for section in ("state_dict", "ema_state_dict"):
        assert all(torch.isfinite(v).all() for v in last[section].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never touched the weights
    assert not (tmp_path / "crash.ckpt").exists()


def test_bad_steps_can_be_skipped_up_to_a_budget(shapes_dir):
    model = StageA(vqgan=TINY, optimizer=OptimizerConfig(lr=2e-3, max_skipped_steps=2))
    fit = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_progress_bar=False,
                    enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                    callbacks=[Poison([1, 4])])  # fmt: skip
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=6))
    assert fit.global_step == 6 and model.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(fit.callback_metrics["train/skipped_steps"]) == 2
    model = StageA(vqgan=TINY, optimizer=OptimizerConfig(lr=2e-3, max_skipped_steps=1))
    with pytest.raises(DivergenceError, match="2 bad step"):
        L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_progress_bar=False,
                  enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                  callbacks=[Poison([1, 4])]).fit(model, datamodule=datamodule(shapes_dir, batches=6))  # fmt: skip


# --- through the command line, as a user or a cluster would run it --------------------------------------------------
TOY_A = ["-c", "experiments/stage_a.yaml", "-c", "experiments/toy/stage_a.yaml",
         "--model.init_args.vqgan.channels=[16,32]", "--model.init_args.vqgan.decoder_blocks=[1,1]",
         "--data.init_args.synthetic_num_train=640", "--data.init_args.synthetic_num_val=32",
         "--data.init_args.batch_size=8", "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false",
         "--trainer.limit_val_batches=1"]  # fmt: skip


def _fit(cwd, *args, wait=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIT_WUERSTCHEN_OFFLINE": "1"}
    command = [sys.executable, "-m", "lit_wuerstchen", "fit", *TOY_A, *args]
    if wait:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_saves_exits_nonzero_and_resumes_into_the_same_run(in_tmp_cwd, signum):
    run = in_tmp_cwd / "outputs" / "toy_stage_a" / "p"
    args = ["--trainer.logger.init_args.version=p", "--checkpoint.every_n_train_steps=2", "--trainer.max_steps=5000"]
    proc = _fit(in_tmp_cwd, *args, wait=False)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    step = read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    resume = run.relative_to(in_tmp_cwd) / "checkpoints" / "last.ckpt"
    assert (
        err.strip().splitlines()[-1]
        == f"error: stopped by a signal after step {step}; resume with --ckpt_path {resume}"
    )
    assert not (run / "DONE").exists()  # preempted is not finished

    # the README's resume recipe: no version given, the run continues in its own folder
    finish = _fit(in_tmp_cwd, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"--trainer.max_steps={step + 3}")
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert sorted(p.name for p in run.parent.iterdir()) == ["p"]
    assert (run / "DONE").read_text().startswith(f"finished at step {step + 3}")
    assert (run / "config.yaml").exists() and (run / "config.resume-1.yaml").exists()


@pytest.mark.timeout(300)
def test_divergence_through_the_cli_exits_1_with_one_line(in_tmp_cwd):
    result = _fit(in_tmp_cwd, "--model.init_args.optimizer.lr=1e6", "--trainer.max_steps=40")
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: diverged: non-finite training at step ") and "gradient norm" in last
    for checkpoint in in_tmp_cwd.glob("outputs/toy_stage_a/*/checkpoints/*.ckpt"):
        state = read_checkpoint(checkpoint)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.timeout(300)
def test_errors_at_the_door_are_short_exit_2_and_build_nothing(in_tmp_cwd, stage_a_checkpoint, capsys):
    def door(*args) -> str:
        try:
            code = main(["fit", *TOY_A, *args])
        except SystemExit as exit_:  # jsonargparse's own parse errors: usage, tip and the error line
            code = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and 1 <= len(err) <= 3, err
        return "\n".join(err)

    assert "data.init_args.resolution=30 is not a size this Stage A model can make: use a positive multiple of 4" in (
        door("--data.init_args.resolution=30")
    )
    assert "missing.ckpt" in door("--ckpt_path=missing.ckpt")
    empty = in_tmp_cwd / "empty.ckpt"
    empty.write_bytes(b"")
    assert "empty (0 bytes)" in door(f"--ckpt_path={empty}")
    assert "max_steps" in door("--trainer.max_steps=many")
    # a Stage B run on a missing Stage A: said before any model is built
    stage_b = ["-c", "experiments/stage_b.yaml", "-c", "experiments/toy/stage_b.yaml"]
    assert main(["fit", *stage_b, "--model.init_args.stage_a_checkpoint=nope.ckpt"]) == 2
    assert "Stage A checkpoint not found: nope.ckpt (Stage B needs" in capsys.readouterr().err
    # an occupied run folder
    run = in_tmp_cwd / "outputs" / "toy_stage_a" / "taken"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("")
    message = door("--trainer.logger.init_args.version=taken")
    assert "already holds a run" in message and "--overwrite_run=true" in message
    assert not list(in_tmp_cwd.glob("data/*/*/manifest.json"))  # nothing was even generated


def test_predict_and_validate_never_replace_a_runs_config(in_tmp_cwd, capsys):
    run = in_tmp_cwd / "outputs" / "toy_stage_a" / "v"
    assert main(["fit", *TOY_A, "--trainer.max_steps=2", "--trainer.logger.init_args.version=v"]) == 0
    config = (run / "config.yaml").read_text()
    assert main(["validate", "-c", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]) == 0
    assert (run / "config.yaml").read_text() == config and not list(run.glob("config.resume*"))


def _generate(directory, resolution, queue):
    dm = ShardDataModule(synthetic_dir=directory, synthetic_num_train=96, synthetic_num_val=8, resolution=resolution,
                         num_workers=0)  # fmt: skip
    dm.prepare_data()
    queue.put((resolution, dm.synthetic_set, read_manifest(dm.synthetic_set)["args"]["resolution"]))


def test_concurrent_runs_never_clobber_each_others_data(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    jobs = [context.Process(target=_generate, args=(str(tmp_path), r, queue)) for r in (16, 24, 16, 24)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    results = [queue.get(timeout=5) for _ in jobs]
    assert all(job.exitcode == 0 for job in jobs)
    assert all(made == wanted for wanted, _, made in results)
    assert len({folder for _, folder, _ in results}) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "16px_n96_v8_s0",
        "24px_n96_v8_s0",
    ]


def test_input_limits_skip_and_count(tmp_path):
    with ShardWriter(tmp_path / "s-%06d.tar", 100) as writer:
        for i in range(12):
            writer.write({"__key__": f"ok{i}", "png": encode_png(np.full((32, 32, 3), i * 20, np.uint8)), "txt": "x"})
        writer.write({"__key__": "tiny", "png": encode_png(np.zeros((1, 1, 3), np.uint8)), "txt": "a 1x1 image"})
        writer.write({"__key__": "chatty", "png": encode_png(np.zeros((32, 32, 3), np.uint8)), "txt": "x" * 100_000})
    spec = str(tmp_path / "s-000000.tar")
    dm = ShardDataModule(train_shards=spec, val_shards=spec, resolution=16, batch_size=4, num_workers=0)
    dm.setup("validate")
    keys = [k for batch in dm.val_dataloader() for k in dm.on_before_batch_transfer(batch, 0)["key"]]
    assert sorted(keys) == sorted(f"ok{i}" for i in range(12))
    counts = dm.error_counts("val")
    assert counts["small_images"] == 1 and counts["long_captions"] == 1 and counts["corrupt_samples"] == 2


def test_data_folder_never_overwrites_and_swaps_in_whole(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, side in enumerate((64, 64, 8)):
        Image.fromarray(np.full((side, side, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text("y" * 5000 if i == 1 else f"image {i}")
    out = tmp_path / "out"
    report = convert_folder(src, out, progress=False)
    assert report["num_written"] == 1 and report["too_small"] == ["2.png"] and report["caption_too_long"] == ["1.png"]
    before = sorted(p.name for p in out.iterdir())
    assert before == ["conversion_report.json", "train-000000.tar"]
    with pytest.raises(ValueError, match="already holds data"):
        convert_folder(src, out, progress=False)
    (src / "1.txt").write_text("now short")
    report = convert_folder(src, out, progress=False, prefix="part", overwrite=True)
    assert report["num_written"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["conversion_report.json", "part-000000.tar"]  # nothing stale
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left behind
