"""Stable Cascade's diffusion pieces (issue 23 item 2) against the formulas of its training code (``gdf/``,
``train/train_c.py``, ``train/train_b.py``, ``train/base.py``), written out here from that maths rather than by
calling our functions twice."""

from __future__ import annotations

import math

import pytest
import torch

from lit_wuerstchen.diffusion import (
    CASCADE_CAPTION_DROP,
    CASCADE_EFFNET_DROP,
    CASCADE_IMAGE_EMBED_DROP,
    AdaptiveLossWeight,
    CosineSchedule,
    Diffusion,
    DiffusionConfig,
    SamplingConfig,
    cascade_stage_b_diffusion,
    cascade_stage_c_diffusion,
    cosine_t_from_logsnr,
    diffusion_loss,
    drop_conditions,
    drop_mask,
    make_loss_weight,
    make_noise,
    make_noise_cond,
    make_t_sampler,
    p2_official_weight,
    pyramid_noise,
    sample_t_official,
)

SEED_A, SEED_B, SEED_C = 4111, 4127, 4133
S = 0.008
LO, HI = 1e-4, 0.9999


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------- the official maths, written out (float64)
def gdf_logsnr(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """gdf.CosineSchedule(clamp_range=[1e-4, 0.9999]) called with ``shift``: var clamped, logSNR, shifted, then
    clamped to the limits the schedule computed at construction (t = 1 and t = 0, unshifted)."""

    def plain(tt):
        s = torch.tensor(S, dtype=torch.float64)
        min_var = torch.cos(s / (1 + s) * math.pi * 0.5) ** 2
        var = torch.cos((s + tt) / (1 + s) * math.pi * 0.5).clamp(0, 1) ** 2 / min_var
        var = var.clamp(LO, HI)
        return (var / (1 - var)).log()

    t = t.double().clamp(0, 1)
    lo_lim, hi_lim = plain(torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
    logsnr = plain(t)
    if shift != 1:
        logsnr = logsnr + 2 * math.log(1 / shift)
    return logsnr.clamp(lo_lim, hi_lim)


def gdf_cosine_t(logsnr: torch.Tensor) -> torch.Tensor:
    """gdf.CosineTNoiseCond: invert the unclamped cosine schedule at sigmoid(logSNR), clamp to [0, 1]."""
    s = torch.tensor(S, dtype=torch.float64)
    min_var = torch.cos(s / (1 + s) * math.pi * 0.5) ** 2
    var = logsnr.double().sigmoid().clamp(0, 1)
    t = ((var * min_var) ** 0.5).acos() / (math.pi * 0.5) * (1 + s) - s
    return t.clamp(0, 1)


def gdf_pyramid(eps: torch.Tensor, g: torch.Generator, size_range=(1, 16), levels=10) -> torch.Tensor:
    """train_b.py ``_pyramid_noise`` for a square latent whose side is a power of two: nearest upsampling of a
    side-s grid to H is repeating each cell H // s times."""
    out, mults = eps.double().clone(), [1.0]
    H = eps.shape[-2]
    for i in range(1, levels):
        m, side = 0.75**i, H // 2**i
        if size_range[0] <= side <= size_range[1]:
            offset = torch.randn(eps.shape[0], eps.shape[1], side, side, generator=g).double()
            out = out + offset.repeat_interleave(H // side, -2).repeat_interleave(H // side, -1) * m
            mults.append(m)
        if side <= 1:
            break
    return out / math.sqrt(sum(m * m for m in mults))


def gdf_bucket(edges: list[float], logsnr: float) -> int:
    """torch.searchsorted(edges, x) with right=False: the number of edges strictly below x."""
    return sum(1 for e in edges if e < logsnr)


# ------------------------------------------------------------------------------------------------ default unchanged
def test_default_config_loss_is_bit_identical_to_the_v2_assembly():
    x0 = torch.randn(5, 3, 4, 4, generator=gen(SEED_A))
    w = torch.randn(3, 3, generator=gen(SEED_B))

    def model(x_t, t):
        return torch.einsum("bchw,cd->bdhw", x_t, w) * (1 + t.view(-1, 1, 1, 1))

    # what Diffusion.loss computed before the Stable Cascade pieces, from the existing functions
    g = gen(SEED_C)
    sched = CosineSchedule()
    t = sample_t_official(5, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    expected = diffusion_loss(model(sched.add_noise(x0, t, noise), t), noise, p2_official_weight(t, sched))
    got = Diffusion(DiffusionConfig()).loss(model, x0, gen(SEED_C))
    assert torch.equal(got, expected)
    assert Diffusion(DiffusionConfig()).state_dict() == {}


# ------------------------------------------------------------------------------------------------ schedule shift
@pytest.mark.parametrize("shift", [1.0, 2.0, 4.0, 0.5])
def test_gdf_shift_mode_matches_gdf_schedule(shift):
    t = torch.tensor([0.0, 0.0005, 0.001, 0.002, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 1.0])
    ours = CosineSchedule(logsnr_shift=shift, shift_mode="gdf")
    official = gdf_logsnr(t, shift)
    assert torch.allclose(ours.alpha_bar(t).double(), official.sigmoid(), atol=2e-7, rtol=1e-5)
    assert torch.allclose(ours.logsnr(t).double(), official, atol=2e-3)
    if shift == 1.0:  # no shift: the same bits as the default mode
        assert torch.equal(ours.alpha_bar(t), CosineSchedule().alpha_bar(t))


def test_gdf_shift_mode_lowers_the_top_end_unlike_keep_ends():
    t0 = torch.tensor([0.0])
    gdf = CosineSchedule(logsnr_shift=2.0, shift_mode="gdf").alpha_bar(t0).item()
    assert gdf == pytest.approx(1 / (1 + math.exp(-(math.log(HI / (1 - HI)) - 2 * math.log(2)))), rel=1e-6)
    assert CosineSchedule(logsnr_shift=2.0).alpha_bar(t0).item() == pytest.approx(HI, abs=1e-7)
    with pytest.raises(ValueError, match="shift_mode"):
        CosineSchedule(shift_mode="sd3")


# ------------------------------------------------------------------------------------------------ t sampler
def test_gdf_t_sampler_matches_gdf_formula():
    u = torch.rand(4096, generator=gen(SEED_A))
    expected = (1 - u).add(0.001).clamp(0.001, 1.0)  # gdf.CosineSchedule.schedule with t=None
    got = make_t_sampler("gdf")(4096, generator=gen(SEED_A))
    assert torch.equal(got, expected)
    assert got.min().item() >= 0.001 and got.max().item() <= 1.0
    assert (got == 1.0).float().mean().item() < 0.01  # ~0.1% at t=1, not Würstchen's ~7.5%


# ------------------------------------------------------------------------------------------------ noise condition
def test_cosine_t_noise_cond_matches_gdf():
    logsnr = torch.tensor([-30.0, -9.21, -5.0, -1.0, 0.0, 0.5, 3.0, 9.21, 30.0])
    assert torch.allclose(cosine_t_from_logsnr(logsnr).double(), gdf_cosine_t(logsnr), atol=2e-5)
    t = torch.tensor([0.0, 0.001, 0.05, 0.3, 0.5, 0.8, 0.95, 0.999, 1.0])
    cond = make_noise_cond("cosine_t")
    for shift in (1.0, 2.0):
        sched = CosineSchedule(logsnr_shift=shift, shift_mode="gdf")
        # the network's input: CosineTNoiseCond of the schedule's (shifted) logSNR, as GDF.diffuse / GDF.sample
        assert torch.allclose(cond(t, sched).double(), gdf_cosine_t(gdf_logsnr(t, shift)), atol=5e-5)
    # inside the clamp range and without a shift it is t itself; "t" passes t through untouched
    mid = torch.tensor([0.1, 0.4, 0.6, 0.9])
    assert torch.allclose(cond(mid, CosineSchedule()), mid, atol=5e-5)
    assert make_noise_cond("t")(mid, CosineSchedule()) is mid
    with pytest.raises(ValueError, match="noise condition"):
        make_noise_cond("logsnr")


# ------------------------------------------------------------------------------------------------ adaptive weight
def test_adaptive_loss_weight_bucket_updates_by_hand():
    buckets, beta = 300, 0.99
    edges = [-10 + 20 * i / (buckets - 2) for i in range(buckets - 1)]  # linspace(-10, 10, buckets - 1)
    losses = [1.0] * buckets
    alw = AdaptiveLossWeight()
    assert torch.allclose(alw.bucket_ranges.double(), torch.tensor(edges, dtype=torch.float64), atol=1e-5)

    g = gen(SEED_B)
    for step in range(4):
        # samples spread over and beyond [-10, 10], with two sharing a bin (the last one's update is kept)
        logsnr = torch.cat([torch.rand(6, generator=g) * 26 - 13, torch.tensor([0.01, 0.02])])
        loss = torch.rand(8, generator=g) * 2 + 0.1
        idx = [gdf_bucket(edges, v) for v in logsnr.tolist()]
        assert alw.bucket_index(logsnr).tolist() == idx
        # weight = clamp(1 / L[bin], 1e-7, 1e7), read before the update
        expected_w = [min(max(1 / losses[i], 1e-7), 1e7) for i in idx]
        assert alw.weight_from_logsnr(logsnr).tolist() == pytest.approx(expected_w, rel=1e-6)
        old = list(losses)
        for i, v in zip(idx, loss.tolist()):  # every right-hand side from the old losses, the last write wins
            losses[i] = old[i] * beta + v * (1 - beta)
        alw.update_from_logsnr(logsnr, loss)
        assert alw.bucket_losses.tolist() == pytest.approx(losses, rel=1e-6), step
    assert idx[-1] == idx[-2]

    # the state is two buffers: saved and restored whole
    fresh = AdaptiveLossWeight()
    fresh.load_state_dict(alw.state_dict())
    assert torch.equal(fresh.bucket_losses, alw.bucket_losses)
    assert sorted(alw.state_dict()) == ["bucket_losses", "bucket_ranges"]
    with pytest.raises(ValueError, match="options"):
        make_loss_weight("p2_official", buckets=3)


def test_adaptive_state_updates_on_training_steps_only():
    diffusion = Diffusion(cascade_stage_c_diffusion())
    x0 = torch.randn(4, 2, 3, 3, generator=gen(SEED_A))
    model = lambda x_t, r: x_t * 0.5  # noqa: E731
    before = diffusion.loss_weight.bucket_losses.clone()
    with torch.no_grad():  # validation: no update
        diffusion.loss(model, x0, gen(SEED_B))
    assert torch.equal(diffusion.loss_weight.bucket_losses, before)
    diffusion.loss(model, x0, gen(SEED_B), update_loss_weight=False)
    assert torch.equal(diffusion.loss_weight.bucket_losses, before)
    diffusion.loss(model, x0, gen(SEED_B))  # autograd on: a training step
    assert not torch.equal(diffusion.loss_weight.bucket_losses, before)
    state = diffusion.state_dict()
    other = Diffusion(cascade_stage_c_diffusion())
    other.load_state_dict(state)
    assert torch.equal(other.loss_weight.bucket_losses, diffusion.loss_weight.bucket_losses)
    with pytest.raises(KeyError):
        other.load_state_dict({})
    with pytest.raises(KeyError):
        Diffusion(DiffusionConfig()).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("stage,adaptive", [("c", True), ("c", False), ("b", True)])
def test_cascade_loss_end_to_end_matches_gdf_assembly(stage, adaptive):
    B = 6
    x0 = torch.randn(B, 4, 32, 32, generator=gen(SEED_A))
    w = torch.randn(4, 4, generator=gen(SEED_B)) * 0.3
    seen = []

    def model(x_t, r):
        seen.append(r)
        return torch.einsum("bchw,cd->bdhw", x_t, w) + r.view(-1, 1, 1, 1)

    preset = cascade_stage_c_diffusion if stage == "c" else cascade_stage_b_diffusion
    diffusion = Diffusion(preset(adaptive=adaptive))
    hand_buckets = None
    if adaptive:  # non-trivial running losses to weigh by
        hand_buckets = torch.rand(300, generator=gen(SEED_C)) + 0.5
        state = diffusion.state_dict()
        state["loss_weight"]["bucket_losses"] = hand_buckets.clone()
        diffusion.load_state_dict(state)
    got = diffusion.loss(model, x0, gen(SEED_C + 1))

    # GDF.diffuse by hand, with the same draws: t from the schedule's own sampler, then eps
    g = gen(SEED_C + 1)
    u = torch.rand(B, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    if stage == "b":  # train_b.py: epsilon = _pyramid_noise(randn_like(latents), size_range=[1, 16])
        eps = gdf_pyramid(eps, g)
    t = (1 - u).add(0.001).clamp(0.001, 1.0)
    logsnr = gdf_logsnr(t)  # shift=1 in train_c / train_b
    a, b = logsnr.sigmoid().sqrt(), (1 - logsnr.sigmoid()).sqrt()  # VPScaler
    noised = x0.double() * a.view(-1, 1, 1, 1) + eps.double() * b.view(-1, 1, 1, 1)
    r = gdf_cosine_t(logsnr)  # CosineTNoiseCond
    pred = torch.einsum("bchw,cd->bdhw", noised, w.double()) + r.view(-1, 1, 1, 1)
    per_sample = ((pred - eps.double()) ** 2).mean(dim=[1, 2, 3])  # EpsilonTarget, mse(...).mean(dim=[1, 2, 3])
    if adaptive:
        edges = torch.linspace(-10, 10, 299, dtype=torch.float64)
        weight = (1 / hand_buckets.double()[torch.searchsorted(edges, logsnr)]).clamp(1e-7, 1e7)
    else:
        weight = (1 + logsnr.exp()) ** -1.0  # P2LossWeight(k=1, gamma=1, s=1)
    expected = (per_sample * weight).mean()

    assert torch.allclose(seen[0].double(), r, atol=5e-5)
    assert got.item() == pytest.approx(expected.item(), rel=2e-5)
    if adaptive:  # then update_buckets(logSNR, loss) with the unweighted per-sample losses
        losses = hand_buckets.double().clone()
        idx = torch.searchsorted(edges, logsnr).tolist()
        old = losses.clone()
        for i, v in zip(idx, per_sample.tolist()):
            losses[i] = old[i] * 0.99 + v * 0.01
        assert torch.allclose(diffusion.loss_weight.bucket_losses.double(), losses, rtol=1e-5)


def test_cascade_sampling_feeds_the_noise_condition():
    config = cascade_stage_c_diffusion(adaptive=False)
    config.logsnr_shift = 2.0  # Stable Cascade samples its Stage C with shift 2
    diffusion = Diffusion(config)
    seen = []

    def model(x_t, r):
        seen.append(r.clone())
        return torch.zeros_like(x_t)

    noise = torch.randn(2, 8, generator=gen(SEED_A))
    diffusion.sample(model, noise, SamplingConfig(sampler="ddim", steps=4))
    ts = torch.tensor([1.0, 0.75, 0.5, 0.25])
    expected = gdf_cosine_t(gdf_logsnr(ts, 2.0))
    assert torch.allclose(torch.stack([s[0] for s in seen]).double(), expected, atol=5e-5)
    # the shifted schedule is noisier, so inside the clamp range the network sees a later t than the step's
    assert (torch.stack([s[0] for s in seen[1:]]) > ts[1:]).all()
    assert seen[0][0].item() < 1.0  # t=1 sits at the clamp end (alpha_bar 1e-4), whose cosine-t is below 1


# ------------------------------------------------------------------------------------------------ condition dropout
def test_drop_conditions_official_probabilities_and_rows():
    assert (CASCADE_CAPTION_DROP, CASCADE_IMAGE_EMBED_DROP, CASCADE_EFFNET_DROP) == (0.05, 0.9, 0.1)
    cond = torch.randn(64, 3, 5, generator=gen(SEED_A))
    empty = torch.randn(1, 3, 5, generator=gen(SEED_B))
    out, mask = drop_conditions(cond, 0.3, generator=gen(SEED_C), replacement=empty)
    # official: keep iff rand > p (caption, image embedding), i.e. drop iff U <= p; ours drops iff U < p
    u = torch.rand(64, generator=gen(SEED_C))
    assert torch.equal(mask, u < 0.3) and 0 < int(mask.sum()) < 64
    assert torch.equal(out[mask], empty.expand(int(mask.sum()), 3, 5))
    assert torch.equal(out[~mask], cond[~mask])
    # zeros by default, a shared mask drops two conditions together, cond untouched
    pooled = torch.randn(64, 1, 7, generator=gen(SEED_A))
    pooled_out, same = drop_conditions(pooled, mask=mask)
    assert torch.equal(same, mask) and (pooled_out[mask] == 0).all() and torch.equal(pooled_out[~mask], pooled[~mask])
    assert not torch.equal(out, cond)
    assert not drop_mask(100, 0.0, gen(SEED_A)).any() and drop_mask(100, 1.0, gen(SEED_A)).all()
    rate = drop_mask(20000, CASCADE_CAPTION_DROP, gen(SEED_B)).float().mean().item()
    assert rate == pytest.approx(0.05, abs=0.006)
    with pytest.raises(ValueError):
        drop_mask(4, 1.5)


# ------------------------------------------------------------------------------------------------ presets
def test_pyramid_noise_matches_train_b():
    eps = torch.randn(3, 2, 32, 32, generator=gen(SEED_A))
    g = gen(SEED_B)
    got = pyramid_noise(eps, generator=g)
    assert torch.allclose(got.double(), gdf_pyramid(eps, gen(SEED_B)), atol=1e-6)
    assert torch.equal(eps, torch.randn(3, 2, 32, 32, generator=gen(SEED_A)))  # input untouched
    # levels with sides 16, 8, 4, 2, 1 for a 32 latent: five offset draws, then nothing more
    assert g.get_state().equal(_after_draws(SEED_B, [(3, 2, s, s) for s in (16, 8, 4, 2, 1)]).get_state())
    big = pyramid_noise(torch.randn(8, 4, 64, 64, generator=gen(SEED_C)), generator=gen(SEED_A))
    assert big.std().item() == pytest.approx(1.0, abs=0.05)  # unit variance per element
    assert make_noise("gaussian") is None and make_noise("pyramid") is pyramid_noise
    with pytest.raises(ValueError):
        pyramid_noise(torch.zeros(2, 8))


def _after_draws(seed: int, shapes) -> torch.Generator:
    g = gen(seed)
    for shape in shapes:
        torch.randn(*shape, generator=g)
    return g


def test_cascade_presets_carry_the_official_settings():
    assert cascade_stage_c_diffusion().noise == "gaussian" and cascade_stage_b_diffusion().noise == "pyramid"
    for preset in (cascade_stage_c_diffusion, cascade_stage_b_diffusion):
        c = preset()
        assert (c.schedule_s, c.logsnr_shift, c.shift_mode, c.t_sampler, c.target, c.noise_cond, c.loss_weight) == (
            0.008, 1.0, "gdf", "gdf", "eps", "cosine_t", "adaptive",
        )  # fmt: skip
        assert (c.adaptive_buckets, tuple(c.adaptive_logsnr_range), c.adaptive_beta) == (300, (-10.0, 10.0), 0.99)
        assert preset(adaptive=False).loss_weight == "p2_official"
        d = Diffusion(c)
        assert isinstance(d.loss_weight, AdaptiveLossWeight) and d.schedule.clamp_range == (LO, HI)
