"""Samplers (DDPM ancestral, DDIM eta=0) over an explicit descending list of t values, plus CFG.

Every sampler has the same signature::

    sampler(model_fn, noise, t_list, schedule, *, target, guidance_scale, uncond_fn, generator, progress,
            dtype, clamp_x0) -> x_0

``noise`` is the start sample at ``t_list[0]`` (pure noise for a list starting at 1, or a partly noised sample for
a shorter list); ``generator`` draws the per-step noise of DDPM. :meth:`lit_wuerstchen.diffusion.Diffusion.sample`
picks the sampler and t list from a :class:`SamplingConfig`.

Model-function contract
-----------------------
A *model_fn* is ``model_fn(x_t, t) -> prediction`` with ``x_t`` of shape [B, ...] (in the sampler's
``dtype``) and ``t`` a float32 tensor of shape [B]; the prediction has x_t's shape and is of kind
``target`` ("eps" or "v").  Conditioning (text embeddings, Stage-C latents, ...) is closed over by the
caller, e.g. ``lambda x, t: model(x, t, clip_text=emb)``.

Classifier-free guidance: ``guided = torch.lerp(uncond, cond, w) = uncond + w·(cond - uncond)`` (lerp, as the
released pipelines compute it: the same value to the last bit), applied to the raw prediction (every
target conversion is affine in the prediction for fixed x_t, so this equals guiding eps or x0).  Two ways:

* pass ``guidance_scale=w`` and ``uncond_fn`` (a model_fn with the condition dropped) to a sampler, which
  wraps them with :func:`cfg` (two forwards of B);
* or wrap once with :func:`cfg_batched` — ``joint_fn(x, t, cond_mask) -> prediction`` where ``cond_mask``
  is a bool tensor [N] (True = conditional, False = condition dropped) — which runs ONE forward of 2B
  (first half conditional, second half unconditional), and pass the result as ``model_fn`` with the
  default ``guidance_scale=1``.

With ``w == 1`` both wrappers return exactly the conditional prediction and skip the unconditional
forward; ``w == 0`` gives the unconditional prediction.

t lists
-------
A t list is the descending grid ``[t_0 = 1, t_1, ..., t_N]``; the model is evaluated at ``t_0..t_{N-1}``
and each step moves x from ``t_i`` to ``t_{i+1}``, so a list of N+1 values means N model evaluations
(and N progress callbacks).  If it ends at 0 the last step adds no noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .schedule import CosineSchedule, expand_like
from .training import Target, make_target

ModelFn = Callable[[Tensor, Tensor], Tensor]
ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# t lists
# --------------------------------------------------------------------------------------------------
def stage_c_default_t_list() -> list[float]:
    """Official Würstchen Stage C grid: 30 values, 29 model evaluations.

    ``linspace(1, 2/3, 20)`` followed by ``linspace(2/3, 0, 11)[1:]`` (2/3 not repeated): 20 values in
    [1, 2/3] and 10 in (2/3, 0].  The model is evaluated at the first 29 values (all t > 0); the final
    step lands on t = 0.  This matches diffusers' ``DEFAULT_STAGE_C_TIMESTEPS`` + ``timesteps[:-1]``.
    """
    first = torch.linspace(1.0, 2.0 / 3.0, 20, dtype=torch.float64).tolist()
    second = torch.linspace(2.0 / 3.0, 0.0, 11, dtype=torch.float64).tolist()[1:]
    return [float(v) for v in first + second]


def linear_t_list(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> list[float]:
    """``steps + 1`` evenly spaced values from t_start to t_end, i.e. ``steps`` model evaluations."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [float(v) for v in torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64).tolist()]


def _check_t_list(t_list: Sequence[float] | Tensor) -> list[float]:
    ts = [float(v) for v in (t_list.tolist() if isinstance(t_list, Tensor) else t_list)]
    if len(ts) < 2:
        raise ValueError("t_list needs at least 2 values (N+1 values = N model evaluations)")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"t_list must be strictly decreasing, got {ts}")
    if ts[0] > 1.0 or ts[-1] < 0.0:
        raise ValueError("t_list values must lie in [0, 1]")
    return ts


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------
def cfg(cond_fn: ModelFn, uncond_fn: ModelFn | None, guidance_scale: float) -> ModelFn:
    """``uncond + w·(cond - uncond)`` from two model_fns (two forwards); w == 1 -> cond_fn itself."""
    if guidance_scale == 1.0:
        return cond_fn
    if uncond_fn is None:
        raise ValueError("guidance_scale != 1 requires uncond_fn")
    w = float(guidance_scale)

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        uncond = uncond_fn(x_t, t)
        if w == 0.0:
            return uncond
        return torch.lerp(uncond, cond_fn(x_t, t), w)

    return guided


def cfg_batched(joint_fn: Callable[[Tensor, Tensor, Tensor], Tensor], guidance_scale: float) -> ModelFn:
    """CFG with one forward of 2B: ``joint_fn(x, t, cond_mask)``, cond_mask bool [N] (True = conditional).

    The batch passed to joint_fn is ``cat([x, x])`` with ``cond_mask = [True]*B + [False]*B``; with
    w == 1 only the B conditional samples are run.
    """
    w = float(guidance_scale)

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        b = x_t.shape[0]
        if w == 1.0:
            return joint_fn(x_t, t, torch.ones(b, dtype=torch.bool, device=x_t.device))
        mask = torch.cat(
            [torch.ones(b, dtype=torch.bool, device=x_t.device), torch.zeros(b, dtype=torch.bool, device=x_t.device)]
        )
        out = joint_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), mask)
        cond, uncond = out[:b], out[b:]
        if w == 0.0:
            return uncond
        return torch.lerp(uncond, cond, w)

    return guided


# --------------------------------------------------------------------------------------------------
# Single steps (float32 maths; t, t_next tensors [B])
# --------------------------------------------------------------------------------------------------
def _predict(
    model_fn: ModelFn,
    x: Tensor,
    t: Tensor,
    schedule: CosineSchedule,
    target: Target,
    dtype: torch.dtype,
    clamp_x0: float | None,
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) in float32; eps is recomputed from the clamped x0 when clamping."""
    pred = model_fn(x.to(dtype), t)
    x0 = target.to_x0(pred, x, t, schedule)
    eps = target.to_eps(pred, x, t, schedule)
    if clamp_x0 is not None:
        x0 = x0.clamp(-clamp_x0, clamp_x0)
        a, b = schedule.coefficients(t)
        eps = (x - expand_like(a, x) * x0) / expand_like(b, x)
    return x0, eps


def ddpm_step(
    x_t: Tensor, eps_hat: Tensor, t: Tensor, t_next: Tensor, schedule: CosineSchedule, noise: Tensor | None
) -> Tensor:
    """Ancestral step: sample q(x_{t_next} | x_t, x0_hat) written with the noise estimate, in the arithmetic of the
    released sampler (diffusers' ``DDPMWuerstchenScheduler.step``: the same value to the last bit, so a converted
    model samples what diffusers samples); ``noise=None`` returns the posterior mean."""
    abar_t = expand_like(schedule.alpha_bar(t), x_t)
    abar_s = expand_like(schedule.alpha_bar(t_next), x_t)
    alpha = abar_t / abar_s  # alpha of the transition t_next -> t
    mean = (1.0 / alpha).sqrt() * (x_t - (1 - alpha) * eps_hat / (1 - abar_t).sqrt())
    if noise is None:
        return mean
    return mean + ((1 - alpha) * (1.0 - abar_s) / (1.0 - abar_t)).sqrt() * noise


def ddim_step(x_t: Tensor, x0_hat: Tensor, eps_hat: Tensor, t_next: Tensor, schedule: CosineSchedule) -> Tensor:
    """Deterministic DDIM (eta = 0): x_s = sqrt(abar_s)·x0_hat + sqrt(1-abar_s)·eps_hat."""
    a, b = schedule.coefficients(t_next)
    return expand_like(a, x_t) * x0_hat + expand_like(b, x_t) * eps_hat


# --------------------------------------------------------------------------------------------------
# Sampling loops
# --------------------------------------------------------------------------------------------------
class Sampler:
    """A sampling loop over a descending t list with one update rule. Every sampler is one of these, so all share
    the call signature ``sampler(model_fn, noise, t_list, schedule, *, target, guidance_scale, uncond_fn,
    generator, progress, dtype, clamp_x0)``; ``noise`` is the start sample at ``t_list[0]``."""

    def __init__(self, name: str, update: Callable[..., Tensor], description: str):
        self.name, self.update = name, update
        self.__doc__ = description

    def __repr__(self) -> str:
        return f"Sampler({self.name!r})"

    def __call__(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        t_list: Sequence[float] | Tensor,
        schedule: CosineSchedule,
        *,
        target: str | Target = "eps",
        guidance_scale: float = 1.0,
        uncond_fn: ModelFn | None = None,
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
        dtype: torch.dtype = torch.float32,
        clamp_x0: float | None = None,
    ) -> Tensor:
        ts = _check_t_list(t_list)
        tgt = make_target(target)
        fn = cfg(model_fn, uncond_fn, guidance_scale)
        x = noise.to(torch.float32)
        b, device = x.shape[0], x.device
        total = len(ts) - 1
        with torch.no_grad():
            for i in range(total):
                t = torch.full((b,), ts[i], device=device, dtype=torch.float32)
                t_next = torch.full((b,), ts[i + 1], device=device, dtype=torch.float32)
                x0_hat, eps_hat = _predict(fn, x, t, schedule, tgt, dtype, clamp_x0)
                x = self.update(x, x0_hat, eps_hat, t, t_next, ts[i + 1] == 0.0, schedule, generator)
                if progress is not None:
                    progress(i, total)
        return x.to(dtype)


def _ddpm_update(x, x0_hat, eps_hat, t, t_next, to_zero, schedule, generator):
    # Drawn at every step, the last (unused) one too, as diffusers' DDPMWuerstchenScheduler does: one generator
    # shared by Stage C and Stage B then gives both frameworks the same noise.
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return ddpm_step(x, eps_hat, t, t_next, schedule, None if to_zero else noise)


def _ddim_update(x, x0_hat, eps_hat, t, t_next, to_zero, schedule, generator):
    return ddim_step(x, x0_hat, eps_hat, t_next, schedule)


ddpm_sample = Sampler(
    "ddpm",
    _ddpm_update,
    """DDPM ancestral sampling: each step samples the posterior q(x_{t_next} | x_t, x0_hat) built from abar(t) and
    abar(t_next), its noise drawn from ``generator``; the step to t_next == 0 adds no noise.""",
)
ddim_sample = Sampler(
    "ddim",
    _ddim_update,
    """Deterministic DDIM (eta = 0): x_s = sqrt(abar_s)·x0_hat + sqrt(1-abar_s)·eps_hat (``generator`` unused).""",
)

SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm_sample, "ddim": ddim_sample}


def make_sampler(name: str) -> Callable[..., Tensor]:
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {sorted(SAMPLERS)}")
    return SAMPLERS[name]
