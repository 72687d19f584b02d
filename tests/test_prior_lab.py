"""benchmarks/prior_lab.py (docs/toy_alignment.md's experiments) runs end to end on a tiny Stage B: each experiment
exits 0 and records what it measured, so the tool cannot rot between the times someone needs it."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from helpers import REPO

_spec = importlib.util.spec_from_file_location("prior_lab", REPO / "benchmarks" / "prior_lab.py")
prior_lab = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = prior_lab
_spec.loader.exec_module(prior_lab)

ATTRIBUTES = ("background", "colour", "shape", "position", "size")


@pytest.fixture()
def lab_args(tmp_path, shapes_dir, stage_b_checkpoint) -> list[str]:
    return ["--stage_b", str(stage_b_checkpoint), "--shapes", str(shapes_dir), "--out", str(tmp_path / "lab"),
            "--results", str(tmp_path / "results.jsonl"), "--no_progress", "--eval_prompts", "8",
            "--probe_steps", "50", "--seed", "3"]  # fmt: skip


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]


def test_train_then_sdedit_and_sampling_on_the_trained_prior(tmp_path, lab_args):
    code = prior_lab.main(
        ["train", *lab_args, "--name", "tiny dit", "--network", "dit", "--dit_width", "32", "--dit_depth", "1",
         "--dit_heads", "2", "--steps", "6", "--ema_start", "2", "--guidance", "1", "2", "--eval_every", "3"]
    )  # fmt: skip
    assert code == 0
    (trained,) = records(tmp_path)
    assert trained["experiment"] == "train" and trained["steps"] == 6 and trained["parameters"] > 0
    for prefix in ("ceiling_probe", "probe_g1", "probe_g2", "align_g1", "align_g2"):
        for name in ATTRIBUTES:
            assert 0.0 <= trained[f"{prefix}_{name}"] <= 1.0, (prefix, name)
    assert [point["step"] for point in trained["curve"]] == [3, 6]

    prior_file = tmp_path / "lab" / prior_lab.folder_name("tiny dit") / "prior.pt"
    assert prior_file.is_file()
    sdedit_args = ["--ckpt", str(prior_file), "--t0", "1.0", "0.5", "--guidance", "2"]
    assert prior_lab.main(["sdedit", *lab_args, *sdedit_args]) == 0
    assert prior_lab.main(["sampling", *lab_args, "--ckpt", str(prior_file), "--guidance", "1", "--no_decode"]) == 0
    sdedit = [r for r in records(tmp_path) if r["experiment"] == "sdedit"]
    assert [r["t0"] for r in sdedit] == [1.0, 0.5]
    assert all(0.0 <= r["probe_position"] <= 1.0 for r in sdedit)
    assert records(tmp_path)[-1]["experiment"] == "sampling"


def test_released_prior_on_thumbnails_and_locality(tmp_path, lab_args):
    code = prior_lab.main(
        ["train", *lab_args, "--target", "thumb4", "--width", "32", "--depth", "1", "--heads", "2", "--steps", "4",
         "--position_embedding", "sincos", "--kernel_size", "1"]
    )  # fmt: skip
    assert code == 0
    assert prior_lab.main(["locality", *lab_args, "--locality_samples", "2"]) == 0
    trained, locality = records(tmp_path)
    assert trained["target"] == "thumb4" and "align_g4_position" not in trained  # thumbnails are not decoded
    assert 0.0 <= trained["probe_g4_position"] <= 1.0
    assert 0.0 < locality["share_under_shapes"] <= 1.0


def test_missing_stage_b_is_a_clear_error(tmp_path, capsys):
    assert prior_lab.main(["locality", "--stage_b", str(tmp_path / "none.ckpt")]) == 2
    assert "run `make demo` first" in capsys.readouterr().err
