"""The precomputed cache (`data precompute`): what it holds, training from it, resume, sharing, staleness."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import datamodule, tiny_stage_b, toy_data_args, trainer

from lit_wuerstchen.cli import main
from lit_wuerstchen.data import iter_shard
from lit_wuerstchen.data.cache import MANIFEST, cache_shard_urls, check_models
from lit_wuerstchen.data.decoding import ErrorLog, collate, images_to_tensor
from lit_wuerstchen.data.precompute import precompute
from lit_wuerstchen.errors import ConfigError
from lit_wuerstchen.models import PriorConfig
from lit_wuerstchen.models.text_encoder import TextEncoderConfig
from lit_wuerstchen.stages import StageC

TINY_TEXT = TextEncoderConfig(model_name="wuerstchen-tiny-clip", pretrained=None, context_length=16)


def tiny_stage_c(stage_b_checkpoint, **kwargs) -> StageC:
    network = PriorConfig(width=32, depth=2, heads=2, text_channels=64)
    return StageC(stage_b_checkpoint=str(stage_b_checkpoint), network=network, text_encoder=TINY_TEXT, **kwargs)


def cached_datamodule(shapes_dir, cache, **kwargs):
    dm = datamodule(shapes_dir, **kwargs)
    dm.cache = str(cache)
    return dm


def _first_samples(dm, count: int) -> tuple[list, list[str], list[str]]:
    """The first ``count`` training samples of shard 0 as the cache takes them (centre crop)."""
    decoder, errors, items = dm.centre_crop_decoder(), ErrorLog("test"), []
    for sample in iter_shard(dm.train_urls()[0]):
        item = decoder(sample, errors, None)
        if item is not None:
            items.append(item)
        if len(items) == count:
            break
    return [it.image for it in items], [it.caption for it in items], [it.key for it in items]


def _cached_batch(dm, count: int) -> dict:
    """The first ``count`` samples of cache shard 0, collated as the training loader does."""
    decoder = dm._decoder(entries=tuple(dm.cache_manifest["entries"]), image=dm.cache_manifest["keeps_image"])
    errors, items = ErrorLog("test"), []
    for sample in iter_shard(cache_shard_urls(dm.cache, dm.cache_manifest)[0]):
        items.append(decoder(sample, errors, None))
        if len(items) == count:
            break
    batch = collate(items, errors)
    batch.pop("data_errors")
    return batch


@pytest.fixture(scope="module")
def stage_c_cache(tmp_path_factory, shapes_dir, stage_b_checkpoint):
    out = tmp_path_factory.mktemp("cache") / "stage_c"
    manifest = precompute(tiny_stage_c(stage_b_checkpoint), datamodule(shapes_dir), out, batch_size=48, progress=False)
    return out, manifest


def test_stage_c_cache_holds_what_the_frozen_models_make(shapes_dir, stage_b_checkpoint, stage_c_cache):
    out, manifest = stage_c_cache
    assert (
        manifest["complete"]
        and manifest["samples"] == 512
        and manifest["entries"]
        == [
            "semantic",
            "text_hidden",
            "text_pooled",
        ]
    )
    assert json.loads((out / MANIFEST).read_text())["complete"]
    dm = cached_datamodule(shapes_dir, out)
    dm.setup("fit")
    model = tiny_stage_c(stage_b_checkpoint).eval()
    images, captions, keys = _first_samples(dm, 6)
    batch = _cached_batch(dm, 6)
    assert batch["key"] == keys and batch["caption"] == captions and "image" not in batch
    expected = model.cache_entries(images_to_tensor(images), captions)
    for name, value in expected.items():
        assert batch["cache"][name].dtype == torch.float16
        torch.testing.assert_close(batch["cache"][name].float(), value, rtol=2e-3, atol=2e-3)
    # the same loss from the cache as on the fly, with the same draws (caption drops included)
    model.hparams.caption_drop_prob = 0.5
    raw = {"image": images_to_tensor(images), "caption": captions, "key": keys}
    for train in (False, True):
        torch.manual_seed(1)
        from_images = model.diffusion_loss(raw, train, torch.Generator().manual_seed(3))
        torch.manual_seed(1)
        from_cache = model.diffusion_loss(batch, train, torch.Generator().manual_seed(3))
        torch.testing.assert_close(from_cache, from_images, rtol=5e-3, atol=1e-4)


@pytest.mark.timeout(120)
def test_stage_c_trains_from_the_cache_and_refuses_a_stale_one(shapes_dir, stage_b_checkpoint, stage_c_cache, tmp_path):
    out, _ = stage_c_cache
    model = tiny_stage_c(stage_b_checkpoint, latent_normalization="measured", normalization_batches=2)
    fit = trainer(max_steps=3, limit_val_batches=1, val_check_interval=3)
    fit.fit(model, datamodule=cached_datamodule(shapes_dir, out, batches=3))
    assert fit.global_step == 3 and model.image_size == (32, 32)
    # a Stage C whose compressor has other weights than the one that made the cache
    stale = tiny_stage_c(stage_b_checkpoint)
    with torch.no_grad():
        next(iter(stale.compressor.parameters())).add_(0.01)
    with pytest.raises(ConfigError, match="stale: its compressor"):
        trainer(max_steps=1, limit_val_batches=0).fit(stale, datamodule=cached_datamodule(shapes_dir, out))
    # other data settings than the cache was made with
    other = cached_datamodule(shapes_dir, out)
    other.min_image_side = 8
    with pytest.raises(ConfigError, match="min_image_side=16"):
        other.setup("fit")
    # and precompute will not write over a cache of other models without --overwrite
    with pytest.raises(ConfigError, match="--overwrite"):
        precompute(stale, datamodule(shapes_dir), out, progress=False)


def test_a_killed_precompute_resumes_and_ranks_share_the_work(
    shapes_dir, stage_b_checkpoint, stage_c_cache, tmp_path, monkeypatch
):
    reference, _ = stage_c_cache
    model = tiny_stage_c(stage_b_checkpoint)
    calls = {"n": 0}
    real = model.cache_entries

    def dies_in_the_third_shard(images, captions):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # the second batch of the third shard (3 batches of <= 48 per 128 samples)
            raise KeyboardInterrupt  # a kill between two batches
        return real(images, captions)

    out = tmp_path / "cache"
    model.cache_entries = dies_in_the_third_shard
    with pytest.raises(KeyboardInterrupt):
        precompute(model, datamodule(shapes_dir), out, batch_size=48, progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(ConfigError, match="unfinished"):
        cached_datamodule(shapes_dir, out).setup("fit")
    model.cache_entries = real
    # the rest in two processes' shares (no process group needed), each run on its own
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        manifest = precompute(model, datamodule(shapes_dir), out, batch_size=48, progress=False)
        assert manifest["complete"] == (rank == 0)
    for shard in sorted(reference.glob("shard-*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name


@pytest.mark.timeout(120)
def test_stage_b_cache_keeps_the_image_and_trains(shapes_dir, stage_a_checkpoint, tmp_path):
    model = tiny_stage_b(stage_a_checkpoint)
    out = tmp_path / "stage_b"
    manifest = precompute(model, datamodule(shapes_dir), out, batch_size=64, progress=False)
    assert manifest["entries"] == ["latent"] and manifest["keeps_image"]
    dm = cached_datamodule(shapes_dir, out, batches=2)
    dm.setup("fit")
    batch = _cached_batch(dm, 4)
    images, _, keys = _first_samples(dm, 4)
    assert batch["key"] == keys and torch.equal(batch["image"], images_to_tensor(images))
    torch.testing.assert_close(
        batch["cache"]["latent"].float(), model.encode_stage_a(batch["image"]), rtol=2e-3, atol=2e-3
    )
    fit = trainer(max_steps=2, limit_val_batches=0)
    fit.fit(model, datamodule=dm)
    assert fit.global_step == 2
    with pytest.raises(ConfigError, match="holds Stage B inputs; this run trains Stage C"):
        check_models(dm.cache_manifest, dm.cache, "C", {})


@pytest.mark.timeout(300)
def test_precompute_and_fit_through_the_cli(in_tmp_cwd, shapes_dir, stage_b_checkpoint, capsys):
    common = [
        "-c",
        "experiments/stage_c.yaml",
        "-c",
        "experiments/toy/stage_c.yaml",
        f"--model.init_args.stage_b_checkpoint={stage_b_checkpoint}",
        *toy_data_args(shapes_dir),
    ]
    assert main(["data", "precompute", *common, "--out", "cache_c", "--no_progress"]) == 0
    assert "cache complete: 512 samples of Stage C" in capsys.readouterr().out
    assert main(["data", "precompute", *common, "--out", "cache_c", "--no_progress"]) == 0  # done: nothing to redo
    fit = ["fit", *common, "--data.init_args.cache=cache_c", "--trainer.max_steps=2", "--trainer.limit_val_batches=0"]
    assert main([*fit, "--trainer.logger.init_args.version=cached"]) == 0
    # the same settings but 16 px crops: the cache was made for 32 px and is refused in one line, exit 2
    assert main([*fit, "--data.init_args.resolution=16", "--trainer.logger.init_args.version=refused"]) == 2
    assert "was made with data resolution=32" in capsys.readouterr().err
