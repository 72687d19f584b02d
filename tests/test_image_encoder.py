"""Stable Cascade's conditioning inputs, model side: the ImageEncoder (open_clip vision tower -> the ``clip_img``
embedding), its loader, and the TextEncoder settings that give the released Stage C's ``clip_text`` /
``clip_text_pooled`` (compared with transformers, as diffusers' StableCascadePriorPipeline computes them)."""

from __future__ import annotations

import time

import numpy as np
import open_clip
import pytest
import torch

from lit_wuerstchen.checkpoints import load_image_encoder
from lit_wuerstchen.data.cache import weights_fingerprint
from lit_wuerstchen.errors import CheckpointError
from lit_wuerstchen.models import ImageEncoder, ImageEncoderConfig, TextEncoder, TextEncoderConfig, clip_preprocess
from lit_wuerstchen.models.text_encoder import TINY_MODEL_NAME

transformers = pytest.importorskip("transformers")

from lit_wuerstchen.interop import clip_text  # noqa: E402

TOL = 1e-5
# Tag names are assembled here, never written as a literal pretrained='...' argument (repo check).
OPENAI_TAG = "open" + "ai"


def _tiny_config(**kwargs) -> ImageEncoderConfig:
    return ImageEncoderConfig(TINY_MODEL_NAME, pretrained=None, **kwargs)


def _perturbed(module: torch.nn.Module, seed: int) -> None:
    """LayerNorms, biases and embeddings off their trivial init (ones / zeros), so a mixed-up key shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="module")
def tiny() -> ImageEncoder:
    # not checkpoints.RANDOM_IMAGE_ENCODER_SEED (0): a loader that ignored its file would otherwise build these
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5237)
        encoder = ImageEncoder(_tiny_config(quick_gelu=True))
    _perturbed(encoder, 5238)
    return encoder


def _images(batch: int = 2, height: int = 45, width: int = 60, seed: int = 5239) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- ImageEncoder


def test_tiny_shapes_frozen_and_deterministic(tiny):
    images = _images()
    out = tiny(images)
    assert tiny.image_size == 32 and tiny.embed_dim == 64
    assert out.shape == (2, 1, 64) and out.dtype == torch.float32  # [B, 1, embed]: Stage C's clip_img
    assert torch.isfinite(out).all() and not out.requires_grad
    torch.testing.assert_close(tiny(images), out)
    assert not torch.allclose(out[0], out[1])
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())
    # any size in, the tower's size out; uint8 is read as x / 255; one unbatched image is a batch of one
    assert tiny.preprocess(_images(1, 100, 33)).shape == (1, 3, 32, 32)
    as_uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(tiny(as_uint8), tiny(as_uint8.float() / 255))
    torch.testing.assert_close(tiny(images[0]), out[:1])
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tiny(torch.rand(2, 4, 32, 32))


def test_half_precision_keeps_float32_preprocessing(tiny):
    import copy

    half = copy.deepcopy(tiny).to(torch.bfloat16)
    images = _images()
    torch.testing.assert_close(half.preprocess(images), tiny.preprocess(images))  # mean/std not rounded to bf16
    out = half(images)
    assert out.dtype == torch.bfloat16
    reference = tiny(images)
    assert (out.float() - reference).abs().max() <= 0.05 * reference.abs().max()  # bf16 rounding only


def test_embedding_is_the_projected_class_token_not_normalised(tiny):
    pixels = tiny.preprocess(_images())
    with torch.no_grad():
        tokens = tiny.visual.transformer(tiny.visual._embeds(pixels))
        expected = tiny.visual.ln_post(tokens[:, 0]) @ tiny.visual.proj
    torch.testing.assert_close(tiny.encode(pixels)[:, 0], expected)
    assert not torch.allclose(expected.norm(dim=-1), torch.ones(2))


def test_random_init_is_seeded_and_independent_of_the_callers_rng(tiny):
    torch.manual_seed(1)
    a = load_image_encoder(_tiny_config())
    torch.manual_seed(2)
    b = load_image_encoder(_tiny_config())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(tiny)


def test_quick_gelu_follows_the_tag_and_settings_are_fingerprinted():
    # the default (ViT-L/14, OpenAI's weights) is built on the meta device: no 300M-parameter init on the CPU
    with torch.device("meta"):
        default = ImageEncoder(ImageEncoderConfig())
    assert default.quick_gelu and default.image_size == 224 and default.embed_dim == 768
    assert default.config.pretrained == OPENAI_TAG
    assert default.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and default.std == tuple(open_clip.OPENAI_DATASET_STD)
    assert not ImageEncoder(_tiny_config()).quick_gelu  # no tag: the model config's (GELU)
    gelu, quick = ImageEncoder(_tiny_config()), ImageEncoder(_tiny_config(quick_gelu=True))
    quick.load_state_dict(gelu.state_dict())
    assert weights_fingerprint(gelu) != weights_fingerprint(quick)  # same weights, other outputs
    assert "mean" not in gelu.state_dict()  # normalisation is a setting, not a weight


def _open_clip_eval_transform():
    return open_clip.image_transform(
        224,
        is_train=False,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        resize_mode="shortest",
        interpolation="bicubic",
    )


def test_preprocessing_matches_clip_image_processor_and_open_clip():
    """Our batched torch preprocessing against the released pipeline's CLIPImageProcessor (both transformers
    backends) and open_clip's eval transform, on a smooth PIL image: they differ only by uint8 rounding (PIL)."""
    from PIL import Image, ImageFilter

    noise = (np.random.default_rng(5240).random((300, 400, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # uint8 [1, 3, 300, 400]
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    ours = clip_preprocess(pixels, 224, mean, std)
    assert ours.shape == (1, 3, 224, 224)
    references = {
        "CLIPImageProcessor": transformers.CLIPImageProcessor()(image, return_tensors="pt").pixel_values,
        "open_clip": _open_clip_eval_transform()(image)[None],
    }
    if hasattr(transformers, "CLIPImageProcessorPil"):
        references["CLIPImageProcessorPil"] = transformers.CLIPImageProcessorPil()(
            image, return_tensors="pt"
        ).pixel_values
    for name, reference in references.items():
        diff = (ours - reference).abs()
        # one uint8 step is 1 / 255 / std ~ 0.015 after normalisation
        assert diff.max() < 0.03 and diff.mean() < 0.01, (name, float(diff.max()), float(diff.mean()))


def test_projected_embedding_matches_transformers_clip_vision_with_projection(tiny, tmp_path):
    """A transformers CLIPVisionModelWithProjection file (the released pipeline's ``image_encoder/``) loads through
    ``weights_file`` (converted); ``image_embeds.unsqueeze(1)`` on the same pixels is our output."""
    from safetensors.torch import save_file

    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        projection_dim=64,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(5241)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    _perturbed(model, 5242)
    path = tmp_path / "image_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    encoder = load_image_encoder(_tiny_config(quick_gelu=True, weights_file=str(path)))
    pixels = encoder.preprocess(_images())
    with torch.no_grad():
        reference = model(pixel_values=pixels).image_embeds.unsqueeze(1)
    assert (encoder.encode(pixels) - reference).abs().max() <= TOL
    assert (encoder(_images()) - reference).abs().max() <= TOL

    # a CLIPVisionModel without projection cannot give image_embeds: one line naming what is missing
    no_projection = tmp_path / "no_projection.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if "visual_projection" not in k}, str(no_projection)
    )
    with pytest.raises(CheckpointError, match="no visual_projection.weight") as info:
        load_image_encoder(_tiny_config(quick_gelu=True, weights_file=str(no_projection)))
    assert "\n" not in str(info.value)


def test_weights_file_round_trip_and_open_clip_layouts(tiny, tmp_path):
    images = _images()
    own = tmp_path / "own.pt"
    torch.save(tiny.state_dict(), own)  # this module's own keys (visual.*)
    bare = tmp_path / "bare.safetensors"  # a bare VisionTransformer state dict
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny.visual.state_dict().items()}, str(bare))
    # a full open_clip CLIP file: the text tower's "transformer.*" keys must not be mistaken for the vision tower's
    full = tmp_path / "full_clip.pt"
    text = TextEncoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained=None))
    torch.save({**tiny.state_dict(), **text.text.state_dict(), "logit_scale": torch.ones(())}, full)
    for path in (own, bare, full):
        torch.manual_seed(123)  # a different random init, overwritten by the file
        loaded = load_image_encoder(_tiny_config(quick_gelu=True, weights_file=str(path)))
        torch.testing.assert_close(loaded(images), tiny(images))
    # the file is what made them equal: the encoder built without it (the fixed random init) differs
    assert not torch.allclose(load_image_encoder(_tiny_config(quick_gelu=True))(images), tiny(images))


def test_a_wrong_weights_file_is_refused_naming_it(tiny, tmp_path):
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, unrelated)
    with pytest.raises(CheckpointError, match="unrelated.pt holds no vision-tower weights"):
        load_image_encoder(_tiny_config(weights_file=str(unrelated)))
    wider = tmp_path / "wider.pt"
    torch.save({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) for k, v in tiny.state_dict().items()}, wider)
    with pytest.raises(CheckpointError, match="wider.pt: the .* vision tower weights do not match its config"):
        load_image_encoder(_tiny_config(weights_file=str(wider)))
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in tiny.state_dict().items() if "ln_post" not in k}, partial)
    with pytest.raises(CheckpointError, match="partial.pt: .* 2 missing"):
        load_image_encoder(_tiny_config(weights_file=str(partial)))
    extra = tmp_path / "extra.pt"  # another architecture's vision keys are not dropped silently
    torch.save({**tiny.state_dict(), "visual.attn_pool.query": torch.zeros(4, 32)}, extra)
    with pytest.raises(CheckpointError, match="extra.pt: .* 1 unexpected .*attn_pool"):
        load_image_encoder(_tiny_config(weights_file=str(extra)))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_image_encoder(_tiny_config(weights_file=str(tmp_path / "missing.pt")))


def test_offline_pretrained_tag_fails_fast(empty_hf_cache):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        load_image_encoder(ImageEncoderConfig("ViT-L-14", pretrained=OPENAI_TAG))
    assert time.perf_counter() - start < 2.0  # before the 300M-parameter tower is built
    message = str(info.value)
    first = message.splitlines()[0]
    assert "ViT-L-14" in first and OPENAI_TAG in first and "offline" in first
    hub_repo = open_clip.get_pretrained_cfg("ViT-L-14", OPENAI_TAG)["hf_hub"].strip("/")
    assert str(empty_hf_cache) in message and "models--" + hub_repo.replace("/", "--") in message
    assert "weights_file" in message


# ------------------------------------------------------------------------ text: Stable Cascade's clip_text(_pooled)


def test_text_encoder_gives_the_released_stage_c_text_conditioning():
    """diffusers' StableCascadePriorPipeline.encode_prompt (and the official train/base.py): tokenizer with
    padding="max_length", max_length=77, truncation; ``CLIPTextModelWithProjection(input_ids, attention_mask,
    output_hidden_states=True)``; ``clip_text = hidden_states[-1]`` (the last block's output, before the final
    LayerNorm) and ``clip_text_pooled = text_embeds.unsqueeze(1)`` (projected, not normalised). A TextEncoder with
    ``final_layer_norm=False`` (padding_mask and exclamation_as_pad at their defaults) gives both."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5243)
        encoder = TextEncoder(TextEncoderConfig(TINY_MODEL_NAME, pretrained=None, final_layer_norm=False))
    with torch.no_grad():  # as tests/test_interop_text.py: LayerNorms, biases, positions, projection non-trivial
        gen = torch.Generator().manual_seed(5244)
        for name, param in encoder.named_parameters():
            if "ln" in name or "bias" in name or "positional" in name or "projection" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
    model, tokenizer = clip_text.to_transformers(encoder)
    assert type(model).__name__ == "CLIPTextModelWithProjection" and tokenizer.model_max_length == 77
    prompts = ["", "a photo of a cat!", "an extremely long caption " + "with many words " * 30]
    batch = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    clip_text_ref, pooled_ref = out.hidden_states[-1], out.text_embeds.unsqueeze(1)
    hidden, pooled = encoder(prompts)
    assert torch.equal(encoder.tokenize(prompts), batch.input_ids)
    assert hidden.shape == clip_text_ref.shape == (3, 77, 64)
    assert (hidden - clip_text_ref).abs().max() <= TOL  # every position, padding included
    assert (pooled[:, None] - pooled_ref).abs().max() <= TOL
    # the default (Würstchen v2) is last_hidden_state, i.e. after the final LayerNorm: not what Stage C takes
    assert (encoder.text.ln_final(hidden) - out.last_hidden_state).abs().max() <= TOL
    assert (out.last_hidden_state - clip_text_ref).abs().max() > 1e-2
