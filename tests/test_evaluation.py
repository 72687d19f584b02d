"""FID / CLIP-score features, statistics cache, evaluation callbacks in a real tiny fit, and the evaluate CLI.

Offline and fast: Inception is replaced by a fixed random conv net, CLIP by injected encoders or the tiny random
open_clip config shipped with the package (the same random conv net the toy configs use offline).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, datamodule, tiny_stage_a, trainer
from lightning.pytorch.loggers import Logger
from PIL import Image

from lit_wuerstchen.callbacks import EMA, CLIPScoreEvaluation, FIDEvaluation
from lit_wuerstchen.evaluation import features as feats
from lit_wuerstchen.evaluation.features import (
    ClipScorer,
    FeatureExtractor,
    InceptionFeatures,
    RandomConvFeatures,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    load_or_compute_reference_stats,
)

# Tag names are assembled here, never written as a literal pretrained='...' argument (repo check).
B32_TAG = "_".join(["laion2b", "s34b", "b79k"])


def _images(n: int = 160, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Blocky random colour images (edges for the conv features to see)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 8, 8, generator=gen)
    return F.interpolate(small, size=(size, size), mode="nearest")


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, k, groups=3)
    return F.conv2d(out, k.transpose(2, 3), groups=3)


# --- FID ---------------------------------------------------------------------------------------------------------
def test_fid_self_zero_and_monotonic_in_blur_and_noise():
    extractor = RandomConvFeatures()
    assert isinstance(extractor, FeatureExtractor)
    images = _images()
    base = extractor(images)
    mu, sigma = feature_statistics(base)
    assert frechet_distance(base, base) <= 1e-6 * np.trace(sigma)

    blurred = [frechet_distance(base, extractor(_blur(images, s))) for s in (0.5, 1.0, 2.0, 3.0)]
    assert all(a < b for a, b in zip(blurred, blurred[1:])), blurred
    assert blurred[0] > 0

    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=gen)
    noisy = [frechet_distance(base, extractor((images + s * noise).clamp(0, 1))) for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(noisy, noisy[1:])), noisy

    # from statistics == from features; tensors and arrays alike
    other = extractor(_blur(images, 1.0)).numpy()
    assert frechet_distance_from_statistics(mu, sigma, *feature_statistics(other)) == pytest.approx(
        frechet_distance(base, other)
    )


def test_reference_stats_cache_written_once_and_reused(tmp_path):
    path = tmp_path / "stats" / "ref.npz"
    calls = []
    data = np.random.default_rng(0).normal(size=(50, 8))

    def compute():
        calls.append(1)
        return data

    mu1, s1 = load_or_compute_reference_stats(path, compute, extractor="x", key="k1")
    mu2, s2 = load_or_compute_reference_stats(path, compute, extractor="x", key="k1")
    assert len(calls) == 1 and path.is_file()
    np.testing.assert_allclose(mu1, mu2)
    np.testing.assert_allclose(s1, s2)
    stored = feats.read_reference_stats(path)
    assert stored["count"] == 50 and stored["extractor"] == "x" and stored["key"] == "k1"
    assert not list(path.parent.glob("*.tmp*"))  # atomic write left nothing behind
    load_or_compute_reference_stats(path, compute, extractor="x", key="k2")  # another key: recomputed
    assert len(calls) == 2


def test_inception_offline_missing_file_fails_fast_with_path(tmp_path, monkeypatch):
    missing = tmp_path / "inception-2015-12-05.pt"
    monkeypatch.setattr(feats, "default_inception_path", lambda: missing)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="inception-2015-12-05.pt") as err:
        InceptionFeatures()
    assert str(missing) in str(err.value) and "wget" in str(err.value)
    with pytest.raises(RuntimeError, match="nope.pt"):
        InceptionFeatures(tmp_path / "nope.pt")
    assert time.perf_counter() - start < 2.0
    # clean-fid's own location
    assert str(feats.__dict__["INCEPTION_FILENAME"]) == "inception-2015-12-05.pt"


# --- CLIP score --------------------------------------------------------------------------------------------------
def test_clip_scorer_injected_encoders_exact_values():
    # image i -> unit vector along axis 0 scaled; prompt -> a vector at a known angle to it
    angles = {"same": 0.0, "sixty": math.pi / 3, "right": math.pi / 2, "opposite": math.pi, "obtuse": 2 * math.pi / 3}

    def image_encoder(images):
        return torch.tensor([[3.0, 0.0, 0.0]]).repeat(images.shape[0], 1) * images.mean((1, 2, 3)).view(-1, 1).add(1)

    def text_encoder(prompts):
        return torch.stack([torch.tensor([math.cos(angles[p]), math.sin(angles[p]), 0.0]) * 5 for p in prompts])

    scorer = ClipScorer(encoders=(image_encoder, text_encoder))
    prompts = list(angles)
    scores = scorer.score(torch.rand(len(prompts), 3, 8, 8), prompts)
    expected = torch.tensor([100.0, 50.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        scorer.score(torch.rand(2, 3, 8, 8), ["same"])


def test_clip_scorer_tiny_config_and_offline_error(empty_hf_cache, monkeypatch):
    scorer = ClipScorer("wuerstchen-tiny-clip")
    images = torch.rand(3, 3, 48, 40)
    scores = scorer.score(images, ["a red circle", "a blue square", "a green triangle"])
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores >= 0).all() and (scores <= 100).all()
    assert scorer.preprocess(images).shape[-2:] == scorer.image_size
    torch.testing.assert_close(scorer.score(images, ["a red circle"] * 3)[:1], scores[:1])
    import open_clip

    downloads = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: downloads.append(a) or "")
    with pytest.raises(RuntimeError, match="not available"):
        ClipScorer("ViT-B-32", pretrained=B32_TAG)  # offline, not cached: fails at once
    assert downloads == []  # the network was never asked


# --- callbacks in a real tiny fit ----------------------------------------------------------------------------------
class RecordingLogger(Logger):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[int | None, dict]] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


def _toy_scorer():
    def image_encoder(images):
        return torch.cat([images.mean((2, 3)), torch.ones(images.shape[0], 1)], dim=1)

    def text_encoder(prompts):
        return torch.tensor([[float("red" in p), float("green" in p), float("blue" in p), 1.0] for p in prompts])

    return ClipScorer(encoders=(image_encoder, text_encoder))


def test_callbacks_in_tiny_fit_and_validate(shapes_dir, tmp_path, monkeypatch):
    writes = []
    original = feats.write_reference_stats
    monkeypatch.setattr(feats, "write_reference_stats", lambda *a, **k: writes.append(a[0]) or original(*a, **k))
    stats = tmp_path / "fid_ref.npz"
    extractor = RandomConvFeatures()
    fid = FIDEvaluation(
        every_n_steps=2, num_images=16, batch_size=5, reference_stats=str(stats), feature_extractor=extractor
    )
    clip = CLIPScoreEvaluation(every_n_steps=2, num_images=16, scorer=_toy_scorer())
    logger = RecordingLogger()
    torch.manual_seed(0)
    model = tiny_stage_a()
    fit = trainer(
        max_steps=4, limit_val_batches=0, logger=logger, log_every_n_steps=50, callbacks=[EMA(decay=0.9), fid, clip]
    )
    fit.fit(model, datamodule=datamodule(shapes_dir, batches=4))

    assert model.training  # train mode restored after each evaluation
    steps = {name: [s for s, m in logger.records if name in m] for name in ("eval/fid", "eval/clip_score")}
    assert steps == {"eval/fid": [2, 4], "eval/clip_score": [2, 4]}
    values = [m["eval/fid"] for _, m in logger.records if "eval/fid" in m]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert math.isfinite(float(fit.callback_metrics["eval/fid"]))
    assert 0 <= float(fit.callback_metrics["eval/clip_score"]) <= 100
    assert writes == [stats] and stats.is_file()  # reference computed once, at the first evaluation
    assert feats.read_reference_stats(stats)["count"] == 16

    # validate: a fresh callback reuses the statistics on disk and logs through pl_module.log
    fid2 = FIDEvaluation(num_images=16, reference_stats=str(stats), feature_extractor=extractor)
    clip2 = CLIPScoreEvaluation(num_images=16, scorer=_toy_scorer())
    val = trainer(limit_val_batches=1, callbacks=[fid2, clip2])
    result = val.validate(model, datamodule=datamodule(shapes_dir))[0]
    assert writes == [stats]
    assert math.isfinite(result["eval/fid"]) and math.isfinite(result["eval/clip_score"])
    # same seed, same weights, same images: deterministic
    assert fid2.run(val, model) == pytest.approx(result["eval/fid"])


def test_callback_setup_fails_early_without_inception(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(feats, "default_inception_path", lambda: tmp_path / "inception-2015-12-05.pt")
    fit = trainer(max_steps=1, limit_val_batches=0, callbacks=[FIDEvaluation(every_n_steps=1, num_images=4)])
    with pytest.raises(RuntimeError, match="inception-2015-12-05.pt"):
        fit.fit(tiny_stage_a(), datamodule=datamodule(shapes_dir, batches=1))
    assert fit.global_step == 0


def test_random_features_callback_offline(shapes_dir, tmp_path):
    """features="random": no download, its own metric name and cache identity; the extractor is fixed by its seed."""
    images = _images(8)
    assert torch.equal(RandomConvFeatures(seed=3)(images), RandomConvFeatures(seed=3)(images))
    assert not torch.equal(RandomConvFeatures(seed=3)(images), RandomConvFeatures(seed=4)(images))
    state = torch.random.get_rng_state()
    RandomConvFeatures(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # building it leaves the training's random stream alone
    with pytest.raises(ValueError, match="inception"):
        FIDEvaluation(features="clip")

    logger = RecordingLogger()
    fid = FIDEvaluation(every_n_steps=2, num_images=8, features="random", reference_stats=str(tmp_path / "ref.npz"))
    fit = trainer(max_steps=2, limit_val_batches=0, logger=logger, log_every_n_steps=50, callbacks=[fid])
    fit.fit(tiny_stage_a(), datamodule=datamodule(shapes_dir, batches=2))
    logged = [m for _, m in logger.records if "eval/fid_random_features" in m]
    assert len(logged) == 1 and math.isfinite(logged[0]["eval/fid_random_features"])
    assert not any("eval/fid" in m for _, m in logger.records)
    assert feats.read_reference_stats(tmp_path / "ref.npz")["extractor"] == RandomConvFeatures().name


# --- evaluate CLI ------------------------------------------------------------------------------------------------
def _write_samples(shapes_dir, out, n=10):
    from lit_wuerstchen.data.shards import iter_shard, load_rgb

    (out / "images").mkdir(parents=True)
    ref = out.parent / "reference"
    ref.mkdir()
    lines = []
    for i, sample in enumerate(iter_shard(str(shapes_dir / "val-000000.tar"))):
        if i >= 2 * n:
            break
        img = load_rgb(sample["png"])
        if i < n:
            img.save(out / "images" / f"{i:05d}.png")
            lines.append(json.dumps({"index": i, "prompt": sample["txt"].decode(), "path": f"images/{i:05d}.png"}))
        else:
            img.resize((48, 40), Image.BICUBIC).save(ref / f"{i}.jpg")  # other size: fitted to the samples
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return ref


def test_evaluate_cli(shapes_dir, tmp_path, monkeypatch, capsys):
    from lit_wuerstchen.cli import main

    samples = tmp_path / "samples"
    ref = _write_samples(shapes_dir, samples)
    clip_args = ["--clip_model", "wuerstchen-tiny-clip", "--clip_pretrained", "none", "--device", "cpu"]
    evaluate = ["evaluate", "--samples", str(samples), "--fid_features", "random"]

    assert main([*evaluate, "--reference", str(ref), "--batch_size", "4", *clip_args]) == 0
    data = json.loads((samples / "evaluation.json").read_text())
    metrics = data["metrics"]
    assert data["num_samples"] == 10 and data["resolution"] == [32, 32]
    assert math.isfinite(metrics["fid"]["value"]) and metrics["fid"]["num_reference"] == 10
    assert metrics["fid"]["extractor"] == RandomConvFeatures().name
    assert 0 <= metrics["clip_score"]["value"] <= 100
    align = metrics["shapes_alignment"]
    assert align["count"] == 10 and align["all"] >= 0.8  # ground-truth images follow their captions
    assert "fid" in capsys.readouterr().out

    # shard pattern as reference; missing reference -> fid skipped with reason; clip off
    out = tmp_path / "r2.json"
    shards = f"{shapes_dir}/val-000000.tar"
    assert main([*evaluate, "--reference", shards, "--num_reference", "12", "--no_clip", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["fid"]["num_reference"] == 12
    # an existing report is never replaced unless asked
    before = out.read_text()
    assert main(["evaluate", "--samples", str(samples), "--no_clip", "--out", str(out)]) == 2
    assert "r2.json exists" in capsys.readouterr().err and out.read_text() == before
    assert main(["evaluate", "--samples", str(samples), "--no_clip", "--out", str(out), "--overwrite"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert "reference" in metrics["fid"]["skipped"] and "disabled" in metrics["clip_score"]["skipped"]
    assert metrics["shapes_alignment"]["count"] == 10

    # Inception (the default) missing offline: skipped with the path as reason, the rest still written
    monkeypatch.setattr(feats, "default_inception_path", lambda: tmp_path / "inception-2015-12-05.pt")
    args = ["--reference", str(ref), "--no_clip", "--out", str(out), "--overwrite"]
    assert main(["evaluate", "--samples", str(samples), *args]) == 0
    assert "inception-2015-12-05.pt" in json.loads(out.read_text())["metrics"]["fid"]["skipped"]

    # unusable samples folder: one-line error, exit 2
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "samples.jsonl" in err and "\n" not in err


def test_toy_eval_fid_override_appends(capsys):
    import yaml

    from lit_wuerstchen.cli import main

    args = ["fit"] + [
        a
        for c in ("stage_c.yaml", "toy/stage_c.yaml", "toy/eval_fid.yaml")
        for a in ("-c", str(REPO / "experiments" / c))
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    names = [c["class_path"] for c in callbacks]
    fid_path, clip_path = "lit_wuerstchen.callbacks.FIDEvaluation", "lit_wuerstchen.callbacks.CLIPScoreEvaluation"
    assert names.count(fid_path) == 1 and names.count(clip_path) == 1
    assert names.count("lit_wuerstchen.callbacks.ShapesAlignmentEvaluation") == 1
    clip = next(c for c in callbacks if c["class_path"] == clip_path)["init_args"]
    fid = next(c for c in callbacks if c["class_path"] == fid_path)["init_args"]
    assert clip["model_name"] == "wuerstchen-tiny-clip" and clip["num_images"] == 128 and fid["num_images"] == 128
    assert fid["features"] == "random"  # runs offline


@pytest.mark.timeout(120)
def test_callbacks_under_ddp_uneven_shares(shapes_dir, tmp_path):
    """2 CPU processes (gloo): 15 images split 8 + 7, gathered with padding; rank 0 writes the reference."""
    stats = tmp_path / "ref.npz"
    fid = FIDEvaluation(
        every_n_steps=2, num_images=15, reference_stats=str(stats), feature_extractor=RandomConvFeatures()
    )
    clip = CLIPScoreEvaluation(every_n_steps=2, num_images=15, scorer=_toy_scorer())
    torch.manual_seed(0)
    ddp = trainer(
        devices=2,
        strategy="ddp_fork",
        max_steps=2,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[fid, clip],
    )
    ddp.fit(tiny_stage_a(), datamodule=datamodule(shapes_dir, batches=2))
    assert ddp.world_size == 2
    assert math.isfinite(float(ddp.callback_metrics["eval/fid"]))
    assert math.isfinite(float(ddp.callback_metrics["eval/clip_score"]))
    assert feats.read_reference_stats(stats)["count"] == 15


def test_building_random_metric_networks_leaves_the_training_streams_alone():
    callback = CLIPScoreEvaluation(model_name="wuerstchen-tiny-clip", pretrained=None)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    callback.setup(trainer(), None, "fit")
    assert callback.scorer is not None  # a random-initialised tiny CLIP was built...
    assert torch.equal(torch.get_rng_state(), before)  # ...from a forked stream
