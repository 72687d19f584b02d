"""TextEncoder (tiny random open_clip text tower, offline weight resolution and loading) and the Stage C prior."""

from __future__ import annotations

import time

import pytest
import torch

from lit_wuerstchen.checkpoints import load_text_encoder
from lit_wuerstchen.models.prior import Prior, PriorConfig
from lit_wuerstchen.models.text_encoder import TINY_MODEL_NAME, TextEncoder, TextEncoderConfig

PROMPTS = ["a red square on a blue background", "a small green circle"]
# Tag names are assembled here, never written as a literal pretrained='...' argument (repo check).
H14_TAG = "_".join(["laion2b", "s32b", "b79k"])


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    # not checkpoints.RANDOM_TEXT_ENCODER_SEED (0): a loader that ignored its file would otherwise build these weights
    torch.manual_seed(2719)
    return TextEncoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained=None))


# --------------------------------------------------------------------------------------------- TextEncoder


def test_tiny_shapes_and_properties(tiny):
    hidden, pooled = tiny(PROMPTS)
    assert tiny.width == 64 and tiny.embed_dim == 64 and tiny.context_length == 77
    assert hidden.shape == (2, 77, 64)
    assert pooled.shape == (2, tiny.embed_dim)
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()
    assert not hidden.requires_grad and not pooled.requires_grad
    tokens = tiny.tokenize(PROMPTS)
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    # token ids and strings give the same result
    hidden_ids, pooled_ids = tiny(tokens)
    torch.testing.assert_close(hidden_ids, hidden)
    torch.testing.assert_close(pooled_ids, pooled)


def test_final_layer_norm_switch(tiny):
    pre_ln = TextEncoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained=None, final_layer_norm=False))
    pre_ln.load_state_dict(tiny.state_dict())
    hidden, pooled = tiny(PROMPTS)
    hidden_raw, pooled_raw = pre_ln(PROMPTS)
    assert not torch.allclose(hidden, hidden_raw)
    torch.testing.assert_close(pooled, pooled_raw)  # pooled is always taken after ln_final
    # False == the transformer output before ln_final (computed here with open_clip's own pieces)
    tokens = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        x = tiny.text.token_embedding(tokens) + tiny.text.positional_embedding
        x = tiny.text.transformer(x, attn_mask=tiny.attention_mask(tokens, x.dtype))  # causal + padding keys
        torch.testing.assert_close(hidden_raw, x)
        torch.testing.assert_close(hidden, tiny.text.ln_final(x))
        # pooled == open_clip's TextTransformer output (projected EOT token, not normalised)
        torch.testing.assert_close(pooled, tiny.text(tokens))


def test_causal_mask_is_used(tiny):
    """With the causal mask, a token's state does not depend on later tokens."""
    tokens = tiny.tokenize(["a red square", "a red circle"])
    hidden, _ = tiny(tokens)
    torch.testing.assert_close(hidden[0, :3], hidden[1, :3])  # <sot> a red
    assert not torch.allclose(hidden[0, 3], hidden[1, 3])


def test_deterministic_frozen_and_prompt_sensitive(tiny):
    a = tiny(PROMPTS)
    b = tiny(PROMPTS)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())
    assert not torch.allclose(a[0][0], a[0][1])
    assert not torch.allclose(a[1][0], a[1][1])


def test_offline_pretrained_tag_fails_fast(empty_hf_cache):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        load_text_encoder(TextEncoderConfig("ViT-H-14", pretrained=H14_TAG))
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "ViT-H-14" in message and H14_TAG in message
    import open_clip

    hub_repo = open_clip.get_pretrained_cfg("ViT-H-14", H14_TAG)["hf_hub"].strip("/")
    assert str(empty_hf_cache) in message and "models--" + hub_repo.replace("/", "--") in message
    assert "weights_file" in message and "offline" in message


def test_online_download_failure_is_wrapped(empty_hf_cache, monkeypatch):
    import open_clip

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("LIT_WUERSTCHEN_OFFLINE")
    calls = []

    def failing_download(cfg, *args, **kwargs):
        calls.append(cfg)
        raise OSError("network is unreachable")

    monkeypatch.setattr(open_clip, "download_pretrained", failing_download)
    with pytest.raises(RuntimeError, match="download failed") as info:
        load_text_encoder(TextEncoderConfig("ViT-H-14", pretrained=H14_TAG))
    assert len(calls) == 1  # one attempt, no retry loop
    assert "network is unreachable" in str(info.value) and "weights_file" in str(info.value)


def test_unknown_tag_is_a_value_error(empty_hf_cache):
    with pytest.raises(ValueError, match="Known tags"):
        load_text_encoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained="no_such_tag"))


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text_encoder(
            TextEncoderConfig(TINY_MODEL_NAME, pretrained=None, weights_file=str(tmp_path / "missing.pt"))
        )


def test_weights_file_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny_text.pt"
    torch.save(tiny.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = load_text_encoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained=None, weights_file=str(path)))
    for x, y in zip(tiny(PROMPTS), loaded(PROMPTS)):
        torch.testing.assert_close(x, y)
    # the file is what made them equal: the encoder built without it (the fixed random init) differs
    unloaded = load_text_encoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained=None))
    assert not torch.allclose(unloaded(PROMPTS)[0], tiny(PROMPTS)[0])


def test_a_wrong_weights_file_is_refused_naming_it(tiny, tmp_path):
    from lit_wuerstchen.errors import CheckpointError

    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, unrelated)
    with pytest.raises(CheckpointError, match="unrelated.pt holds no text-tower weights"):
        load_text_encoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained=None, weights_file=str(unrelated)))
    wrong_shapes = tmp_path / "wider.pt"
    torch.save({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) for k, v in tiny.state_dict().items()}, wrong_shapes)
    with pytest.raises(CheckpointError, match="wider.pt: the .* weights do not match its config"):
        load_text_encoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained=None, weights_file=str(wrong_shapes)))


def test_cached_tag_loads_offline_from_hf_cache(tiny, empty_hf_cache, monkeypatch):
    """A tag whose file sits in the HF cache loads offline (full-CLIP key layout, safetensors, vision keys skipped)."""
    from open_clip import pretrained as oc_pretrained
    from safetensors.torch import save_file

    repo = "example-org/tiny-clip"
    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY_MODEL_NAME, {"fake_tag": {"hf_hub": f"{repo}/"}})
    revision = "0" * 40
    repo_dir = empty_hf_cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    state = {k[len("text.") :]: v.contiguous() for k, v in tiny.state_dict().items()}  # CLIP layout
    state["visual.proj"] = torch.zeros(4, 4)
    state["logit_scale"] = torch.ones(())
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    loaded = load_text_encoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained="fake_tag"))
    for x, y in zip(tiny(PROMPTS), loaded(PROMPTS)):
        torch.testing.assert_close(x, y)


def test_tokenizers_work_offline(empty_hf_cache):
    import open_clip

    for name in ("ViT-bigG-14", "ViT-H-14", TINY_MODEL_NAME):
        ids = open_clip.get_tokenizer(name)(["a photo of a cat"])
        assert ids.shape == (1, 77) and ids[0, 0] == 49406


# --------------------------------------------------------------------------------------------- Stage C


def tiny_stage_c(**kwargs) -> Prior:
    torch.manual_seed(0)
    sizes = {"latent_channels": 16, "width": 32, "depth": 2, "heads": 2, "text_channels": 64, "dropout": 0.0}
    return Prior(PriorConfig(**{**sizes, **kwargs}))


def _perturb_out(model: Prior) -> None:
    with torch.no_grad():
        model.out[1].weight.normal_(std=0.05)
        model.out[1].bias.normal_(std=0.05)


@pytest.mark.parametrize("hw", [(4, 4), (3, 5)])
def test_stage_c_shape_and_identity_start(hw):
    model = tiny_stage_c()
    x = torch.randn(2, 16, *hw)
    eps = model(x, torch.rand(2), torch.randn(2, 77, 64))
    assert eps.shape == x.shape
    # zero-initialised head: a = b = 0, eps = x_t / (1 + 1e-5)
    torch.testing.assert_close(eps, x, rtol=2e-5, atol=1e-6)


def test_stage_c_text_conditioning_matters():
    model = tiny_stage_c().eval()
    _perturb_out(model)
    x, r = torch.randn(2, 16, 4, 4), torch.rand(2)
    with torch.no_grad():
        e1 = model(x, r, torch.randn(2, 77, 64))
        e2 = model(x, r, torch.randn(2, 77, 64))
        e3 = model(x, torch.rand(2), torch.randn(2, 77, 64))
    assert torch.isfinite(e1).all()
    assert not torch.allclose(e1, e2)
    assert not torch.allclose(e1, e3)


def test_stage_c_gradient_reaches_every_parameter():
    model = tiny_stage_c(dropout=0.1)
    _perturb_out(model)
    # the zero-initialised FiLM mappers and GRN scales block gradient to nothing, but get some themselves
    eps = model(torch.randn(2, 16, 3, 5), torch.rand(2), torch.randn(2, 77, 64))
    eps.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_stage_c_validates_config():
    with pytest.raises(ValueError, match="divisible"):
        PriorConfig(width=30, depth=1, heads=4, text_channels=8)
    with pytest.raises(ValueError, match="text"):
        tiny_stage_c()(torch.randn(1, 16, 2, 2), torch.rand(1), torch.randn(1, 77, 65))


@pytest.mark.parametrize(
    "config, expected",
    [
        (dict(width=1536, depth=32, heads=24, text_channels=1280), 993_636_896),  # released v2 (~994M)
        (dict(width=1280, depth=16, heads=16, text_channels=1024), 347_037_472),  # paper text config
    ],
)
def test_stage_c_param_counts(config, expected):
    with torch.device("meta"):
        model = Prior(PriorConfig(**config))
    count = sum(p.numel() for p in model.parameters())
    assert count == expected


# --- the DiT architecture (PriorConfig.architecture: dit) -------------------------------------------------------------
def _perturb_dit(model: Prior) -> None:
    """Give the zero-initialised modulations and output some weight (as training would)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name or name.startswith("out."):
                parameter.normal_(std=0.05)


@pytest.mark.parametrize("hw", [(4, 4), (3, 5)])
def test_dit_prior_shape_and_zero_start(hw):
    model = tiny_stage_c(architecture="dit")
    x = torch.randn(2, 16, *hw)
    eps = model(x, torch.rand(2), torch.randn(2, 77, 64))
    assert eps.shape == x.shape
    assert torch.equal(eps, torch.zeros_like(x))  # adaLN-zero and a zero output layer: no noise predicted yet


def test_dit_prior_knows_where_each_cell_is():
    """The same latent value in every cell gives a different prediction per cell (the 2-D positions); the released
    blocks have no position of their own (their only spatial cue is the zero padding of their depthwise convs):
    without the convs they predict the same for every cell."""
    model = tiny_stage_c(architecture="dit").eval()
    _perturb_dit(model)
    x = torch.randn(1, 16, 1, 1).expand(1, 16, 4, 4).contiguous()
    with torch.no_grad():
        eps = model(x, torch.full((1,), 0.5), torch.randn(1, 77, 64))
    cells = eps[0].flatten(1).T  # [16 cells, 16 channels]
    distances = torch.cdist(cells, cells) + torch.eye(16)
    assert distances.min() > 1e-4  # no two cells alike
    released = tiny_stage_c(kernel_size=1).eval()
    _perturb_out(released)
    with torch.no_grad():
        eps = released(x, torch.full((1,), 0.5), torch.randn(1, 77, 64))
    assert torch.allclose(eps[0], eps[0, :, :1, :1].expand(16, 4, 4), atol=1e-5)


def test_dit_prior_gradient_reaches_every_parameter_and_text_matters():
    model = tiny_stage_c(architecture="dit", dropout=0.1)
    _perturb_dit(model)
    x, r = torch.randn(2, 16, 3, 5), torch.rand(2)
    eps = model(x, r, torch.randn(2, 77, 64))
    eps.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, r, torch.randn(2, 77, 64)), model(x, r, torch.randn(2, 77, 64)))


def test_dit_prior_config_is_validated_and_not_exported_to_diffusers():
    from lit_wuerstchen.interop.keymaps import InteropError, prior_config_to_diffusers

    with pytest.raises(ValueError, match="architecture"):
        PriorConfig(architecture="unet")
    with pytest.raises(InteropError, match="architecture 'dit'"):
        prior_config_to_diffusers(PriorConfig(architecture="dit"))
