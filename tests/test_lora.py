"""Fine-tuning from a checkpoint and LoRA (peft) on Stages B and C: what trains, what is saved, merging, loading, the
one-line errors, the fine-tune configs."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import datamodule, tiny_stage_b, toy_data_args, trainer

from lit_wuerstchen.callbacks import EMA
from lit_wuerstchen.checkpoints import (
    CheckpointError,
    load_pipeline,
    load_prior,
    load_stage_b,
    network_weights,
    read_checkpoint,
)
from lit_wuerstchen.cli import main
from lit_wuerstchen.diffusion import SamplingConfig
from lit_wuerstchen.errors import ConfigError
from lit_wuerstchen.lora import LoraSettings, is_adapter_key, merge_lora
from lit_wuerstchen.models import PriorConfig, TextEncoderConfig
from lit_wuerstchen.stages import OptimizerConfig, StageC

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
LORA = LoraSettings(rank=4)
TINY_TEXT = TextEncoderConfig(model_name="wuerstchen-tiny-clip", pretrained=None)
TINY_PRIOR = PriorConfig(width=128, depth=2, heads=2, text_channels=64)


def tiny_stage_c(stage_b_checkpoint, network: PriorConfig | None = TINY_PRIOR, **kwargs) -> StageC:
    kwargs.setdefault("optimizer", OptimizerConfig(lr=2e-3))
    return StageC(
        stage_b_checkpoint=str(stage_b_checkpoint),
        network=network,
        text_encoder=TINY_TEXT,
        validation_sampling=SamplingConfig(sampler="ddim", steps=3, guidance_scale=2.0),
        decoder_sampling=SamplingConfig(sampler="ddim", steps=2),
        **kwargs,
    )


def base_key(key: str) -> str:
    """An adapted network's key of a base tensor -> the plain network's key."""
    return key.replace(".base_layer.", ".")


def fit(model, shapes_dir, steps: int, path: Path | None = None, **kwargs):
    run = trainer(max_steps=steps, limit_val_batches=0, callbacks=[EMA(decay=0.5)], **kwargs)
    run.fit(model, datamodule=datamodule(shapes_dir, batches=steps))
    if path is not None:
        run.save_checkpoint(path)
    return run


@pytest.fixture(scope="module")
def base_c(tmp_path_factory, shapes_dir, stage_b_checkpoint) -> Path:
    """A fully trained toy Stage C (EMA on): the base the fine-tunes start from."""
    path = tmp_path_factory.mktemp("base_c") / "stage_c.ckpt"
    torch.manual_seed(0)
    model = tiny_stage_c(stage_b_checkpoint, latent_normalization="measured", normalization_batches=2)
    fit(model, shapes_dir, 4, path)
    return path


@pytest.fixture(scope="module")
def lora_c(tmp_path_factory, shapes_dir, stage_b_checkpoint, base_c):
    """A LoRA fit on ``base_c`` (network adopted from it): ``(model, adapters before the fit, checkpoint path)``."""
    path = tmp_path_factory.mktemp("lora_c") / "lora.ckpt"
    torch.manual_seed(1)
    model = tiny_stage_c(stage_b_checkpoint, network=None, init_checkpoint=str(base_c), lora=LORA)
    before = {k: v.clone() for k, v in model.prior.state_dict().items() if is_adapter_key(k)}
    fit(model, shapes_dir, 3, path)
    return model, before, path


def inputs(config: PriorConfig, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.latent_channels, 4, 4, generator=generator)
    return x, torch.rand(2, generator=generator), torch.randn(2, 7, config.text_channels, generator=generator)


def test_lora_fit_changes_only_the_adapters(lora_c, base_c, capsys):
    model, before, _ = lora_c
    base = network_weights(read_checkpoint(base_c), "prior", True, base_c)  # what training started from: its EMA
    state = model.prior.state_dict()
    frozen = {k: v for k, v in state.items() if not is_adapter_key(k)}
    assert {base_key(k) for k in frozen} == set(base)
    for key, value in frozen.items():
        assert torch.equal(value, base[base_key(key)]), key
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
    assert adapters.keys() == before.keys() and len(adapters) == 2 * 16  # A and B of 8 linear layers per block
    assert all(not torch.equal(adapters[k], before[k]) for k in adapters if ".lora_B." in k)  # B starts at 0
    optimised = {p for group in model.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {p for n, p in model.prior.named_parameters() if is_adapter_key(n)}
    assert all(p.requires_grad == is_adapter_key(n) for n, p in model.prior.named_parameters())


def test_lora_logs_its_trainable_share(base_c, stage_b_checkpoint, caplog):
    with caplog.at_level("INFO"):
        model = tiny_stage_c(stage_b_checkpoint, init_checkpoint=str(base_c), lora=LORA)
    line = next(r.getMessage() for r in caplog.records if "LoRA rank 4" in r.getMessage())
    total = sum(p.numel() for p in model.prior.parameters())
    # per block, rank x (in + out) of: mlp.0 (128 -> 512), mlp.4, mapper (64 -> 256), to_q/k/v/out, cond_mapper.1
    trainable = 2 * 4 * (2 * 640 + 320 + 5 * 256)
    assert (
        line
        == f"LoRA rank 4: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%) in the prior"
    )


def test_adapter_only_checkpoint_is_small_and_names_its_base(lora_c, base_c):
    _, _, path = lora_c
    checkpoint = read_checkpoint(path)
    prior_keys = [k for k in checkpoint["state_dict"] if k.startswith("prior.")]
    assert prior_keys and all(is_adapter_key(k) for k in prior_keys)
    assert checkpoint["ema_state_dict"].keys() == set(prior_keys)  # the EMA averages the adapters only
    record = checkpoint["lit_wuerstchen"]
    assert record["init_checkpoint"] == str(base_c) and record["lora"]["rank"] == 4
    assert record["prior"] == read_checkpoint(base_c)["lit_wuerstchen"]["prior"]
    # No base weights, no optimiser state or average of them: a fraction of the full run's file, once the toy's random
    # text encoder is left out of both (every toy Stage C checkpoint carries it; a pretrained one is not saved).
    sizes = {}
    for name, file in (("lora", path), ("full", base_c)):
        content = read_checkpoint(file)
        content["state_dict"] = {k: v for k, v in content["state_dict"].items() if not k.startswith("text_encoder.")}
        buffer = io.BytesIO()
        torch.save(content, buffer)
        sizes[name] = buffer.tell()
    assert sizes["lora"] < 0.2 * sizes["full"] and path.stat().st_size < base_c.stat().st_size
    adapter_bytes = sum(v.numel() * v.element_size() for k, v in checkpoint["state_dict"].items() if k in prior_keys)
    base = network_weights(read_checkpoint(base_c), "prior", True, base_c)
    prior_bytes = sum(v.numel() * v.element_size() for v in base.values())
    assert adapter_bytes < 0.2 * prior_bytes


def test_merged_prior_equals_the_adapted_one(lora_c, base_c):
    model, _, path = lora_c
    adapted = model.prior.eval()
    adapter = network_weights(read_checkpoint(path), "prior", False, path)  # the trained (not averaged) adapters
    merged = merge_lora(load_prior(base_c), adapter, LORA)
    assert type(merged).__name__ == "Prior" and not any(is_adapter_key(k) for k in merged.state_dict())
    assert merged.state_dict().keys() == load_prior(base_c).state_dict().keys()
    with torch.no_grad():
        for seed in range(3):
            x, r, text = inputs(merged.config, seed)
            difference = (merged(x, r, text) - adapted(x, r, text)).abs().max().item()
            assert difference <= 1e-5, difference
            assert not torch.equal(merged(x, r, text), load_prior(base_c)(x, r, text))  # the adapter did something


def test_pipeline_and_prior_loaders_merge_the_adapters(lora_c, base_c, tmp_path):
    _, _, path = lora_c
    averaged = network_weights(read_checkpoint(path), "prior", True, path)
    expected = merge_lora(load_prior(base_c), averaged, LORA).state_dict()
    pipeline = load_pipeline(path)
    assert pipeline.prior.state_dict().keys() == expected.keys()
    assert all(torch.equal(pipeline.prior.state_dict()[k], v) for k, v in expected.items())
    assert pipeline.config.latent_std == read_checkpoint(base_c)["state_dict"]["latent_std"].tolist()
    loaded = load_prior(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    # a missing base is one line naming it
    checkpoint = read_checkpoint(path)
    checkpoint["lit_wuerstchen"]["init_checkpoint"] = str(tmp_path / "gone.ckpt")
    torch.save(checkpoint, tmp_path / "orphan.ckpt")
    with pytest.raises(CheckpointError, match="Stage C checkpoint not found: .*gone.ckpt") as error:
        load_pipeline(tmp_path / "orphan.ckpt")
    assert "\n" not in str(error.value)


def test_lora_run_resumes_and_reloads(lora_c, base_c, stage_b_checkpoint, shapes_dir):
    model, _, path = lora_c
    saved = network_weights(read_checkpoint(path), "prior", False, path)
    reloaded = StageC.load_from_checkpoint(path, map_location="cpu")
    assert all(torch.equal(reloaded.prior.state_dict()[k], v) for k, v in saved.items())
    resumed = tiny_stage_c(stage_b_checkpoint, init_checkpoint=str(base_c), lora=LORA)
    run = trainer(max_steps=4, limit_val_batches=0, callbacks=[EMA(decay=0.5)])
    run.fit(resumed, datamodule=datamodule(shapes_dir, batches=4), ckpt_path=path)
    assert run.global_step == 4
    base = network_weights(read_checkpoint(base_c), "prior", True, base_c)
    assert all(
        torch.equal(v, base[base_key(k)]) for k, v in resumed.prior.state_dict().items() if not is_adapter_key(k)
    )


def test_full_fine_tune_starts_from_the_checkpoint(base_c, stage_b_checkpoint):
    model = tiny_stage_c(stage_b_checkpoint, network=None, init_checkpoint=str(base_c))  # the checkpoint's network
    checkpoint = read_checkpoint(base_c)
    assert model.prior.config == load_prior(base_c).config and model.prior.config.width == 128
    base = network_weights(checkpoint, "prior", True, base_c)
    assert all(torch.equal(v, base[k]) for k, v in model.prior.state_dict().items())
    assert all(p.requires_grad for p in model.prior.parameters()) and model.prior.training
    assert torch.equal(model.latent_std, checkpoint["state_dict"]["latent_std"])  # its measured normalisation
    assert bool(model.normalization_ready)
    assert model.hparams.network["width"] == 128  # the adopted config is what a reload builds


def test_one_line_errors(base_c, stage_b_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="lora.rank 4 needs model.init_args.init_checkpoint") as error:
        tiny_stage_c(stage_b_checkpoint, lora=LORA)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="Stage C checkpoint not found: .*missing.ckpt") as error:
        tiny_stage_c(stage_b_checkpoint, init_checkpoint=str(tmp_path / "missing.ckpt"))
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="is a Stage B checkpoint"):
        tiny_stage_c(stage_b_checkpoint, init_checkpoint=str(stage_b_checkpoint))
    wider = PriorConfig(width=64, depth=3, heads=2, text_channels=64)
    with pytest.raises(
        ConfigError, match=r"network does not match .*: width 64 \(there: 128\), depth 3 \(there: 2\)"
    ) as error:
        tiny_stage_c(stage_b_checkpoint, network=wider, init_checkpoint=str(base_c))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="lora.rank must be >= 0"):
        LoraSettings(rank=-1)


def test_stage_b_lora_trains_decoder_adapters_and_loads_merged(stage_a_checkpoint, stage_b_checkpoint, shapes_dir):
    path = stage_b_checkpoint.parent / "lora_b.ckpt"
    torch.manual_seed(0)
    model = tiny_stage_b(stage_a_checkpoint, init_checkpoint=str(stage_b_checkpoint), lora=LORA)
    assert set(model.trained_networks()) == {"decoder"} and "compressor" in model.frozen_modules()
    base = load_stage_b(stage_b_checkpoint)
    fit(model, shapes_dir, 2, path)
    for key, value in model.decoder.state_dict().items():
        if not is_adapter_key(key):
            assert torch.equal(value, base.decoder.state_dict()[base_key(key)]), key
    assert all(torch.equal(v, base.compressor.state_dict()[k]) for k, v in model.compressor.state_dict().items())
    checkpoint = read_checkpoint(path)
    decoder_keys = [k for k in checkpoint["state_dict"] if k.startswith("decoder.")]
    assert decoder_keys and all(is_adapter_key(k) for k in decoder_keys)
    assert not any(k.startswith("compressor.") for k in checkpoint["state_dict"])
    assert any(k.startswith("stage_a.") for k in checkpoint["state_dict"])  # Stage A travels, as always
    parts = load_stage_b(path)
    merged = merge_lora(
        load_stage_b(stage_b_checkpoint).decoder, network_weights(checkpoint, "decoder", True, path), LORA
    )
    assert all(torch.equal(parts.decoder.state_dict()[k], v) for k, v in merged.state_dict().items())
    assert parts.decoder.state_dict().keys() == base.decoder.state_dict().keys()
    assert all(torch.equal(parts.compressor.state_dict()[k], v) for k, v in base.compressor.state_dict().items())


@pytest.mark.parametrize("name", ["stage_b_from_v2.yaml", "stage_c_from_v2.yaml"])
def test_finetune_configs_parse(name, capsys):
    config = REPO / "experiments" / "finetune" / name
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    init_args = printed["model"]["init_args"]
    assert init_args["init_checkpoint"].startswith("checkpoints/v2/stage_")
    assert init_args["lora"]["rank"] == 16 and init_args["optimizer"]["lr"] == 1e-4
    assert init_args["network"] is None  # adopted from the init checkpoint
    assert printed["trainer"]["precision"] == "bf16-mixed"


def test_cli_lora_fit_adopts_the_init_network(shapes_dir, stage_b_checkpoint, base_c, in_tmp_cwd, caplog):
    caplog.set_level("INFO")
    code = main(
        [
            "fit",
            "-c",
            "experiments/stage_c.yaml",
            "-c",
            "experiments/toy/stage_c.yaml",
            "--trainer.fast_dev_run=1",
            f"--model.init_args.stage_b_checkpoint={stage_b_checkpoint}",
            f"--model.init_args.init_checkpoint={base_c}",
            "--model.init_args.network=null",  # the toy file's network gives way to the checkpoint's
            "--model.init_args.lora.rank=2",
            "--model.init_args.validation_sampling.t_list=[1.0,0.5,0.0]",
            "--model.init_args.decoder_sampling.steps=2",
            *toy_data_args(shapes_dir),
        ]
    )
    assert code == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA rank 2: "))
    trainable, total = (int(n.replace(",", "")) for n in re.findall(r"[\d,]+(?= trainable| parameters)", line))
    assert total - trainable == sum(p.numel() for p in load_prior(base_c).parameters())  # the base prior, adopted


def test_a_lora_checkpoint_can_be_the_base_of_another(lora_c, stage_b_checkpoint, shapes_dir, tmp_path):
    _, _, path = lora_c
    model = tiny_stage_c(stage_b_checkpoint, network=None, init_checkpoint=str(path), lora=LoraSettings(rank=2))
    base = load_prior(path).state_dict()  # the first adapters merged
    assert all(torch.equal(v, base[base_key(k)]) for k, v in model.prior.state_dict().items() if not is_adapter_key(k))
    fit(model, shapes_dir, 2, tmp_path / "second.ckpt")
    full = tiny_stage_c(stage_b_checkpoint, network=None, init_checkpoint=str(path))  # no LoRA: all of it trains
    assert all(p.requires_grad for p in full.prior.parameters())
    merged = load_prior(tmp_path / "second.ckpt", use_ema=False)  # both adapters merged, one after the other
    with torch.no_grad():
        x, r, text = inputs(merged.config)
        assert (merged(x, r, text) - model.prior.eval()(x, r, text)).abs().max() <= 1e-5
