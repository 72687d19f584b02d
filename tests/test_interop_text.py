"""open_clip text tower <-> transformers CLIP text model (lit_wuerstchen.interop.clip_text), and the padding mask
that makes the TextEncoder's states the released pipelines' (transformers called with the attention mask)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lit_wuerstchen.checkpoints import load_text_encoder  # noqa: E402
from lit_wuerstchen.data.cache import weights_fingerprint  # noqa: E402
from lit_wuerstchen.interop import clip_text  # noqa: E402
from lit_wuerstchen.models.text_encoder import (  # noqa: E402
    CONFIG_DIR,
    TINY_MODEL_NAME,
    TextEncoder,
    TextEncoderConfig,
)

TOL = 1e-5
PROMPTS = [
    "",
    "a photo of a cat",
    "A RED square, on a blue background: 3 dots (small); it's #1 -- isn't it?",
    "an extremely long caption " + "with many many words " * 30,  # longer than any context: truncated, EOT last
]


def _random_tiny(context_length: int | None, padding_mask: bool = True) -> TextEncoder:
    """The shipped tiny tower with seeded random weights; LayerNorms, biases, positions and the projection are
    perturbed so that none of them is trivial (ones / zeros)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        config = TextEncoderConfig(
            TINY_MODEL_NAME, pretrained=None, context_length=context_length, padding_mask=padding_mask
        )
        encoder = TextEncoder(config)
        with torch.no_grad():
            for name, param in encoder.named_parameters():
                if "ln" in name or "bias" in name or "positional" in name or "projection" in name:
                    param.add_(0.5 * torch.randn_like(param))
    return encoder


def _real(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()[..., None]


@pytest.fixture(scope="module", params=[None, 16], ids=["ctx77", "ctx16"])
def pair(request):
    """(open_clip encoder, transformers CLIPTextModelWithProjection, CLIPTokenizer) with the same weights."""
    encoder = _random_tiny(request.param)
    model, tokenizer = clip_text.to_transformers(encoder)
    return encoder, model, tokenizer


def _hf(tokenizer, prompts):
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )


# ------------------------------------------------------------------------------------------ hidden states


def test_states_equal_transformers_with_attention_mask_including_padding(pair):
    encoder, model, tokenizer = pair
    assert tokenizer.model_max_length == encoder.context_length
    batch = _hf(tokenizer, PROMPTS)
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask)
    hidden, pooled = encoder(PROMPTS)  # open_clip's own tokenizer
    assert torch.equal(encoder.tokenize(PROMPTS), batch.input_ids)
    assert batch.attention_mask.sum(1).tolist()[:2] == [2, 7] and batch.attention_mask[3].all()
    assert (hidden - out.last_hidden_state).abs().max() <= TOL  # every position, padding included
    assert (pooled - out.text_embeds).abs().max() <= TOL
    assert torch.isfinite(hidden).all()

    # open_clip's causal mask only: real tokens and pooled agree, padding positions do not (the test can fail)
    causal = _random_tiny(None if encoder.context_length == 77 else encoder.context_length, padding_mask=False)
    hidden_causal, pooled_causal = causal(PROMPTS)
    real = _real(batch.attention_mask)
    assert (hidden_causal - out.last_hidden_state).abs().where(real, 0).max() <= TOL
    assert (hidden_causal - out.last_hidden_state).abs().where(~real, 0).max() > 1e-2
    assert (pooled_causal - out.text_embeds).abs().max() <= TOL


def test_plain_clip_text_model_states(pair):
    encoder, _, tokenizer = pair
    model, _ = clip_text.to_transformers(encoder, with_projection=False)
    assert type(model).__name__ == "CLIPTextModel"
    batch = _hf(tokenizer, PROMPTS[:3])
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask)
    hidden, _ = encoder(batch.input_ids)
    assert (hidden - out.last_hidden_state).abs().max() <= TOL


def test_attention_mask_shapes_and_no_nan():
    encoder = _random_tiny(16)
    tokens = encoder.tokenize(["a cat", "x " * 40])
    mask = encoder.attention_mask(tokens, torch.float32)
    assert mask.shape == (2 * encoder.text.heads, 16, 16)
    assert torch.isfinite(mask.amax(-1)).all()  # every query keeps a key
    assert torch.isinf(mask[0, 0, 1]) and torch.isinf(mask[0, 5, 4]) and mask[0, 5, 3] == 0  # causal + padding
    full = encoder.tokenize(["x " * 40])  # nothing padded: open_clip's causal mask
    assert encoder.attention_mask(full, torch.float32).shape == (16, 16)
    hidden, pooled = encoder(tokens.to(torch.int32))
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()


def test_padding_mask_is_part_of_the_cache_fingerprint():
    on, off = _random_tiny(16), _random_tiny(16, padding_mask=False)
    assert on.fingerprint_settings()["padding_mask"] and not off.fingerprint_settings()["padding_mask"]
    assert weights_fingerprint(on) != weights_fingerprint(off)
    assert weights_fingerprint(on) == weights_fingerprint(_random_tiny(16))


def test_coca_tower_refuses_padding_mask(tmp_path):
    cfg = json.loads((CONFIG_DIR / f"{TINY_MODEL_NAME}.json").read_text())
    cfg["text_cfg"]["embed_cls"] = True  # a CoCa-style appended class token
    path = tmp_path / "tiny-coca-text.json"
    path.write_text(json.dumps(cfg))
    config = TextEncoderConfig("tiny-coca-text", pretrained=None, model_config_file=str(path), context_length=16)
    with pytest.raises(ValueError, match="padding_mask"):
        TextEncoder(config)
    config.padding_mask = False
    hidden, _ = TextEncoder(config)(["a cat"])
    assert hidden.shape == (1, 16, 64)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_matches_open_clip(pair, tmp_path):
    encoder, _, tokenizer = pair
    prompts = PROMPTS + ["Hello,   World. (TEST) 42% of A/B...", "naïve café — ça va?", "  padded   spaces  "]
    batch = _hf(tokenizer, prompts)
    tokens = encoder.tokenize(prompts)
    assert torch.equal(batch.input_ids, tokens)
    eot = (tokens == clip_text.EOS_TOKEN_ID).int().argmax(1)
    expected_mask = (torch.arange(tokens.shape[1]) <= eot[:, None]).long()
    assert torch.equal(batch.attention_mask, expected_mask)
    assert tokens[3, -1] == clip_text.EOS_TOKEN_ID  # truncated: EOT kept at the end

    folder = clip_text.save_tokenizer(tmp_path / "tokenizer", encoder.context_length)
    assert {p.name for p in folder.iterdir()} == {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\ni n\n")
    loaded = transformers.CLIPTokenizer.from_pretrained(folder)
    assert loaded.pad_token == "!" and loaded.pad_token_id == 0 and loaded.model_max_length == encoder.context_length
    assert torch.equal(_hf(loaded, prompts).input_ids, tokens)


def test_exclamation_mark_is_the_pad_token_in_transformers(pair):
    """The LAION tokenizers' pad token "!" is an added token, so transformers tokenizes a prompt's "!" as id 0
    where open_clip has "!</w>" (256): ``exclamation_as_pad`` (the default) gives the released ids, and the
    states agree."""
    encoder, model, tokenizer = pair
    prompts = ["wow!", "Top left!! a red CIRCLE! ", "!start", "no exclamation"]
    batch = _hf(tokenizer, prompts)
    assert torch.equal(encoder.tokenize(prompts), batch.input_ids)
    assert len({int(i) for i in batch.input_ids[1]}) > 5  # real BPE tokens around the "!"s
    assert batch.input_ids[0, 2] == 0
    plain = TextEncoder(dataclasses.replace(encoder.config, exclamation_as_pad=False))
    assert plain.tokenize(["wow!"])[0, 2] == 256  # open_clip's own tokenization: the option is what matches
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask)
    hidden, pooled = encoder(batch.input_ids)
    assert (hidden - out.last_hidden_state).abs().max() <= TOL
    assert (pooled - out.text_embeds).abs().max() <= TOL


# ------------------------------------------------------------------------------------------ weights


def test_state_dict_round_trip(pair):
    encoder, model, _ = pair
    state = clip_text.to_transformers_state_dict(encoder)
    assert set(state) == set(model.state_dict())
    back = clip_text.from_transformers_state_dict(state, encoder)
    own = encoder.state_dict()
    assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own)
    # a loaded model's state dict converts back as well
    back = clip_text.from_transformers_state_dict(model.state_dict(), encoder)
    assert all(torch.equal(back[k], own[k]) for k in own)


def test_extra_or_missing_keys_are_one_line_errors(pair):
    encoder, model, _ = pair
    state = clip_text.to_transformers_state_dict(encoder)
    extra = {**state, "text_model.encoder.layers.9.mlp.fc1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"layers\.9\.mlp\.fc1\.weight") as error:
        clip_text.from_transformers_state_dict(extra, encoder)
    assert "\n" not in str(error.value)
    missing = {k: v for k, v in state.items() if k != "text_model.encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj\.bias") as error:
        clip_text.from_transformers_state_dict(missing, encoder)
    assert "\n" not in str(error.value)
    shaped = {**state, "text_model.final_layer_norm.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"ln_final\.bias"):
        clip_text.from_transformers_state_dict(shaped, encoder)
    # an older transformers' saved position_ids buffer is no weight: accepted
    old = {**state, "text_model.embeddings.position_ids": torch.arange(encoder.context_length)[None]}
    clip_text.from_transformers_state_dict(old, encoder)


def test_plain_clip_text_model_state_without_projection(pair):
    encoder, _, _ = pair
    state = clip_text.to_transformers_state_dict(encoder)
    plain = {k: v for k, v in state.items() if k != "text_projection.weight"}
    with pytest.raises(ValueError, match="strict=False"):
        clip_text.from_transformers_state_dict(plain, encoder)
    kept = clip_text.from_transformers_state_dict(plain, encoder, strict=False)
    assert torch.equal(kept["text.text_projection"], encoder.text.text_projection)
    unprefixed = {k.removeprefix("text_model."): v for k, v in plain.items()}  # transformers 5's CLIPTextModel
    clip_text.from_transformers_state_dict(unprefixed, encoder, strict=False)


def test_from_transformers_model_and_folder(pair, tmp_path):
    encoder, model, tokenizer = pair
    converted = clip_text.from_transformers(model)
    assert converted.model_name == TINY_MODEL_NAME  # the shipped architecture is recognised
    assert converted.context_length == encoder.context_length
    own = encoder.state_dict()
    assert all(torch.equal(converted.state_dict()[k], own[k]) for k in own)

    model.save_pretrained(tmp_path / "text_encoder")
    converted = clip_text.from_transformers(tmp_path / "text_encoder", out_dir=tmp_path / "out")
    assert all(torch.equal(converted.state_dict()[k], own[k]) for k in own)
    reloaded = load_text_encoder(converted.config)  # the config names the written weights
    assert all(torch.equal(reloaded.state_dict()[k], own[k]) for k in own)

    wrong = TextEncoderConfig(TINY_MODEL_NAME, pretrained=None, context_length=8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        clip_text.from_transformers(model, wrong)


def test_from_plain_clip_text_model_generates_a_config(pair, tmp_path, monkeypatch):
    encoder, _, tokenizer = pair
    model, _ = clip_text.to_transformers(encoder, with_projection=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    converted = clip_text.from_transformers(model)
    config_file = converted.config.model_config_file
    assert config_file is not None and config_file.startswith(str(tmp_path / "cache"))
    assert converted.text.text_projection is None and converted.embed_dim == 64
    batch = _hf(tokenizer, PROMPTS)
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask)
    hidden, pooled = converted(PROMPTS)
    assert (hidden - out.last_hidden_state).abs().max() <= TOL
    assert (pooled - out.pooler_output).abs().max() <= TOL
    again = clip_text.from_transformers(model, out_dir=tmp_path / "out")  # same architecture, same config name
    assert again.model_name == converted.model_name
    assert again.config.model_config_file == str(tmp_path / "out" / f"{converted.model_name}.json")
