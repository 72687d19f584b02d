"""Noise schedule for continuous-time diffusion (t in [0, 1]).

Würstchen uses the cosine schedule of Nichol & Dhariwal in continuous time::

    abar(t) = cos²((t + s) / (1 + s) · π/2) / cos²(s / (1 + s) · π/2),   s = 0.008

clamped to ``clamp_range`` = [1e-4, 0.9999].  Stable Cascade's ``gdf`` adds an optional logSNR shift:
``logSNR'(t) = logSNR(t) + 2·log(1/shift)``; ``shift > 1`` makes every t noisier, ``shift == 1`` is the
plain schedule.  Two orders of shifting and clamping (``shift_mode``):

* ``"keep_ends"`` (default): the unclamped logSNR is shifted and alpha_bar = ``sigmoid(logSNR')`` is clamped
  afterwards, so both ends of the clamp range are still reached (alpha_bar(0) = 0.9999 whatever the shift);
* ``"gdf"``: as Stable Cascade's ``gdf.CosineSchedule``: alpha_bar is clamped first, then its logSNR shifted, then
  clamped to the unshifted limits ``[logit(1e-4), logit(0.9999)]``; a shift > 1 thus lowers the top end
  (alpha_bar(0) = sigmoid(logit(0.9999) - 2·log(shift))).  Both agree wherever the plain alpha_bar lies inside the
  clamp range and the shifted one does too, and are identical for ``shift == 1``.

All schedule math runs in float32 whatever the dtype of the data; ``add_noise`` returns x's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample tensor ``v`` of shape [B] to [B, 1, 1, ...] so it broadcasts over ``x``."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


class CosineSchedule:
    """Continuous cosine schedule with clamping and an optional Stable-Cascade logSNR shift.

    Args:
        s: cosine offset (0.008 as in the paper / official code).
        clamp_range: (min, max) for alpha_bar.
        logsnr_shift: shift factor; logSNR is shifted by ``2·log(1/logsnr_shift)`` (1.0 = no shift).
        shift_mode: "keep_ends" (shift, then clamp alpha_bar) or "gdf" (clamp, shift, clamp logSNR: Stable Cascade).
    """

    def __init__(
        self,
        s: float = 0.008,
        clamp_range: Sequence[float] = (1e-4, 0.9999),
        logsnr_shift: float = 1.0,
        shift_mode: str = "keep_ends",
    ) -> None:
        if shift_mode not in ("keep_ends", "gdf"):
            raise ValueError(f"unknown shift_mode {shift_mode!r}; valid: ['gdf', 'keep_ends']")
        if logsnr_shift <= 0:
            raise ValueError(f"logsnr_shift must be > 0, got {logsnr_shift}")
        lo, hi = float(clamp_range[0]), float(clamp_range[1])
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"invalid clamp_range {clamp_range}")
        self.s = float(s)
        self.clamp_range = (lo, hi)
        self.logsnr_shift = float(logsnr_shift)
        self.shift_mode = shift_mode
        # float32 maths in the released sampler's order of operations (diffusers' DDPMWuerstchenScheduler): the
        # same alpha_bar to the last bit, so sampling a converted model does not drift.
        # Kept as Python numbers holding float32 values (a scalar operand of a float32 tensor op is used at float32,
        # so the results are the same bits) rather than tensors: no host-to-device copy per call on the hot path.
        s32 = torch.tensor(self.s, dtype=torch.float32)
        self._s, self._one_plus_s = float(s32), float(1 + s32)
        self._norm = float(torch.cos(s32 / (1 + s32) * math.pi * 0.5) ** 2)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(s={self.s}, clamp_range={self.clamp_range}, logsnr_shift={self.logsnr_shift}, "
            f"shift_mode={self.shift_mode!r})"
        )

    @staticmethod
    def _as_t(t: Tensor | float) -> Tensor:
        return torch.as_tensor(t).to(torch.float32)

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """alpha_bar(t) in float32, same shape as ``t``."""
        t = self._as_t(t)
        abar = torch.cos((t + self._s) / self._one_plus_s * math.pi * 0.5) ** 2 / self._norm
        if self.logsnr_shift != 1.0 and self.shift_mode == "gdf":
            # gdf order: clamp alpha_bar, shift its logSNR, clamp logSNR to the limits of the unshifted schedule.
            lo, hi = self.clamp_range
            a = abar.clamp(lo, hi)
            logsnr = torch.log(a / (1 - a)) + 2.0 * math.log(1.0 / self.logsnr_shift)
            logsnr = logsnr.clamp(math.log(lo / (1 - lo)), math.log(hi / (1 - hi)))
            return torch.sigmoid(logsnr)
        if self.logsnr_shift != 1.0:
            # Unclamped logSNR of the plain schedule (guarded against 0/1), then shifted.
            a = abar.clamp(1e-12, 1 - 1e-7)
            logsnr = torch.log(a) - torch.log1p(-a)
            logsnr = logsnr + 2.0 * math.log(1.0 / self.logsnr_shift)
            abar = torch.sigmoid(logsnr)
        return abar.clamp(*self.clamp_range)

    def logsnr(self, t: Tensor | float) -> Tensor:
        """log(alpha_bar / (1 - alpha_bar)) of the (clamped, shifted) schedule, float32."""
        abar = self.alpha_bar(t)
        return torch.log(abar) - torch.log1p(-abar)

    def snr(self, t: Tensor | float) -> Tensor:
        abar = self.alpha_bar(t)
        return abar / (1 - abar)

    def coefficients(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(sqrt(abar), sqrt(1 - abar)) in float32."""
        abar = self.alpha_bar(t)
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar(t))·x0 + sqrt(1 - abar(t))·noise, with t of shape [B]; returns x0's dtype."""
        t = self._as_t(t).to(x0.device)
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        a, b = self.coefficients(t)
        x_t = expand_like(a, x0) * x0.float() + expand_like(b, x0) * noise.float()
        return x_t.to(x0.dtype)
