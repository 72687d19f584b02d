"""Semantic compressor, Stage B and offline weight loading (CPU, random init, no network)."""

from __future__ import annotations

import time

import pytest
import torch

from lit_wuerstchen.checkpoints import build_compressor, load_torchvision_weights
from lit_wuerstchen.models.compressor import CompressorConfig, SemanticCompressor, semantic_latent_size
from lit_wuerstchen.models.diffnext import DiffNeXt, DiffNeXtConfig, perturb_semantic
from lit_wuerstchen.offline import is_offline, torchvision_weights_path


def tiny_compressor(compression: float = 42.67, **kwargs) -> SemanticCompressor:
    return SemanticCompressor(CompressorConfig(**{"backbone": "tiny", "pretrained": False, **kwargs}), compression)


def diffnext(**kwargs) -> DiffNeXt:
    return DiffNeXt(DiffNeXtConfig(**kwargs))


TINY_B = dict(widths=(16, 32, 64), blocks=(1, 1, 1), heads=(0, 2, 4), semantic_levels=(1, 2), patch_size=2)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops on a shared 2-core box: intra-op threading makes them ~100x slower under contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------- compressor


@pytest.mark.parametrize(
    "image_size, compression, expected",
    [
        (1024, 42.67, (24, 24)),
        (512, 42.67, (12, 12)),
        (768, 32.0, (24, 24)),
        (64, 16, (4, 4)),
        ((64, 48), 16, (4, 3)),
        (8, 16, (1, 1)),  # 0.5 rounds half up
        (40, 16, (3, 3)),  # 2.5 rounds half up (Python's round would give 2)
        (4, 16, (1, 1)),  # never below 1
        ((1024, 640), 42.67, (24, 15)),
    ],
)
def test_latent_size_rounding_rule(image_size, compression, expected):
    assert semantic_latent_size(image_size, compression) == expected


@pytest.mark.parametrize(
    "image_hw, compression",
    [((64, 64), 16), ((64, 64), 8), ((96, 64), 16), ((50, 70), 10.5), ((32, 32), 32)],
)
def test_tiny_compressor_shapes(image_hw, compression):
    model = tiny_compressor(compression, latent_channels=16, tiny_widths=[8, 16])
    assert model.stride == 4
    images = torch.rand(2, 3, *image_hw)
    out = model(images)
    assert out.shape == (2, 16, *model.latent_size(image_hw))
    assert model.input_size(image_hw) == tuple(s * 4 for s in model.latent_size(image_hw))


def test_tiny_compressor_default_stride_and_batchnorm():
    model = tiny_compressor(16)
    assert model.stride == 8 and model.feature_channels == 128
    assert model.norm.weight is None  # affine-free by default (Stable Cascade)
    assert tiny_compressor(affine_norm=True).norm.weight is not None
    model.eval()
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 16, 4, 4)


def test_efficientnet_compressor_random_init_forward():
    model = SemanticCompressor(CompressorConfig("efficientnet_v2_s", pretrained=False), compression=16).eval()
    assert model.stride == 32
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 48))  # resized to 128 x 96 -> latent 4 x 3
    assert out.shape == (1, 16, 4, 3)


def test_paper_scale_compressor_resize_rule():
    with torch.device("meta"):
        model = SemanticCompressor(CompressorConfig("efficientnet_v2_s"))
    assert model.latent_size(1024) == (24, 24)
    assert model.input_size(1024) == (768, 768)
    assert 19e6 < _count(model) < 22e6, _count(model)  # EfficientNetV2-S features (~20.2M) + 1x1 conv


def test_compressor_config_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        CompressorConfig("resnet50")
    with pytest.raises(ValueError, match="compression"):
        tiny_compressor(compression=0)
    with pytest.raises(ValueError, match="pretrained"):
        CompressorConfig("tiny", pretrained=True)


def test_pretrained_offline_missing_file_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LIT_WUERSTCHEN_OFFLINE", raising=False)
    assert is_offline()

    def no_network(*args, **kwargs):  # any download attempt is a test failure
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        build_compressor(CompressorConfig("efficientnet_v2_s", pretrained=True), 42.67)
    assert time.perf_counter() - start < 20
    message = str(info.value)
    assert str(tmp_path) in message and "checkpoints" in message
    assert "efficientnet_v2_s" in message and "pretrained=False" in message


def test_is_offline_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LIT_WUERSTCHEN_OFFLINE", raising=False)
    assert not is_offline()
    monkeypatch.setenv("LIT_WUERSTCHEN_OFFLINE", "True")
    assert is_offline()
    monkeypatch.setenv("LIT_WUERSTCHEN_OFFLINE", "0")
    assert not is_offline()


def test_weights_path_uses_torch_home(tmp_path, monkeypatch):
    class FakeWeights:
        url = "https://example.invalid/models/some_model-0123abcd.pth"

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torchvision_weights_path(FakeWeights) == tmp_path / "hub" / "checkpoints" / "some_model-0123abcd.pth"


def test_local_weights_file_is_loaded(tmp_path, monkeypatch):
    class FakeWeights:
        url = "https://example.invalid/models/tiny-0123abcd.pth"

        @staticmethod
        def get_state_dict(*args, **kwargs):
            raise AssertionError("tried to download")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = torchvision_weights_path(FakeWeights)
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(load_torchvision_weights(FakeWeights)["w"], torch.ones(2))


# -------------------------------------------------------------------------------------------------------------- stage B


def _inputs(batch=2, side=16, semantic_hw=(4, 4), text=None):
    args = [torch.randn(batch, 4, side, side), torch.rand(batch), torch.randn(batch, 16, *semantic_hw)]
    if text:
        args.append(torch.randn(batch, 5, text))
    return args


def _perturb_output_layer(model: DiffNeXt) -> None:
    torch.nn.init.normal_(model.out[1].weight, std=0.1)


def test_stage_b_shape_and_initial_output():
    model = diffnext(**TINY_B)
    x_t, r, semantic = _inputs()
    out = model(x_t, r, semantic)
    assert out.shape == x_t.shape
    torch.testing.assert_close(out, x_t / 0.5)  # zero-initialised output conv: a = 0, b = 0.5


@pytest.mark.parametrize("semantic_hw", [(1, 1), (3, 5), (4, 4), (24, 24)])
def test_stage_b_any_semantic_size_and_rect_latent(semantic_hw):
    model = diffnext(**TINY_B)
    x_t = torch.randn(1, 4, 16, 24)
    assert model(x_t, torch.rand(1), torch.randn(1, 16, *semantic_hw)).shape == x_t.shape


def test_semantic_latent_influences_output():
    model = diffnext(**TINY_B).eval()
    _perturb_output_layer(model)
    x_t, r, semantic = _inputs()
    with torch.no_grad():
        a = model(x_t, r, semantic)
        b = model(x_t, r, semantic + torch.randn_like(semantic))
        c = model(x_t, r, torch.zeros_like(semantic))
    assert not torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-5)


def test_text_conditioning_path():
    model = diffnext(**TINY_B, text_channels=8).eval()
    _perturb_output_layer(model)
    x_t, r, semantic, text = _inputs(text=8)
    with torch.no_grad():
        a = model(x_t, r, semantic, text)
        b = model(x_t, r, semantic, torch.randn_like(text))
        c = model(x_t, r, semantic)  # text is optional
    assert a.shape == x_t.shape and c.shape == x_t.shape
    assert not torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="text_channels=0"):
        diffnext(**TINY_B)(x_t, r, semantic, text)
    # no attention level: text parameters do not exist and text is ignored
    no_attn = diffnext(widths=(8, 16), blocks=(1, 1), heads=(0, 0), semantic_levels=(1,), text_channels=8)
    assert no_attn.text_mapper is None
    assert no_attn(x_t, r, semantic, text).shape == x_t.shape


def test_every_parameter_gets_a_gradient():
    model = diffnext(**{**TINY_B, "semantic_levels": (0, 1, 2)}, text_channels=8)
    x_t, r, semantic, text = _inputs(text=8)
    semantic.requires_grad_(True)
    model(x_t, r, semantic, text).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert semantic.grad is not None and semantic.grad.abs().sum() == 0  # zero output conv blocks the signal...
    assert model.out[1].weight.grad.abs().sum() > 0  # ...but the output layer learns

    # after the output layer moves, the gradient reaches the semantic latent (the compressor is trained through it)
    _perturb_output_layer(model)
    model.zero_grad(set_to_none=True)
    semantic.grad = None
    model(x_t, r, semantic, text).square().mean().backward()
    assert semantic.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_stage_b_one_training_step_reduces_loss():
    model = diffnext(**TINY_B)
    x_t, r, semantic = _inputs()
    target = torch.randn_like(x_t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = (model(x_t, r, semantic) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(widths=(16, 32), blocks=(1, 1, 1), heads=(0, 2, 4)), "same length"),
        (dict(widths=(16, 30, 64), blocks=(1, 1, 1), heads=(0, 4, 4)), "not divisible by 4 heads"),
        (dict(widths=(16, 32, 64), blocks=(1, 0, 1), heads=(0, 2, 4)), "at least one block"),
        (dict(widths=(16, 32, 64), blocks=(1, 1, 1), heads=(0, 2, 4), semantic_levels=(3,)), "semantic_levels"),
        (
            dict(widths=(16, 32, 64), blocks=(1, 1, 1), heads=(0, 2, 4), semantic_levels=(), kernel_size=2),
            "kernel_size",
        ),
        (dict(widths=(16, 32, 64), blocks=(1, 1, 1), heads=(0, -1, 4), semantic_levels=()), "heads must be >= 0"),
    ],
)
def test_stage_b_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffNeXtConfig(**kwargs)


def test_stage_b_input_errors():
    model = diffnext(**TINY_B)
    assert model.divisor == 8
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 4, 12, 16), torch.rand(1), torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="semantic must be"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="r must have shape"):
        model(torch.randn(2, 4, 16, 16), torch.rand(1), torch.randn(2, 16, 4, 4))


def test_paper_scale_parameter_count_on_meta():
    with torch.device("meta"):
        model = diffnext()
        with_text = diffnext(text_channels=1024)
    assert all(p.is_meta for p in model.parameters())
    assert 0.6e9 <= _count(model) <= 1.1e9, _count(model)
    assert 0.6e9 <= _count(with_text) <= 1.1e9, _count(with_text)


# ---------------------------------------------------------------------------------------------------- perturb_semantic


def test_perturb_semantic_extremes():
    semantic = torch.randn(64, 16, 3, 3)
    assert torch.equal(perturb_semantic(semantic, 1.0, 0.0), torch.zeros_like(semantic))
    assert torch.equal(perturb_semantic(semantic, 1.0, 1.0), torch.zeros_like(semantic))
    unchanged = perturb_semantic(semantic, 0.0, 0.0)
    assert torch.equal(unchanged, semantic) and unchanged is not semantic
    noisy = perturb_semantic(semantic, 0.0, 1.0, noise_std=0.5)
    per_sample = (noisy - semantic).flatten(1).std(dim=1)
    assert torch.all((per_sample > 0.3) & (per_sample < 0.7))


def test_perturb_semantic_probabilities_and_generator():
    semantic = torch.randn(4000, 2, 1, 1) + 5.0  # no sample is ~0 by chance
    gen = torch.Generator().manual_seed(1)
    out = perturb_semantic(semantic, drop_prob=0.3, noise_prob=0.0, generator=gen)
    dropped = (out == 0).flatten(1).all(dim=1)
    kept = (out == semantic).flatten(1).all(dim=1)
    assert torch.all(dropped ^ kept)
    assert abs(dropped.float().mean().item() - 0.3) < 0.04

    out = perturb_semantic(semantic, drop_prob=0.0, noise_prob=0.25, noise_std=1.0, generator=gen)
    changed = (out != semantic).flatten(1).any(dim=1)
    assert abs(changed.float().mean().item() - 0.25) < 0.04

    again = perturb_semantic(semantic, 0.5, 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, perturb_semantic(semantic, 0.5, 0.5, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="drop_prob"):
        perturb_semantic(semantic, 1.5, 0.0)


def test_perturb_semantic_keeps_gradient():
    semantic = torch.randn(8, 16, 2, 2, requires_grad=True)
    perturb_semantic(semantic, 0.0, 0.5).sum().backward()
    assert torch.equal(semantic.grad, torch.ones_like(semantic))
