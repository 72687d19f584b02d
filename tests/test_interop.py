"""Released-weights interop: diffusers' Würstchen networks -> `convert` -> ours, and ours -> `export` -> diffusers give
the same outputs on the same inputs (fp32, CPU, tiny random weights; no network)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior  # noqa: E402

from lit_wuerstchen.checkpoints import load_stage_a, network_weights, read_stage_checkpoint  # noqa: E402
from lit_wuerstchen.interop.convert import convert  # noqa: E402
from lit_wuerstchen.interop.export import diffusers_decoder, diffusers_prior, diffusers_vqgan  # noqa: E402
from lit_wuerstchen.interop.keymaps import (  # noqa: E402
    InteropError,
    decoder_config_to_diffusers,
    prior_config_to_diffusers,
    vqgan_config_to_diffusers,
)
from lit_wuerstchen.models import VQGAN, DiffNeXt, DiffNeXtConfig, Prior, PriorConfig, VQGANConfig  # noqa: E402

TOLERANCE = 1e-5
PRIOR = PriorConfig(latent_channels=16, width=64, depth=2, heads=4, text_channels=32, dropout=0.1)
DECODER = DiffNeXtConfig(
    widths=[16, 32, 32, 64],
    blocks=[1, 2, 1, 2],
    heads=[0, 2, 2, 4],
    semantic_proj_channels=24,
    text_channels=24,
    semantic_mappers="per_path",
    semantic_align_corners=True,
    dropout=0.1,
)
VQ = VQGANConfig(
    channels=[16, 32], encoder_blocks=[1, 1], decoder_blocks=[1, 3], codebook_size=64, residual_block="paella"
)


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (zero-initialised heads and gates included), so a wrong map cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif name.startswith(("out.1.", "clf.1.")):
            # the prior divides by |1 - b|: an output head near b = 1 would amplify float rounding without bound
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
        else:
            fan_in = tensor[0].numel() if tensor.ndim > 1 else 4
            tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def prior_inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 16, 5, 4, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, 7, 32, generator=g),
    )


def decoder_inputs(batch=2):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, 32, 16, generator=g)
    return (
        x,
        torch.rand(batch, generator=g),
        torch.randn(batch, 16, 3, 2, generator=g),
        torch.randn(batch, 7, 24, generator=g),
    )


# --- diffusers -> convert -> ours -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random diffusers networks saved as diffusers folders, converted stage by stage (A, then B on it, then C)."""
    root = tmp_path_factory.mktemp("released")
    vqgan = randomise(PaellaVQModel(**vqgan_config_to_diffusers(VQ)), 10)
    decoder = randomise(WuerstchenDiffNeXt(**decoder_config_to_diffusers(DECODER)), 11)
    prior = randomise(WuerstchenPrior(**prior_config_to_diffusers(PRIOR)), 12)
    for name, model in (("vqgan", vqgan), ("decoder", decoder), ("prior", prior)):
        model.save_pretrained(root / "diffusers" / name)
    stage_a, notes_a = convert(root / "diffusers" / "vqgan", "A", root / "stage_a.ckpt")
    stage_b, notes_b = convert(root / "diffusers" / "decoder", "B", root / "stage_b.ckpt", stage_a=stage_a)
    stage_c, notes_c = convert(root / "diffusers" / "prior", "C", root / "stage_c.ckpt", stage_b=stage_b)
    return {
        "theirs": {"A": vqgan, "B": decoder, "C": prior},
        "paths": {"A": stage_a, "B": stage_b, "C": stage_c},
        "notes": notes_a + notes_b + notes_c,
        "root": root,
    }


def test_converted_prior_matches_diffusers(converted):
    checkpoint, record = read_stage_checkpoint(converted["paths"]["C"], "C")
    prior = Prior(record.prior)
    prior.load_state_dict(network_weights(checkpoint, "prior", False, "test"))
    x, r, text = prior_inputs()
    with torch.no_grad():
        diff = max_diff(prior.eval()(x, r, text), converted["theirs"]["C"](x, r, text))
    assert diff <= TOLERANCE
    assert checkpoint["state_dict"]["latent_std"].unique().tolist() == [42.0]


def test_converted_decoder_matches_diffusers(converted):
    checkpoint, record = read_stage_checkpoint(converted["paths"]["B"], "B")
    decoder = DiffNeXt(record.decoder)
    decoder.load_state_dict(network_weights(checkpoint, "decoder", False, "test"))
    x, r, semantic, text = decoder_inputs()
    with torch.no_grad():
        ours = decoder.eval()(x, r, semantic, text)
        theirs = converted["theirs"]["B"](x, r, semantic, clip=text)
    assert max_diff(ours, theirs) <= TOLERANCE
    # the semantic latent is resized to every level (align_corners=True, even at its own size): a 2x2 latent too
    with torch.no_grad():
        small = torch.randn(2, 16, 2, 1)
        assert max_diff(decoder(x, r, small, text), converted["theirs"]["B"](x, r, small, clip=text)) <= TOLERANCE
    assert any("randomly initialised" in note for note in converted["notes"])  # no effnet weights given: said so


def test_converted_vqgan_matches_diffusers(converted):
    ours = load_stage_a(converted["paths"]["A"])
    theirs = converted["theirs"]["A"]
    images = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        latent, their_latent = ours.encode(images), theirs.encode(images).latents
        assert max_diff(latent, their_latent) <= TOLERANCE
        assert max_diff(ours.decode(latent), theirs.decode(latent).sample) <= TOLERANCE
        their_indices = theirs.vquantizer(their_latent)[2][2].view(-1)
        assert torch.equal(ours.quantizer.indices(latent).view(-1), their_indices)
        # the latent scale convention of the released pipeline: Stage B's latent * scale_factor is decoded
        stage_b_latent = ours.to_stage_b(latent)
        assert max_diff(ours.from_stage_b(stage_b_latent), latent) <= TOLERANCE
        assert stage_b_latent.std() > latent.std()  # divided by 0.3764


def test_convert_official_pt_layout(tmp_path, converted):
    """The official checkpoints pack q/k/v into nn.MultiheadAttention's in_proj: the converter unpacks them."""
    theirs = converted["theirs"]["C"]
    official = {}
    state = theirs.state_dict()
    for key, value in state.items():
        if ".attention.to_q." in key:
            kind = key.rsplit(".", 1)[1]
            base = key.split(".attention.")[0]
            packed = [state[f"{base}.attention.{n}.{kind}"] for n in ("to_q", "to_k", "to_v")]
            official[f"{base}.attention.attn.in_proj_{kind}"] = torch.cat(packed)
        elif ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        elif ".attention.to_out.0." in key:
            official[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = value
        else:
            official[key] = value
    torch.save({"ema_state_dict": official}, tmp_path / "model_v2_stage_c.pt")
    out, _ = convert(tmp_path / "model_v2_stage_c.pt", "C", tmp_path / "c.ckpt", stage_b=converted["paths"]["B"])
    checkpoint, record = read_stage_checkpoint(out, "C")
    assert record.prior.width == PRIOR.width and record.prior.depth == PRIOR.depth
    prior = Prior(dataclasses.replace(record.prior, heads=PRIOR.heads))
    prior.load_state_dict(network_weights(checkpoint, "prior", False, "test"))
    x, r, text = prior_inputs()
    with torch.no_grad():
        assert max_diff(prior.eval()(x, r, text), theirs(x, r, text)) <= TOLERANCE


def test_convert_refuses_wrong_kind_and_overwrite(converted, tmp_path):
    root = converted["root"]
    with pytest.raises(InteropError, match=r"holds no WuerstchenPrior \(Stage C\); found: PaellaVQModel \(A\)"):
        convert(root / "diffusers" / "vqgan", "C", tmp_path / "x.ckpt", stage_b=converted["paths"]["B"])
    with pytest.raises(InteropError, match="exists; pass --overwrite"):
        convert(root / "diffusers" / "vqgan", "A", converted["paths"]["A"])
    with pytest.raises(InteropError, match="needs the converted Stage B"):
        convert(root / "diffusers" / "prior", "C", tmp_path / "c.ckpt")


def test_convert_refuses_leftover_and_misshapen_tensors(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "prior"
    converted["theirs"]["C"].save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({**state, "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(InteropError, match=r"1 Stage C prior tensor\(s\) have no place in the target.*'extra.weight'"):
        convert(folder, "C", tmp_path / "c.ckpt", stage_b=converted["paths"]["B"])
    state["out.1.bias"] = torch.zeros(3)
    save_file(state, weights)
    with pytest.raises(InteropError, match=r"'out.1.bias' has shape \(3,\), the target needs \(32,\)"):
        convert(folder, "C", tmp_path / "c.ckpt", stage_b=converted["paths"]["B"])


# --- ours -> export -> diffusers --------------------------------------------------------------------------------------
def test_exported_networks_match_ours():
    prior = randomise(Prior(PRIOR), 20)
    decoder = randomise(DiffNeXt(DECODER), 21)
    vqgan = randomise(VQGAN(VQ), 22)
    with torch.no_grad():
        x, r, text = prior_inputs()
        assert max_diff(prior(x, r, text), diffusers_prior(prior)(x, r, text)) <= TOLERANCE
        x, r, semantic, text = decoder_inputs()
        assert (
            max_diff(decoder(x, r, semantic, text), diffusers_decoder(decoder)(x, r, semantic, clip=text)) <= TOLERANCE
        )
        images = torch.rand(2, 3, 16, 16)
        theirs = diffusers_vqgan(vqgan)
        assert max_diff(vqgan.encode(images), theirs.encode(images).latents) <= TOLERANCE
        latent = torch.randn(2, 4, 4, 4)
        assert max_diff(vqgan.decode(latent), theirs.decode(latent).sample) <= TOLERANCE


def test_export_refuses_structures_diffusers_cannot_hold():
    with pytest.raises(InteropError, match="always conditions its attention on text"):
        decoder_config_to_diffusers(DiffNeXtConfig(widths=[8, 16], blocks=[1, 1], heads=[0, 2], semantic_levels=[1]))
    with pytest.raises(InteropError, match="residual_block must be 'paella'"):
        vqgan_config_to_diffusers(VQGANConfig(channels=[16, 32]))
    with pytest.raises(InteropError, match="3x3 depthwise"):
        prior_config_to_diffusers(PriorConfig(width=32, depth=1, heads=2, text_channels=8, kernel_size=5))


def test_released_configs_have_the_released_sizes():
    """Parameter counts of the released v2 networks (diffusers' defaults / warp-ai configs), built on meta."""
    with torch.device("meta"):
        decoder = DiffNeXt(DiffNeXtConfig.released_v2())
        prior = Prior(PriorConfig())
        vqgan = VQGAN(VQGANConfig.released_v2())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(decoder) == 1_055_365_280
    assert count(prior) == 993_636_896
    assert 18_000_000 < count(vqgan) < 19_000_000
