"""Stable Cascade networks (models/cascade.py): the network on its own first, then against diffusers'
``StableCascadeUNet`` (parameter counts of the released sizes, the key map and outputs with random weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lit_wuerstchen.interop.keymaps import (
    InteropError,
    cascade_config_from_diffusers,
    cascade_config_to_diffusers,
    cascade_key_map,
    rename,
)
from lit_wuerstchen.models import CascadeUNet, CascadeUNetConfig, DiffNeXt, DiffNeXtConfig, Prior, PriorConfig
from lit_wuerstchen.models.blocks import TimestepBlock

TOLERANCE = 1e-5

STAGE_C = CascadeUNetConfig(
    widths=[32, 48],
    heads=[2, 4],
    down_blocks=[1, 2],
    up_blocks=[1, 2],
    cond_channels=24,
    clip_text_pooled_channels=20,
    clip_text_channels=16,
    clip_image_channels=12,
    clip_tokens=2,
    r_embedding_dim=16,
)
# The options the released Stage C leaves off: a resolution switch, no self-attention at one level, repeated runs.
STAGE_C_VARIANT = dataclasses.replace(
    STAGE_C, level_resize=[True], self_attn=[True, False], down_repeats=[2, 1], up_repeats=[1, 3], dropout=[0.0, 0.2]
)
STAGE_B = CascadeUNetConfig(
    latent_channels=4,
    patch_size=2,
    widths=[16, 24, 32],
    heads=[0, 2, 4],
    down_blocks=[1, 1, 2],
    up_blocks=[1, 2, 1],
    down_repeats=[1, 1, 1],
    up_repeats=[2, 2, 3],
    cond_channels=20,
    clip_text_pooled_channels=12,
    clip_text_channels=0,
    clip_image_channels=0,
    clip_tokens=3,
    effnet_channels=6,
    pixel_channels=3,
    r_embedding_dim=16,
    timestep_conditions=["sca"],
    dropout=[0.0, 0.0, 0.1],
    self_attn=[True, True, True],
    level_resize=None,
)

_C_TYPES = ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]
_B_TYPES = [_C_TYPES[:2], _C_TYPES[:2], _C_TYPES, _C_TYPES]
_COMMON = {"timestep_ratio_embedding_dim": 64, "clip_text_pooled_in_channels": 1280, "clip_seq": 4, "kernel_size": 3}
_PRIOR = {
    **_COMMON, "in_channels": 16, "out_channels": 16, "patch_size": 1, "down_blocks_repeat_mappers": [1, 1],
    "up_blocks_repeat_mappers": [1, 1], "block_types_per_layer": [_C_TYPES, _C_TYPES], "clip_text_in_channels": 1280,
    "clip_image_in_channels": 768, "dropout": [0.1, 0.1], "self_attn": True,
    "timestep_conditioning_type": ["sca", "crp"], "switch_level": [False],
}  # fmt: skip
_DECODER = {
    **_COMMON, "in_channels": 4, "out_channels": 4, "patch_size": 2, "conditioning_dim": 1280,
    "down_blocks_repeat_mappers": [1, 1, 1, 1], "block_types_per_layer": _B_TYPES, "effnet_in_channels": 16,
    "pixel_mapper_in_channels": 3, "dropout": [0, 0, 0.1, 0.1], "self_attn": True,
    "timestep_conditioning_type": ["sca"],
}  # fmt: skip
# The released StableCascadeUNet arguments, as diffusers' scripts/convert_stable_cascade(_lite).py write them.
RELEASED = {
    "released_stage_c": {
        **_PRIOR, "conditioning_dim": 2048, "block_out_channels": [2048, 2048], "num_attention_heads": [32, 32],
        "down_num_layers_per_block": [8, 24], "up_num_layers_per_block": [24, 8],
    },
    "released_stage_c_lite": {
        **_PRIOR, "conditioning_dim": 1536, "block_out_channels": [1536, 1536], "num_attention_heads": [24, 24],
        "down_num_layers_per_block": [4, 12], "up_num_layers_per_block": [12, 4],
    },
    "released_stage_b": {
        **_DECODER, "block_out_channels": [320, 640, 1280, 1280], "down_num_layers_per_block": [2, 6, 28, 6],
        "up_num_layers_per_block": [6, 28, 6, 2], "up_blocks_repeat_mappers": [3, 3, 2, 2],
        "num_attention_heads": [0, 0, 20, 20],
    },
    "released_stage_b_lite": {
        **_DECODER, "block_out_channels": [320, 576, 1152, 1152], "down_num_layers_per_block": [2, 4, 14, 4],
        "up_num_layers_per_block": [4, 14, 4, 2], "up_blocks_repeat_mappers": [2, 2, 2, 2],
        "num_attention_heads": [0, 9, 18, 18],
    },
}  # fmt: skip


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor drawn from a seeded normal (zero-initialised layers included), so a wrong map cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in module.state_dict().values():
        std = 0.5 / tensor[0].numel() ** 0.5 if tensor.ndim > 1 else 0.05
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    return module.eval()


def stage_c_inputs(config: CascadeUNetConfig, batch: int = 2, seed: int = 3107) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, config.latent_channels, 6, 4, generator=g),
        "r": torch.rand(batch, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_channels, generator=g),
        "clip_text": torch.randn(batch, 5, config.clip_text_channels, generator=g),
        "clip_image": torch.randn(batch, 1, config.clip_image_channels, generator=g),
    }


def stage_b_inputs(config: CascadeUNetConfig, batch: int = 2, seed: int = 3109) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        # 16x12 with patch 2 and three levels: 8x6, 4x3, 2x1, so the up path resizes to an odd skip
        "x": torch.randn(batch, config.latent_channels, 16, 12, generator=g),
        "r": torch.rand(batch, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_channels, generator=g),
        "effnet": torch.randn(batch, config.effnet_channels, 5, 3, generator=g),
        "pixels": torch.randn(batch, config.pixel_channels, 8, 8, generator=g),
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- the network on its own ------------------------------------------------------------------------------------------
def test_timestep_block_default_keeps_v2_keys():
    assert set(TimestepBlock(8, 4).state_dict()) == {"mapper.weight", "mapper.bias"}
    block = TimestepBlock(8, 4, conds=("sca", "crp"))
    assert set(block.state_dict()) == {
        f"{m}.{p}" for m in ("mapper", "mapper_sca", "mapper_crp") for p in ("weight", "bias")
    }
    # extra conditions add their FiLM terms to r's
    randomise(block, 3107)
    x, r_part, zero = torch.randn(2, 8, 3, 3), torch.randn(2, 4), torch.zeros(2, 4)
    plain = TimestepBlock(8, 4)
    plain.mapper.load_state_dict(block.mapper.state_dict())
    with torch.no_grad():
        a_sca, b_sca = block.mapper_sca(zero)[:, :, None, None].chunk(2, dim=1)
        a_crp, b_crp = block.mapper_crp(zero)[:, :, None, None].chunk(2, dim=1)
        a, b = plain.mapper(r_part)[:, :, None, None].chunk(2, dim=1)
        expected = x * (1 + a + a_sca + a_crp) + b + b_sca + b_crp
        assert max_diff(block(x, torch.cat([r_part, zero, zero], dim=1)), expected) < 1e-6


def test_v2_networks_keep_their_keys():
    """The block options default off: v2's TimestepBlocks have one mapper and no new tensors appear."""
    with torch.device("meta"):
        keys = list(Prior(PriorConfig(width=32, depth=1, heads=2, text_channels=8)).state_dict())
        keys += list(
            DiffNeXt(DiffNeXtConfig(widths=[8, 16], blocks=[1, 1], heads=[0, 2], semantic_levels=[1])).state_dict()
        )
    assert not [k for k in keys if "mapper_" in k]


@pytest.mark.parametrize("config", [STAGE_C, STAGE_C_VARIANT], ids=["stage_c", "variant"])
def test_stage_c_shapes_and_conditions(config):
    torch.manual_seed(0)
    net = randomise(CascadeUNet(config), 3107)
    inputs = stage_c_inputs(config)
    with torch.no_grad():
        out = net(**inputs)
        assert out.shape == inputs["x"].shape and torch.isfinite(out).all()
        # no image is one zero embedding; 2-D pooled / image embeddings are one token each
        zeros = torch.zeros_like(inputs["clip_image"])
        assert max_diff(net(**{**inputs, "clip_image": None}), net(**{**inputs, "clip_image": zeros})) == 0
        flat = {
            **inputs,
            "clip_text_pooled": inputs["clip_text_pooled"][:, 0],
            "clip_image": inputs["clip_image"][:, 0],
        }
        assert max_diff(net(**flat), out) == 0
        for changed in ({"clip_image": zeros}, {"clip_text": None, "clip_image": None}, {"sca": torch.tensor(0.5)},
                        {"crp": torch.full((2,), 0.3)}):  # fmt: skip
            assert max_diff(net(**{**inputs, **changed}), out) > 1e-4, changed
        # sca / crp: None is 0
        assert max_diff(net(**inputs, sca=torch.zeros(2), crp=torch.zeros(1)), out) == 0


def test_stage_b_shapes_odd_sizes_and_conditions():
    net = randomise(CascadeUNet(STAGE_B), 3109)
    inputs = stage_b_inputs(STAGE_B)
    with torch.no_grad():
        out = net(**inputs)
        assert out.shape == inputs["x"].shape and torch.isfinite(out).all()
        assert max_diff(net(**{**inputs, "pixels": None}), net(**{**inputs, "pixels": torch.zeros(2, 3, 8, 8)})) == 0
        for changed in ({"effnet": None}, {"pixels": None}, {"sca": torch.full((2,), 0.7)}):
            assert max_diff(net(**{**inputs, **changed}), out) > 1e-4, changed


def test_every_parameter_gets_a_gradient():
    for config, inputs in ((STAGE_C_VARIANT, stage_c_inputs(STAGE_C_VARIANT)), (STAGE_B, stage_b_inputs(STAGE_B))):
        net = randomise(CascadeUNet(config), 3107).train()
        net(**inputs, sca=torch.full((2,), 0.5)).square().mean().backward()
        missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
        assert not missing, missing


def test_initialisation_starts_at_zero_output():
    """The official init zeroes the output conv's weight: the untrained network predicts its (zero) bias."""
    net = CascadeUNet(STAGE_B).eval()
    with torch.no_grad():
        assert net(**stage_b_inputs(STAGE_B)).abs().max() == 0
    # FiLM starts as the identity for r and for every scalar condition (the official StageC / StageB init)
    film = [p for name, p in net.named_parameters() if ".mapper" in name and name.endswith("weight")]
    assert film and all(p.abs().max() == 0 for p in film)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"heads": [2]}, "one entry per level"),
        ({"heads": [3, 4]}, "heads must be 0 or divide"),
        ({"level_resize": [True, False]}, "level_resize"),
        ({"clip_image_channels": 0}, "set together"),
        ({"timestep_conditions": ["aesthetic"]}, "timestep_conditions"),
        ({"up_repeats": [0, 1]}, "repeats"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"dropout": [0.1, 1.0]}, "dropout"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(STAGE_C, **changes)


def test_input_errors():
    c_net, b_net = CascadeUNet(STAGE_C), CascadeUNet(STAGE_B)
    c_inputs, b_inputs = stage_c_inputs(STAGE_C), stage_b_inputs(STAGE_B)
    for net, inputs, match in (
        (c_net, {**c_inputs, "clip_text": None}, "only together with clip_text"),
        (c_net, {**c_inputs, "effnet": b_inputs["effnet"]}, "no effnet mapper"),
        (c_net, {**c_inputs, "x": c_inputs["x"][:, :4]}, "x must be"),
        (b_net, {**b_inputs, "clip_text": c_inputs["clip_text"]}, "no text mapper"),
        (b_net, {**b_inputs, "crp": torch.zeros(2)}, "not one of timestep_conditions"),
        (b_net, {**b_inputs, "x": b_inputs["x"][..., :11]}, "patch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            net(**inputs)


def test_presets_are_the_released_shapes():
    c, b_lite = CascadeUNetConfig.released_stage_c(), CascadeUNetConfig.released_stage_b_lite()
    assert c == CascadeUNetConfig() and c.widths == [2048, 2048] and c.level_resize == [False]
    assert b_lite.widths == [320, 576, 1152, 1152] and b_lite.up_repeats == [2, 2, 2, 2]


# --- against diffusers' StableCascadeUNet ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(RELEASED))
def test_released_presets_match_diffusers(preset):
    diffusers = pytest.importorskip("diffusers")
    released = RELEASED[preset]
    config = getattr(CascadeUNetConfig, preset)()
    assert cascade_config_from_diffusers(released) == config
    with torch.device("meta"):
        theirs = diffusers.StableCascadeUNet(**released)
        ours = CascadeUNet(config)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f"{preset}: ours {n_ours:,} parameters, diffusers {n_theirs:,}")
    assert n_ours == n_theirs
    key_map = cascade_key_map(config)
    assert sorted(key_map.values()) == sorted(theirs.state_dict())
    assert {k: v for k, v in key_map.items() if k != v}, "the blocks' inner names differ"
    assert all(k.split(".")[0] == v.split(".")[0] for k, v in key_map.items())  # top-level names are the released ones


@pytest.mark.parametrize("config", [STAGE_C, STAGE_C_VARIANT, STAGE_B], ids=["stage_c", "variant", "stage_b"])
def test_config_round_trip(config):
    assert cascade_config_from_diffusers(cascade_config_to_diffusers(config)) == config


def test_unsupported_diffusers_configs():
    base = RELEASED["released_stage_c_lite"]
    for changes, match in (
        ({"out_channels": 4}, "in_channels"),
        ({"clip_image_in_channels": None}, "together"),
        ({"down_blocks_repeat_mappers": None}, "repeat mappers"),
        ({"block_types_per_layer": [_C_TYPES[::-1], _C_TYPES]}, "block types"),
        ({"timestep_conditioning_type": ["sca", "aesthetic"]}, "not supported"),
    ):
        with pytest.raises(InteropError, match=match):
            cascade_config_from_diffusers({**base, **changes})


def _diffusers_pair(config: CascadeUNetConfig, direction: str):
    """(ours, theirs) holding the same random weights, moved ours -> theirs or theirs -> ours through the key map."""
    diffusers = pytest.importorskip("diffusers")
    ours = CascadeUNet(config)
    theirs = diffusers.StableCascadeUNet(**cascade_config_to_diffusers(config))
    key_map = cascade_key_map(config)
    if direction == "ours_to_theirs":
        randomise(ours, 3107)
        state = rename(ours.state_dict(), key_map, theirs.state_dict(), "ours", "CascadeUNet")
        theirs.load_state_dict(state, strict=True)
    else:
        randomise(theirs, 3109)
        inverse = {v: k for k, v in key_map.items()}
        state = rename(theirs.state_dict(), inverse, ours.state_dict(), "diffusers", "StableCascadeUNet")
        ours.load_state_dict(state, strict=True)
    return ours.eval(), theirs.eval()


def _theirs(theirs, inputs: dict) -> torch.Tensor:
    renamed = {"x": "sample", "r": "timestep_ratio", "clip_image": "clip_img"}
    return theirs(**{renamed.get(k, k): v for k, v in inputs.items()}, return_dict=False)[0]


@pytest.mark.parametrize("direction", ["ours_to_theirs", "theirs_to_ours"])
@pytest.mark.parametrize("config", [STAGE_C, STAGE_C_VARIANT], ids=["stage_c", "variant"])
def test_stage_c_matches_diffusers(config, direction):
    ours, theirs = _diffusers_pair(config, direction)
    inputs = stage_c_inputs(config)
    zeros = {**inputs, "clip_image": torch.zeros_like(inputs["clip_image"])}
    pooled_only = {k: v for k, v in inputs.items() if k not in ("clip_text", "clip_image")}
    # diffusers reads sca / crp only for a batch of one (``cond or zeros`` on a tensor)
    one = {**{k: v[:1] for k, v in inputs.items()}, "sca": torch.tensor([0.4]), "crp": torch.tensor([0.8])}
    with torch.no_grad():
        for name, case in (
            ("clip_img", inputs),
            ("clip_img zeros", zeros),
            ("pooled only", pooled_only),
            ("sca crp", one),
        ):
            ours_out, theirs_out = ours(**case), _theirs(theirs, case)
            print(f"{direction} {name}: max |ours - diffusers| = {max_diff(ours_out, theirs_out):.2e}")
            assert ours_out.abs().max() > 1e-2  # the weights reach the output
            assert max_diff(ours_out, theirs_out) <= TOLERANCE, name
        # our clip_image=None is the released pipeline's zero image embedding
        assert (
            max_diff(
                ours(**{**inputs, "clip_image": None}), _theirs(theirs, {**inputs, "clip_image": torch.zeros(2, 1, 12)})
            )
            <= TOLERANCE
        )


@pytest.mark.parametrize("direction", ["ours_to_theirs", "theirs_to_ours"])
def test_stage_b_matches_diffusers(direction):
    ours, theirs = _diffusers_pair(STAGE_B, direction)
    inputs = stage_b_inputs(STAGE_B)
    one = {**{k: v[:1] for k, v in inputs.items()}, "sca": torch.tensor([0.6])}
    with torch.no_grad():
        for name, case in (("effnet pixels", inputs), ("no pixels", {**inputs, "pixels": None}),
                           ("no effnet", {**inputs, "effnet": None}), ("sca", one)):  # fmt: skip
            ours_out, theirs_out = ours(**case), _theirs(theirs, case)
            print(f"{direction} {name}: max |ours - diffusers| = {max_diff(ours_out, theirs_out):.2e}")
            assert ours_out.abs().max() > 1e-2
            assert max_diff(ours_out, theirs_out) <= TOLERANCE, name
