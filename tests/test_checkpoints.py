"""The checkpoints module: one-line errors for unusable files, stage records, exports read back through the configs,
and the frozen-part helper of the stages (persistence, device/dtype moves)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import tiny_stage_b, toy_data_args

from lit_wuerstchen.checkpoints import (
    CheckpointError,
    load_stage_a,
    load_stage_b,
    load_weights,
    read_checkpoint,
    read_stage_checkpoint,
    read_state_dict,
)
from lit_wuerstchen.cli import main
from lit_wuerstchen.generation import PipelineConfig
from lit_wuerstchen.models import VQGAN, DiffNeXtConfig, PriorConfig, TextEncoderConfig, VQGANConfig
from lit_wuerstchen.records import FORMAT, StageBRecord, config_from_dict, record_from_dict


class NotAllowed:  # pickled objects of arbitrary classes are refused by weights_only loading
    pass


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_unusable_files_are_one_line_errors_naming_the_file(tmp_path, stage_a_checkpoint):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_stage_a(empty)
    assert str(empty) in one_line(info) and "0 bytes" in str(info.value)

    truncated = tmp_path / "truncated.ckpt"
    data = stage_a_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_stage_a(truncated)
    assert str(truncated) in one_line(info) and "truncated or corrupt" in str(info.value)

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "thing": NotAllowed()}, unsafe)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(unsafe)
    assert str(unsafe) in one_line(info) and "weights_only" in str(info.value)

    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError) as info:
        load_stage_a(plain)
    assert "without a lit_wuerstchen record" in one_line(info)

    with pytest.raises(CheckpointError) as info:
        load_stage_b(tmp_path / "missing.ckpt", needed_by="Stage C")
    assert "Stage B checkpoint not found" in one_line(info) and "Stage C needs a Stage B checkpoint" in str(info.value)


def test_wrong_stage_says_what_was_found_and_what_is_needed(stage_a_checkpoint, stage_b_checkpoint):
    with pytest.raises(CheckpointError) as info:
        load_stage_b(stage_a_checkpoint, needed_by="Stage C")
    assert one_line(info) == f"{stage_a_checkpoint} is a Stage A checkpoint; Stage C needs a Stage B checkpoint"
    with pytest.raises(CheckpointError, match="is a Stage B checkpoint; expected a Stage A checkpoint"):
        load_stage_a(stage_b_checkpoint)


def test_fit_with_a_wrong_checkpoint_exits_2_with_one_line(shapes_dir, stage_a_checkpoint, in_tmp_cwd, capsys):
    code = main(["fit", "-c", "experiments/stage_c.yaml", "-c", "experiments/toy/stage_c.yaml",
                 f"--model.init_args.stage_b_checkpoint={stage_a_checkpoint}", "--trainer.fast_dev_run=1",
                 *toy_data_args(shapes_dir)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {stage_a_checkpoint} is a Stage A checkpoint; Stage C needs a Stage B checkpoint"


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path):
    small = VQGAN(VQGANConfig(channels=[8, 16], encoder_blocks=[1, 1], decoder_blocks=[1, 1], codebook_size=8))
    other = VQGAN(VQGANConfig(channels=[8, 32], encoder_blocks=[1, 1], decoder_blocks=[1, 1], codebook_size=8))
    with pytest.raises(CheckpointError) as info:
        load_weights(small, other.state_dict(), "x.ckpt", "Stage A")
    assert "x.ckpt: the Stage A weights do not match its config" in one_line(info)
    state = small.state_dict()
    state.pop("in_block.1.weight")
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_weights(small, state, "y.ckpt", "Stage A")
    assert "1 missing (e.g. 'in_block.1.weight'), 1 unexpected (e.g. 'extra')" in one_line(info)


def test_safetensors_and_torch_state_dicts_read_alike(tmp_path):
    state = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    import safetensors.torch

    safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        loaded = read_state_dict(tmp_path / name)
        assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], state["a"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors is not a readable safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")


def test_pipeline_config_round_trips_through_its_dataclasses(tmp_path):
    config = PipelineConfig(
        text_encoder=TextEncoderConfig("wuerstchen-tiny-clip", pretrained=None),
        prior=PriorConfig(width=32, depth=1, heads=2, text_channels=64),
        decoder=DiffNeXtConfig(widths=[16, 32], blocks=[1, 1], heads=[0, 2], semantic_levels=[0, 1]),
        stage_a=VQGANConfig(channels=[8, 16]),
        compression=8.0,
        latent_mean=[0.0] * 16,
        latent_std=[1.0] * 16,
        image_size=[32, 32],
    )
    data = json.loads(json.dumps(dataclasses.asdict(config)))
    assert config_from_dict(PipelineConfig, data, "pipeline.json") == config
    data["prior"]["wdith"] = 64
    with pytest.raises(CheckpointError, match=r"pipeline.json: unknown PipelineConfig.prior setting\(s\) \['wdith'\]"):
        config_from_dict(PipelineConfig, data, "pipeline.json")
    del data["prior"]["wdith"]
    data["prior"]["heads"] = 5  # 32 is not divisible by 5: the config's own validation speaks
    with pytest.raises(CheckpointError, match="invalid PipelineConfig.prior: prior width 32 is not divisible"):
        config_from_dict(PipelineConfig, data, "pipeline.json")


def test_frozen_parts_move_with_the_module_and_persist_only_when_asked(stage_a_checkpoint):
    model = tiny_stage_b(stage_a_checkpoint)
    assert set(model.frozen_modules()) == {"stage_a"}
    model = model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.stage_a.parameters())
    model.train()
    assert not model.stage_a.training and model.decoder.training
    # persistent: in state_dict under its name, and loaded back into the frozen part of a fresh module
    state = model.state_dict()
    assert any(k.startswith("stage_a.") for k in state)
    with torch.no_grad():
        state["stage_a.in_block.1.bias"] = state["stage_a.in_block.1.bias"] + 1.0
    fresh = tiny_stage_b(stage_a_checkpoint).to(torch.float64)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.stage_a.state_dict()["in_block.1.bias"], state["stage_a.in_block.1.bias"])
    # a checkpoint without the persistent part is incomplete: strict loading says so
    incomplete = {k: v for k, v in state.items() if not k.startswith("stage_a.")}
    with pytest.raises(RuntimeError, match="Missing key.*stage_a.in_block"):
        fresh.load_state_dict(incomplete)


# --- the typed records (lit_wuerstchen.records) ----------------------------------------------------------------------
def _format_1(record: dict) -> dict:
    """The layout lit_wuerstchen wrote before the typed records: the resume state at the top level."""
    training = record["training"]
    old = {key: value for key, value in record.items() if key != "training"}
    return {**old, "format": 1, "skipped_steps": training["skipped_steps"], "rng_states": training["rng_states"]}


def test_a_stage_b_record_round_trips_and_a_format_1_record_is_upgraded(stage_b_checkpoint, tmp_path):
    checkpoint = read_checkpoint(stage_b_checkpoint)
    stored = checkpoint["lit_wuerstchen"]
    assert stored["format"] == FORMAT and stored["stage"] == "B"
    record = record_from_dict(stored, stage_b_checkpoint)
    assert isinstance(record, StageBRecord) and isinstance(record.decoder, DiffNeXtConfig)
    assert isinstance(record.training.rng_states, list) and len(record.training.rng_states) == 1
    again = record.to_dict()
    assert again.keys() == stored.keys() and again["decoder"] == stored["decoder"]

    old = tmp_path / "format_1.ckpt"
    checkpoint["lit_wuerstchen"] = _format_1(stored)
    checkpoint["lit_wuerstchen"]["skipped_steps"] = 3
    torch.save(checkpoint, old)
    _, upgraded = read_stage_checkpoint(old, "B")
    assert upgraded.training.skipped_steps == 3 and upgraded.decoder == record.decoder
    parts = load_stage_b(old)  # every loader reads the upgraded record
    assert parts.decoder.config == record.decoder


def test_records_of_other_formats_or_with_unknown_keys_are_refused_in_one_line(stage_a_checkpoint, tmp_path):
    checkpoint = read_checkpoint(stage_a_checkpoint)
    stored = checkpoint["lit_wuerstchen"]
    cases = {
        "newer.ckpt": ({**stored, "format": FORMAT + 1}, "upgrade lit_wuerstchen"),
        "ancient.ckpt": ({**stored, "format": 0}, "convert or retrain"),
        "unknown.ckpt": ({**stored, "shiny_new_thing": 1}, "unknown Stage A record setting(s) ['shiny_new_thing']"),
        "nested.ckpt": ({**stored, "vqgan": {**stored["vqgan"], "colour": 1}}, "unknown Stage A record.vqgan"),
        "lacking.ckpt": ({k: v for k, v in stored.items() if k != "vqgan"}, "lacks the required setting(s) ['vqgan']"),
    }
    for name, (record, expected) in cases.items():
        path = tmp_path / name
        torch.save({**checkpoint, "lit_wuerstchen": record}, path)
        with pytest.raises(CheckpointError) as info:
            load_stage_a(path)
        assert str(path) in one_line(info) and expected in str(info.value), name
