"""Stage C: frozen parts, normalisation, guidance, the pipeline (size, count, determinism), sample and export."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import datamodule, toy_data_args, trainer

from lit_wuerstchen.callbacks import EMA, SampleWriter, ShapesAlignmentEvaluation
from lit_wuerstchen.checkpoints import CheckpointError, load_pipeline, load_stage_a, read_checkpoint
from lit_wuerstchen.cli import main
from lit_wuerstchen.data import PromptDataModule
from lit_wuerstchen.diffusion import SamplingConfig
from lit_wuerstchen.generation import sample_stage_c
from lit_wuerstchen.models import PriorConfig, TextEncoderConfig
from lit_wuerstchen.stages import OptimizerConfig, StageC

TINY_TEXT = TextEncoderConfig(model_name="wuerstchen-tiny-clip", pretrained=None)
FAST_PRIOR = SamplingConfig(sampler="ddim", steps=3, guidance_scale=2.0)
FAST_DECODER = SamplingConfig(sampler="ddim", steps=2)


def tiny_stage_c(stage_b_checkpoint, **kwargs) -> StageC:
    kwargs.setdefault("optimizer", OptimizerConfig(lr=2e-3))
    return StageC(
        stage_b_checkpoint=str(stage_b_checkpoint),
        network=PriorConfig(width=32, depth=2, heads=2, text_channels=64),
        text_encoder=TINY_TEXT,
        validation_sampling=FAST_PRIOR,
        decoder_sampling=FAST_DECODER,
        **kwargs,
    )


@pytest.fixture(scope="module")
def stage_c_checkpoint(tmp_path_factory, shapes_dir, stage_b_checkpoint):
    path = tmp_path_factory.mktemp("stage_c") / "stage_c.ckpt"
    torch.manual_seed(0)
    model = tiny_stage_c(stage_b_checkpoint, latent_normalization="measured", normalization_batches=2)
    fit = trainer(max_steps=4, limit_val_batches=0, callbacks=[EMA(decay=0.5)])
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=4))
    fit.save_checkpoint(path)
    return path


def test_frozen_parts_stay_frozen_and_out_of_the_checkpoint(shapes_dir, stage_b_checkpoint):
    model = tiny_stage_c(stage_b_checkpoint)
    frozen = {
        name: {k: v.clone() for k, v in module.state_dict().items()} for name, module in model.frozen_modules().items()
    }
    assert set(frozen) == {"compressor", "decoder", "stage_a", "text_encoder"}
    trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=datamodule(shapes_dir, batches=3))
    for name, module in model.frozen_modules().items():
        assert not module.training, name
        assert all(not p.requires_grad for p in module.parameters()), name
        for key, value in module.state_dict().items():
            assert torch.equal(value, frozen[name][key]), f"{name}.{key}"
    # in the checkpoint: the prior, its normalisation and (random, so it must travel along) the text encoder
    assert all(
        key.startswith(("prior.", "latent_", "text_encoder.")) or key == "normalization_ready"
        for key in model.state_dict()
    )
    assert {p for p in model.parameters()} == {p for p in model.prior.parameters()}


def test_measured_normalisation_is_stored_and_standardises(stage_c_checkpoint):
    checkpoint = read_checkpoint(stage_c_checkpoint)
    state = checkpoint["state_dict"]
    assert bool(state["normalization_ready"])
    assert not torch.equal(state["latent_std"], torch.ones_like(state["latent_std"]))
    assert any(key.startswith("text_encoder.") for key in state)  # random text encoder travels with the prior
    assert checkpoint["lit_wuerstchen"]["image_size"] == [32, 32]
    assert checkpoint["lit_wuerstchen"]["stage"] == "C"


def test_v2_normalisation_constants(stage_b_checkpoint):
    model = tiny_stage_c(stage_b_checkpoint, latent_normalization="v2")
    semantic = torch.randn(2, 16, 4, 4)
    expected = (semantic + 1) / 42
    assert torch.allclose((semantic - model.latent_mean[:, None, None]) / model.latent_std[:, None, None], expected)


def test_guidance_one_is_the_conditional_prediction(stage_c_checkpoint):
    pipeline = load_pipeline(stage_c_checkpoint)
    prompts = [
        "a small red circle on a blue background, top left",
        "a large green square on a white background, center",
    ]
    text, _ = pipeline.text_encoder(prompts)
    negative = torch.zeros_like(text[:1])
    calls = []
    hook = pipeline.prior.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs.get("text", args[2] if len(args) > 2 else None)),
        with_kwargs=True,
    )

    def sample(negative_text, guidance):
        config = SamplingConfig(sampler="ddim", steps=3, guidance_scale=guidance)
        return sample_stage_c(
            pipeline.prior,
            text,
            negative_text,
            (4, 4),
            pipeline.prior_diffusion,
            config,
            torch.Generator().manual_seed(0),
        )

    try:
        guided_once = sample(negative, 1.0)
        assert len(calls) == 3 and all(torch.equal(c, text) for c in calls)  # no unconditional evaluations
        assert torch.equal(guided_once, sample(text, 1.0))  # the negative prompt plays no role at scale 1
        calls.clear()
        guided = sample(negative, 4.0)
        assert len(calls) == 6 and not torch.equal(guided, guided_once)
    finally:
        hook.remove()


def test_pipeline_size_count_determinism_and_bad_sizes(stage_c_checkpoint):
    pipeline = load_pipeline(stage_c_checkpoint)
    prompts = ["a small red circle on a blue background, top left"] * 2 + [
        "a large green square on a white background, center"
    ]

    def run(seed, height=32, width=48):
        return pipeline.generate(
            prompts, height, width, FAST_PRIOR, FAST_DECODER, generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = run(0), run(0), run(1)
    assert first.shape == (3, 3, 32, 48)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    with pytest.raises(ValueError, match="cannot make 30x32 images"):
        run(0, height=30, width=32)


def test_sample_command_writes_pngs_and_manifest_and_export_round_trips(stage_c_checkpoint, tmp_path):
    out = tmp_path / "samples"
    args = [
        "--prompt",
        "a small red circle on a blue background, top left",
        "--prompt",
        "a large black triangle on a yellow background, bottom right",
        "--images_per_prompt",
        "2",
        "--batch_size",
        "3",
        "--seed",
        "7",
        "--prior_steps",
        "3",
        "--decoder_steps",
        "2",
        "--prior_sampler",
        "ddim",
        "--decoder_sampler",
        "ddim",
    ]
    assert main(["sample", "--ckpt", str(stage_c_checkpoint), "--out", str(out), *args]) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert [r["prompt"].split()[2] for r in records] == ["red", "red", "black", "black"]
    assert [r["seed"] for r in records] == [7, 7, 7, 8]
    assert all((out / r["path"]).is_file() for r in records)
    assert records[0]["prior_sampling"]["evaluations"] == 3 and records[0]["height"] == 32
    assert len(records[0]["prior_sampling"]["t_list"]) == 4 and records[0]["decoder_sampling"]["sampler"] == "ddim"

    exported = tmp_path / "exported"
    assert main(["export", "--ckpt", str(stage_c_checkpoint), "--out", str(exported)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in exported.iterdir())  # ordinary permissions
    assert main(["export", "--ckpt", str(stage_c_checkpoint), "--out", str(exported)]) == 2  # never overwritten
    # an earlier sample folder is refused before the model is loaded, and replaced when asked
    assert main(["sample", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(out), *args]) == 2
    assert main(["sample", "--ckpt", str(stage_c_checkpoint), "--out", str(out), *args, "--overwrite"]) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4
    out2 = tmp_path / "from_export"
    assert main(["sample", "--ckpt", str(exported), "--out", str(out2), *args]) == 0
    for record in records:  # same weights, same seeds: same pixels
        assert (out2 / record["path"]).read_bytes() == (out / record["path"]).read_bytes()


def test_sample_command_errors_are_one_line(stage_c_checkpoint, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path), "--prompt", "x"]) == 2
    assert "no Stage C checkpoint" in capsys.readouterr().err
    assert (
        main(["sample", "--ckpt", str(stage_c_checkpoint), "--out", str(tmp_path), "--prompt", "x", "--height", "36"])
        == 2
    )
    assert "cannot make 36x32 images" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(stage_c_checkpoint), "--out", str(tmp_path)]) == 2
    (tmp_path / "a_file").write_text("")
    assert main(["sample", "--ckpt", str(stage_c_checkpoint), "--out", str(tmp_path / "a_file"), "--prompt", "x"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_predict_with_prompt_datamodule_and_sample_writer(stage_c_checkpoint, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(
        "a small red circle on a blue background, top left\n\na large green square on a white background, center\n"
    )
    model = StageC.load_from_checkpoint(stage_c_checkpoint, map_location="cpu")
    data = PromptDataModule(prompts_file=str(prompts_file), images_per_prompt=2, batch_size=3, height=32, width=32)
    trainer(callbacks=[SampleWriter(str(tmp_path / "predicted"))]).predict(
        model, datamodule=data, return_predictions=False
    )
    records = [json.loads(line) for line in (tmp_path / "predicted" / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert all((tmp_path / "predicted" / r["path"]).is_file() for r in records)


def test_validation_logs_alignment_scores(shapes_dir, stage_b_checkpoint):
    model = tiny_stage_c(stage_b_checkpoint)
    fit = trainer(limit_val_batches=1, callbacks=[ShapesAlignmentEvaluation()])
    metrics = fit.validate(model, datamodule=datamodule(shapes_dir), verbose=False)[0]
    for name in ("val/loss", "val/align_background", "val/align_colour", "val/align_shape", "val/align_all"):
        assert name in metrics
        assert 0.0 <= metrics[name] <= 1.0 or name == "val/loss"


def test_cli_fast_dev_run(shapes_dir, stage_b_checkpoint, in_tmp_cwd):
    code = main(
        [
            "fit",
            "-c",
            "experiments/stage_c.yaml",
            "-c",
            "experiments/toy/stage_c.yaml",
            "--trainer.fast_dev_run=1",
            f"--model.init_args.stage_b_checkpoint={stage_b_checkpoint}",
            "--model.init_args.normalization_batches=1",
            "--model.init_args.validation_sampling.t_list=[1.0,0.5,0.0]",
            "--model.init_args.decoder_sampling.steps=2",
            *toy_data_args(shapes_dir),
        ]
    )
    assert code == 0


def test_validation_sampling_leaves_the_prior_trainable(stage_b_checkpoint, shapes_dir):
    model = tiny_stage_c(stage_b_checkpoint)
    model.train()
    model.generate(["a small red circle on a blue background, top left"], (32, 32))
    assert model.prior.training
    assert all(p.requires_grad for p in model.prior.parameters())


def test_pipeline_parts_can_be_overridden(stage_c_checkpoint, stage_b_checkpoint, stage_a_checkpoint, tmp_path):
    other_a = load_stage_a(stage_a_checkpoint)
    with torch.no_grad():
        for p in other_a.parameters():
            p.add_(0.01)
    checkpoint = read_checkpoint(stage_a_checkpoint)
    checkpoint.pop("ema_state_dict", None)
    checkpoint["state_dict"] = {f"vqgan.{k}": v for k, v in other_a.state_dict().items()}
    torch.save(checkpoint, tmp_path / "a.ckpt")
    pipeline = load_pipeline(
        stage_c_checkpoint, stage_b_checkpoint=str(stage_b_checkpoint), stage_a_checkpoint=str(tmp_path / "a.ckpt")
    )
    for key, value in other_a.state_dict().items():
        assert torch.equal(pipeline.stage_a.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="Stage B checkpoint not found"):
        load_pipeline(stage_c_checkpoint, stage_b_checkpoint=str(tmp_path / "missing.ckpt"))
