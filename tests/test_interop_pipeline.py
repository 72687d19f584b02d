"""The whole text -> image path: our pipeline and diffusers' combined Würstchen pipeline, built from our `export`,
give the same image for the same weights, prompts, t lists and seed (fp32, CPU, tiny random weights)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from test_interop import randomise as randomise_all  # noqa: E402

from lit_wuerstchen.checkpoints import load_pipeline, save_pipeline  # noqa: E402
from lit_wuerstchen.diffusion import SamplingConfig  # noqa: E402
from lit_wuerstchen.generation import PipelineConfig, WuerstchenPipeline  # noqa: E402
from lit_wuerstchen.interop.export import export_diffusers, load_diffusers_pipeline  # noqa: E402
from lit_wuerstchen.interop.keymaps import InteropError  # noqa: E402
from lit_wuerstchen.models import (  # noqa: E402
    VQGAN,
    DiffNeXt,
    DiffNeXtConfig,
    Prior,
    PriorConfig,
    TextEncoder,
    TextEncoderConfig,
    VQGANConfig,
)

PROMPTS = ["a red circle on a blue background", "Two small GREEN squares, top left!"]
PRIOR_T = [1.0, 0.8, 0.6, 0.35, 0.15, 0.0]
DECODER_T = [1.0, 0.66, 0.33, 0.0]
PRIOR_SAMPLING = SamplingConfig(t_list=PRIOR_T, guidance_scale=4.0)
DECODER_SAMPLING = SamplingConfig(t_list=DECODER_T, guidance_scale=2.0)
SIZE = 128  # semantic ceil(128 / 42.67) = 3; Stage B latent int(3 * 10.67) = 32 = 128 / 4 in both frameworks


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """test_interop's random weights; the decoder's semantic projections scaled down besides: a random prior's
    samples are ~85 after the released * 42 - 1, and projections sized for them keep this random decoder in the regime
    a trained one works in (not amplifying float rounding)."""
    randomise_all(module, seed)
    for name, tensor in module.state_dict().items():
        if name.startswith("semantic_mappers."):
            tensor.div_(42)
    return module


def diffusers_image(combined, prompt: str, seed: int) -> torch.Tensor:
    """diffusers' combined pipeline with the test's t lists and guidance (one prompt: its decoder pipeline mis-sizes
    the text batch for more, diffusers 0.42)."""
    with torch.no_grad():
        return combined(
            prompt,
            height=SIZE,
            width=SIZE,
            prior_timesteps=PRIOR_T,
            prior_guidance_scale=4.0,
            decoder_timesteps=DECODER_T,
            decoder_guidance_scale=2.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).images


def tiny_pipeline() -> WuerstchenPipeline:
    text_config = TextEncoderConfig(model_name="wuerstchen-tiny-clip", pretrained=None)
    text_encoder = randomise(TextEncoder(text_config), 1)
    decoder_text_encoder = randomise(TextEncoder(text_config), 2)
    width = text_encoder.width
    prior = randomise(Prior(PriorConfig(width=32, depth=2, heads=2, text_channels=width)), 3)
    decoder_config = DiffNeXtConfig(
        widths=[16, 32],
        blocks=[1, 2],
        heads=[0, 2],
        semantic_levels=[0, 1],
        semantic_proj_channels=width,
        semantic_mappers="per_path",
        semantic_align_corners=True,
        text_channels=width,
    )
    decoder = randomise(DiffNeXt(decoder_config), 4)
    with torch.no_grad():
        # b -> 1 at the output (b = sigmoid(.)): like a trained decoder, which predicts eps ~ x_t at t = 1. At b = 0.5
        # the first step of the released sampler (from alpha_bar 1e-4) amplifies float rounding ~100x in both
        # frameworks alike, and the comparison would measure that, not the two implementations.
        decoder.out[1].bias[decoder.out[1].bias.shape[0] // 2 :] = 8.0
    stage_a = randomise(VQGAN(VQGANConfig(channels=[8, 16], decoder_blocks=[1, 2], residual_block="paella")), 5)
    config = PipelineConfig(
        text_encoder=text_config,
        prior=prior.config,
        decoder=decoder.config,
        stage_a=stage_a.config,
        compression=42.67,
        latent_mean=[-1.0] * 16,
        latent_std=[42.0] * 16,
        prior_sampling=PRIOR_SAMPLING,
        decoder_sampling=DECODER_SAMPLING,
        decoder_text_encoder=text_config,
        semantic_rounding="ceil",
    )
    return WuerstchenPipeline(text_encoder, prior, decoder, stage_a, config, decoder_text_encoder).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pipeline = tiny_pipeline()
    out = export_diffusers(pipeline, tmp_path_factory.mktemp("export") / "diffusers")
    return pipeline, out


def test_whole_pipeline_matches_diffusers_combined(exported):
    pipeline, out = exported
    combined = load_diffusers_pipeline(out)
    combined.set_progress_bar_config(disable=True)
    for seed, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ours = pipeline.generate([prompt], SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        theirs = diffusers_image(combined, prompt, seed)
        assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
        assert 0.05 < ours.std().item()  # a real image, not a constant that would match anything
        assert (ours - theirs).abs().max().item() <= 1e-4
    # another seed gives another image: the comparison is not of two constants
    with torch.no_grad():
        other = pipeline.generate(PROMPTS[-1:], SIZE, SIZE, generator=torch.Generator().manual_seed(99))
    assert (other - theirs).abs().max().item() > 1e-2


def test_export_refuses_existing_folder_and_measured_normalisation(exported, tmp_path):
    pipeline, out = exported
    with pytest.raises(InteropError, match="exists; pass --overwrite"):
        export_diffusers(pipeline, out)
    measured = tiny_pipeline()
    measured.latent_std[0, 3] = 7.0
    with pytest.raises(InteropError, match="per-channel normalisation"):
        export_diffusers(measured, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_our_export_round_trips_a_text_conditioned_decoder(tmp_path):
    """Our own pipeline folder keeps Stage B's text encoder (a fifth part) and samples the same."""
    pipeline = tiny_pipeline()
    loaded = load_pipeline(save_pipeline(pipeline, tmp_path / "ours"))
    assert (tmp_path / "ours" / "decoder_text_encoder.safetensors").is_file()
    with torch.no_grad():
        a = pipeline.generate(PROMPTS[:1], SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        b = loaded.generate(PROMPTS[:1], SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_round_trip_through_the_commands(exported, tmp_path, capsys):
    """export --format diffusers, then convert A, B, C back (text encoders from the pipelines' transformers models):
    the converted checkpoints sample the original pipeline's images."""
    from lit_wuerstchen.cli import main

    pipeline, _ = exported
    ours = save_pipeline(pipeline, tmp_path / "ours")
    out = tmp_path / "diffusers"
    assert main(["export", "--ckpt", str(ours), "--format", "diffusers", "--out", str(out)]) == 0
    ckpt = tmp_path / "v2"
    assert main(["convert", "--stage", "A", "--source", str(out / "decoder"), "--out", str(ckpt / "a.ckpt")]) == 0
    args = ["convert", "--stage", "B", "--source", str(out / "decoder"), "--out", str(ckpt / "b.ckpt")]
    assert main(args + ["--stage_a", str(ckpt / "a.ckpt")]) == 0
    args = ["convert", "--stage", "C", "--source", str(out / "prior"), "--out", str(ckpt / "c.ckpt")]
    assert main(args + ["--stage_b", str(ckpt / "b.ckpt")]) == 0
    printed = capsys.readouterr().out
    assert "text encoder converted from" in printed and "randomly initialised" in printed

    converted = load_pipeline(ckpt / "c.ckpt")
    with torch.no_grad():
        a = pipeline.generate(PROMPTS, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
        b = converted.generate(
            PROMPTS,
            SIZE,
            SIZE,
            prior_sampling=pipeline.config.prior_sampling,
            decoder_sampling=pipeline.config.decoder_sampling,
            generator=torch.Generator().manual_seed(3),
        )
    assert (a - b).abs().max().item() <= 1e-5

    # one-line errors of the commands
    assert main(["convert", "--stage", "C", "--source", str(out / "decoder"), "--out", str(ckpt / "x.ckpt"),
                 "--stage_b", str(ckpt / "b.ckpt")]) == 2  # fmt: skip
    assert "holds no WuerstchenPrior (Stage C); found:" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(ours), "--format", "diffusers", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_export_of_a_model_without_decoder_text_is_refused(tmp_path, capsys):
    import dataclasses

    from lit_wuerstchen.cli import main

    pipeline = tiny_pipeline()
    decoder = DiffNeXt(dataclasses.replace(pipeline.decoder.config, text_channels=0, heads=[0, 0]))
    config = dataclasses.replace(pipeline.config, decoder=decoder.config, decoder_text_encoder=None)
    untexted = WuerstchenPipeline(pipeline.text_encoder, pipeline.prior, decoder, pipeline.stage_a, config)
    ours = save_pipeline(untexted, tmp_path / "ours")
    assert main(["export", "--ckpt", str(ours), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 2
    assert "decoder is text-conditioned" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_fine_tune_a_converted_release_with_lora_and_sample_it_in_diffusers(exported, shapes_dir, in_tmp_cwd):
    """The README's path at toy size: released weights (here: our tiny export) -> convert -> LoRA fine-tune with
    experiments/finetune/stage_c_from_v2.yaml -> export --format diffusers -> diffusers samples what we sample."""
    from helpers import toy_data_args

    from lit_wuerstchen.cli import main

    _, out = exported
    v2 = in_tmp_cwd / "checkpoints" / "v2"
    assert main(["convert", "--stage", "A", "--source", str(out / "decoder"), "--out", str(v2 / "stage_a.ckpt")]) == 0
    assert main(["convert", "--stage", "B", "--source", str(out / "decoder"), "--out", str(v2 / "stage_b.ckpt")]) == 0
    args = ["convert", "--stage", "C", "--source", str(out / "prior"), "--out", str(v2 / "stage_c.ckpt")]
    assert main(args + ["--stage_b", str(v2 / "stage_b.ckpt")]) == 0
    code = main(
        [
            "fit",
            "-c",
            "experiments/finetune/stage_c_from_v2.yaml",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--trainer.precision=32",
            "--trainer.logger.init_args.version=lora",
            "--model.init_args.lora.rank=2",
            "--model.init_args.validation_sampling.t_list=[1.0,0.5,0.0]",
            "--model.init_args.decoder_sampling.steps=2",
            *toy_data_args(shapes_dir),
        ]
    )
    assert code == 0
    lora = in_tmp_cwd / "outputs" / "finetune_stage_c" / "lora" / "checkpoints" / "last.ckpt"
    base_prior = load_pipeline(v2 / "stage_c.ckpt").prior
    ours = load_pipeline(lora)
    changed = [n for n, p in ours.prior.state_dict().items() if not torch.equal(p, base_prior.state_dict()[n])]
    assert changed  # the adapters moved the merged prior
    assert main(["export", "--ckpt", str(lora), "--format", "diffusers", "--out", "finetuned"]) == 0
    combined = load_diffusers_pipeline("finetuned")
    combined.set_progress_bar_config(disable=True)
    with torch.no_grad():
        a = ours.generate(
            PROMPTS[:1], SIZE, SIZE, PRIOR_SAMPLING, DECODER_SAMPLING, generator=torch.Generator().manual_seed(4)
        )
    b = diffusers_image(combined, PROMPTS[0], 4)
    assert (a - b).abs().max().item() <= 1e-4
