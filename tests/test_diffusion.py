"""Fast tests of the diffusion core (schedule, training pieces, samplers, CFG)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_wuerstchen.diffusion import (
    CosineSchedule,
    cfg,
    cfg_batched,
    ddim_sample,
    ddpm_sample,
    diffusion_loss,
    eps_from_prediction,
    linear_t_list,
    make_loss_weight,
    make_sampler,
    make_t_sampler,
    make_target,
    sample_t_official,
    sample_t_uniform,
    stage_c_default_t_list,
    x0_from_eps,
    x0_from_prediction,
)

TS = [0.0, 0.25, 0.5, 0.75, 1.0]
MEASURED = [0.9999, 0.847, 0.494, 0.144, 1e-4]


def analytic_abar(t: float, s: float = 0.008) -> float:
    v = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return min(max(v, 1e-4), 0.9999)


# ---------------------------------------------------------------------------------------------- schedule
def test_alpha_bar_formula_and_measured_values():
    sched = CosineSchedule()
    abar = sched.alpha_bar(torch.tensor(TS))
    assert abar.dtype == torch.float32
    for a, t, m in zip(abar.tolist(), TS, MEASURED):
        assert a == pytest.approx(analytic_abar(t), abs=1e-6)
        assert a == pytest.approx(m, abs=2e-3)
    lsnr = sched.logsnr(torch.tensor(TS))
    assert torch.allclose(lsnr, torch.log(abar / (1 - abar)), atol=1e-5)


def test_logsnr_shift():
    t = torch.linspace(0, 1, 101)
    plain = CosineSchedule().alpha_bar(t)
    assert torch.equal(CosineSchedule(logsnr_shift=1.0).alpha_bar(t), plain)
    shifted = CosineSchedule(logsnr_shift=2.0)
    mid = torch.tensor([0.25, 0.5, 0.75])
    assert (shifted.alpha_bar(mid) < CosineSchedule().alpha_bar(mid) - 1e-2).all()
    # logSNR shifted by exactly 2*log(1/2) where no clamping is active
    diff = shifted.logsnr(mid) - CosineSchedule().logsnr(mid)
    assert torch.allclose(diff, torch.full_like(diff, 2 * math.log(0.5)), atol=1e-4)
    # clamped endpoints kept
    assert shifted.alpha_bar(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.9999, 1e-4], abs=1e-7)


def test_add_noise_statistics_and_dtype():
    sched = CosineSchedule()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((4, n), 2.0)
    noise = torch.randn(4, n, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = sched.add_noise(x0, t, noise)
    abar = sched.alpha_bar(t)
    assert torch.allclose(x_t.mean(1), 2.0 * abar.sqrt(), atol=0.01)
    assert torch.allclose(x_t.var(1), 1 - abar, atol=0.01)
    xb = sched.add_noise(x0.bfloat16()[:, :16].reshape(4, 2, 8), t, noise[:, :16].reshape(4, 2, 8).bfloat16())
    assert xb.dtype == torch.bfloat16 and xb.shape == (4, 2, 8)


# ---------------------------------------------------------------------------------------------- training
def test_official_t_sampler():
    g = torch.Generator().manual_seed(1)
    t = sample_t_official(400_000, generator=g)
    assert t.shape == (400_000,) and t.dtype == torch.float32
    assert t.min() >= 0.001 and t.max() <= 1.0
    # P(t = 1) = 1 - 0.999/1.08 = 0.075; given t < 1, t ~ U[0.001, 1]
    p_one = 1 - 0.999 / 1.08
    mean = (1 - p_one) * (0.001 + 1.0) / 2 + p_one * 1.0  # = 0.53796
    assert t.mean().item() == pytest.approx(mean, abs=3e-3)
    assert (t == 1.0).float().mean().item() == pytest.approx(p_one, abs=3e-3)
    assert make_t_sampler("official") is sample_t_official
    u = make_t_sampler("uniform")(10_000, generator=g)
    assert u.min() >= 0 and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.02)
    assert make_t_sampler("uniform") is sample_t_uniform
    with pytest.raises(ValueError, match="official"):
        make_t_sampler("bogus")


def test_loss_weights():
    sched = CosineSchedule()
    t = torch.tensor(TS)
    abar = torch.tensor([analytic_abar(v) for v in TS])
    assert torch.allclose(make_loss_weight("none")(t, sched), torch.ones(5))
    assert torch.allclose(make_loss_weight("p2_official")(t, sched), 1 - abar, atol=1e-6)
    snr = abar / (1 - abar)
    assert torch.allclose(make_loss_weight("p2_official")(t, sched), 1 / (1 + snr), atol=1e-5)
    assert torch.allclose(make_loss_weight("p2_paper")(t, sched), (1 - abar) / (1 + abar), atol=1e-6)
    with pytest.raises(ValueError, match="p2_paper"):
        make_loss_weight("p3")


def test_diffusion_loss():
    pred = torch.zeros(2, 3, 4)
    tgt = torch.ones(2, 3, 4)
    tgt[1] *= 2
    assert diffusion_loss(pred, tgt).item() == pytest.approx((1 + 4) / 2)
    w = torch.tensor([1.0, 0.5])
    assert diffusion_loss(pred, tgt, w).item() == pytest.approx((1 + 2) / 2)
    assert diffusion_loss(pred.bfloat16(), tgt.bfloat16(), w).dtype == torch.float32


def test_target_conversions_round_trip():
    sched = CosineSchedule(logsnr_shift=2.0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64).float()
    eps = torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    x_t = sched.add_noise(x0, t, eps)
    for name in ("eps", "v"):
        tgt = make_target(name)
        pred = tgt.target(x0, eps, t, sched)
        assert torch.allclose(eps_from_prediction(pred, x_t, t, sched, name), eps, atol=1e-4)
        x0_rec = x0_from_prediction(pred, x_t, t, sched, name)
        # x0 from eps divides by sqrt(abar) (1e-2 at t=1); check where it is well conditioned
        assert torch.allclose(x0_rec[:4], x0[:4], atol=1e-4)
    assert torch.allclose(x0_from_eps(eps, x_t, t, sched)[:4], x0[:4], atol=1e-4)
    # v definition
    a, b = sched.coefficients(t)
    v = make_target("v").target(x0, eps, t, sched)
    assert torch.allclose(v, a.view(-1, 1, 1, 1) * eps - b.view(-1, 1, 1, 1) * x0, atol=1e-6)
    with pytest.raises(ValueError, match="eps"):
        make_target("x0")


# ---------------------------------------------------------------------------------------------- t lists
def test_stage_c_default_t_list():
    ts = stage_c_default_t_list()
    assert len(ts) - 1 == 29  # 30 grid values = 29 model evaluations
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert all(b < a for a, b in zip(ts, ts[1:]))
    assert ts[19] == pytest.approx(2 / 3)
    assert sum(t >= 2 / 3 - 1e-9 for t in ts) == 20
    lin = linear_t_list(12)
    assert len(lin) == 13 and lin[0] == 1.0 and lin[-1] == 0.0


# ---------------------------------------------------------------------------------------------- samplers
MU, SIGMA = 0.7, 0.3


def gaussian_eps_fn(sched: CosineSchedule, mu: float, sigma: float):
    """Exact eps predictor for data x0 ~ N(mu, sigma²) per dimension."""

    def fn(x_t, t):
        abar = sched.alpha_bar(t).view(-1, *([1] * (x_t.ndim - 1)))
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * mu) / (abar * sigma**2 + 1 - abar)

    return fn


def gaussian_v_fn(sched: CosineSchedule, mu: float, sigma: float):
    eps_fn = gaussian_eps_fn(sched, mu, sigma)

    def fn(x_t, t):
        eps = eps_fn(x_t, t)
        x0 = x0_from_eps(eps, x_t, t, sched)
        return make_target("v").target(x0, eps, t, sched)

    return fn


def sample(sampler, fn, shape, t_list, sched, seed, **kwargs):
    """Start noise and the sampler's own noise from one generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return sampler(fn, torch.randn(shape, generator=generator), t_list, sched, generator=generator, **kwargs)


# Discretisation error of both samplers is O(1/steps); with sigma = 0.3 (data variance << noise
# variance) DDPM at 100 linear steps gives std ~5% low, DDIM ~2% (measured), so use more DDPM steps here
# and check the convergence separately.
@pytest.mark.parametrize("sampler,steps", [(ddpm_sample, 400), (ddim_sample, 100)])
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_sampler_reproduces_gaussian(sampler, steps, shift):
    sched = CosineSchedule(logsnr_shift=shift)
    x = sample(sampler, gaussian_eps_fn(sched, MU, SIGMA), (2, 4096), linear_t_list(steps), sched, seed=3)
    assert x.shape == (2, 4096)
    assert x.mean().item() == pytest.approx(MU, rel=0.02)
    assert x.std().item() == pytest.approx(SIGMA, rel=0.04)


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_sampler_converges_with_steps(sampler):
    sched = CosineSchedule()
    fn = gaussian_eps_fn(sched, MU, SIGMA)
    errs = []
    for steps in (25, 100):
        x = sample(sampler, fn, (4, 4096), linear_t_list(steps), sched, seed=10)
        errs.append(abs(x.std().item() / SIGMA - 1))
        assert x.mean().item() == pytest.approx(MU, rel=0.02)
    assert errs[1] < 0.06 and errs[1] < 0.5 * errs[0]


def test_sampler_v_target_matches_eps_target():
    sched = CosineSchedule()
    tl = stage_c_default_t_list()
    for sampler in (ddim_sample, ddpm_sample):
        xv = sample(sampler, gaussian_v_fn(sched, MU, SIGMA), (2, 4096), tl, sched, seed=4, target="v")
        xe = sample(sampler, gaussian_eps_fn(sched, MU, SIGMA), (2, 4096), tl, sched, seed=4, target="eps")
        assert torch.allclose(xv, xe, atol=1e-3)
        assert xv.mean().item() == pytest.approx(MU, rel=0.02)


def test_cfg_exact_and_batched():
    sched = CosineSchedule()
    cond_fn = gaussian_eps_fn(sched, 0.7, 0.3)
    uncond_fn = gaussian_eps_fn(sched, -0.5, 1.0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    calls = []

    def counting_uncond(x_t, tt):
        calls.append(x_t.shape[0])
        return uncond_fn(x_t, tt)

    assert cfg(cond_fn, counting_uncond, 1.0) is cond_fn
    assert torch.equal(cfg(cond_fn, counting_uncond, 1.0)(x, t), cond_fn(x, t))
    assert calls == []
    assert torch.equal(cfg(cond_fn, uncond_fn, 0.0)(x, t), uncond_fn(x, t))
    w = 4.0
    expected = uncond_fn(x, t) + w * (cond_fn(x, t) - uncond_fn(x, t))
    assert torch.allclose(cfg(cond_fn, uncond_fn, w)(x, t), expected, atol=1e-6)
    with pytest.raises(ValueError):
        cfg(cond_fn, None, 2.0)

    batches = []

    def joint(x_t, tt, mask):
        batches.append(x_t.shape[0])
        assert tt.shape == (x_t.shape[0],) and mask.dtype == torch.bool
        out_c, out_u = cond_fn(x_t, tt), uncond_fn(x_t, tt)
        return torch.where(mask.view(-1, 1, 1), out_c, out_u)

    assert torch.equal(cfg_batched(joint, 1.0)(x, t), cond_fn(x, t))
    assert batches == [3]
    assert torch.equal(cfg_batched(joint, 0.0)(x, t), uncond_fn(x, t))
    assert torch.allclose(cfg_batched(joint, w)(x, t), expected, atol=1e-6)
    assert batches == [3, 6, 6]

    # sampler with guidance == sampler with the batched wrapper (same generator)
    tl = linear_t_list(8)
    a = sample(ddpm_sample, cond_fn, (3, 4, 5), tl, sched, seed=6, guidance_scale=w, uncond_fn=uncond_fn)
    b = sample(ddpm_sample, cfg_batched(joint, w), (3, 4, 5), tl, sched, seed=6)
    assert torch.allclose(a, b, atol=1e-5)
    # w = 1 in the sampler equals plain conditional sampling, uncond never called
    calls.clear()
    c = sample(ddim_sample, cond_fn, (3, 4, 5), tl, sched, seed=6, guidance_scale=1.0, uncond_fn=counting_uncond)
    d = sample(ddim_sample, cond_fn, (3, 4, 5), tl, sched, seed=6)
    assert torch.equal(c, d) and calls == []


def test_progress_seed_dtype_and_x_init():
    sched = CosineSchedule()
    fn = gaussian_eps_fn(sched, MU, SIGMA)
    for name in ("ddpm", "ddim"):
        sampler = make_sampler(name)
        seen = []
        out1 = sample(
            sampler,
            fn,
            (2, 64),
            stage_c_default_t_list(),
            sched,
            seed=7,
            progress=lambda i, n, seen=seen: seen.append((i, n)),
        )
        assert seen == [(i, 29) for i in range(29)]
        out2 = sample(sampler, fn, (2, 64), stage_c_default_t_list(), sched, seed=7)
        assert torch.equal(out1, out2)
        out3 = sample(sampler, fn, (2, 64), stage_c_default_t_list(), sched, seed=8)
        assert not torch.equal(out1, out3)
        ob = sample(sampler, fn, (2, 64), linear_t_list(4), sched, seed=7, dtype=torch.bfloat16)
        assert ob.dtype == torch.bfloat16
        # clamp_x0 bounds the result (final step is a near-identity map of x0_hat)
        oc = sample(sampler, fn, (2, 64), linear_t_list(10), sched, seed=7, clamp_x0=0.5)
        assert oc.abs().max().item() <= 0.5 + 0.05
    # starting from a partially-noised sample with a partial t list
    x_init = torch.randn(2, 64, generator=torch.Generator().manual_seed(9))
    seen = []
    out = ddim_sample(fn, x_init, [0.5, 0.25, 0.0], sched, progress=lambda i, n: seen.append(i))
    assert out.shape == (2, 64) and seen == [0, 1]
    with pytest.raises(ValueError):
        ddim_sample(fn, torch.zeros(2, 4), [0.0, 1.0], sched)
    with pytest.raises(ValueError, match="ddim"):
        make_sampler("euler")


# ---------------------------------------------------------------------------------------------- the Diffusion object
def test_diffusion_object_loss_and_sample():
    from lit_wuerstchen.diffusion import Diffusion, DiffusionConfig, SamplingConfig

    diffusion = Diffusion(DiffusionConfig(loss_weight="none", t_sampler="uniform"))
    x0 = torch.full((3, 2, 4, 4), 0.5)
    seen = []

    def perfect(x_t, t):  # knows x0, so predicts the noise exactly
        seen.append(t)
        a, b = diffusion.schedule.coefficients(t)
        return (x_t - a.view(-1, 1, 1, 1) * x0) / b.view(-1, 1, 1, 1)

    assert diffusion.loss(perfect, x0, torch.Generator().manual_seed(0)).item() == pytest.approx(0.0, abs=1e-8)
    # a fixed generator fixes t and the noise: the same loss twice
    wrong = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    first = diffusion.loss(wrong, x0, torch.Generator().manual_seed(1))
    assert torch.equal(first, diffusion.loss(wrong, x0, torch.Generator().manual_seed(1)))
    assert first.item() == pytest.approx(1.0, rel=0.3)  # E[eps^2] = 1
    # sample() runs the configured sampler over the configured t list, with guidance only when asked
    gaussian = gaussian_eps_fn(diffusion.schedule, MU, SIGMA)
    calls = []

    def uncond(x_t, t):
        calls.append(1)
        return gaussian(x_t, t)

    noise = torch.randn(2, 2048, generator=torch.Generator().manual_seed(2))
    out = diffusion.sample(gaussian, noise, SamplingConfig(sampler="ddim", steps=50), uncond_fn=uncond)
    assert calls == [] and out.mean().item() == pytest.approx(MU, rel=0.03)
    ref = ddim_sample(gaussian, noise, linear_t_list(50), diffusion.schedule)
    assert torch.equal(out, ref)
    diffusion.sample(gaussian, noise, SamplingConfig(sampler="ddim", steps=5, guidance_scale=2.0), uncond_fn=uncond)
    assert len(calls) == 5
