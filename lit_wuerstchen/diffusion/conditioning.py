"""Per-sample condition dropout for classifier-free guidance, as Stable Cascade's trainers do it.

The official trainers (``train/base.py`` ``get_conditions``, ``train/train_b.py``) drop, per sample and with numpy
draws:

* the caption with probability 0.05 (it becomes ``""``, so the network sees the *empty-caption* embedding, for both
  the token and the pooled text embedding: one draw for both);
* the CLIP image embedding of Stage C with probability 0.9 (it is only computed for 10% of the samples; the rest get
  zeros);
* Stage B's EfficientNet latents with probability 0.1 (zeros).

:func:`drop_mask` draws the per-sample decision from a ``torch.Generator`` (reproducible, on the data's device) and
:func:`drop_conditions` replaces the dropped rows with zeros or a given replacement; pass one mask to several
conditions that must drop together.
"""

from __future__ import annotations

import torch
from torch import Tensor

CASCADE_CAPTION_DROP = 0.05
"""P(caption -> "") in Stable Cascade's ``get_conditions`` (``rand > 0.05`` keeps it)."""
CASCADE_IMAGE_EMBED_DROP = 0.9
"""P(CLIP image embedding -> zeros) in Stage C training (``rand > 0.9`` computes it)."""
CASCADE_EFFNET_DROP = 0.1
"""P(EfficientNet latents -> zeros) in Stage B training (``rand <= 0.9`` computes them)."""


def drop_mask(
    batch: int, p_drop: float, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Bool [batch], True = drop this sample's condition, each independently with probability ``p_drop``
    (``U < p_drop`` with U uniform in [0, 1): p 0 never drops, p 1 always does)."""
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"p_drop must be in [0, 1], got {p_drop}")
    if generator is not None and device is None:
        device = generator.device
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
    return u < p_drop


def drop_conditions(
    cond: Tensor,
    p_drop: float = 0.0,
    generator: torch.Generator | None = None,
    replacement: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace the rows of ``cond`` [B, ...] whose sample is dropped by ``replacement`` (zeros when None; else a
    tensor broadcastable to one row or to ``cond``, e.g. the empty-caption embedding [1, L, D]).

    The mask is ``mask`` when given (to drop several conditions together), else drawn with :func:`drop_mask`.
    Returns ``(new_cond, mask)``; ``cond`` itself is not modified.
    """
    if mask is None:
        mask = drop_mask(cond.shape[0], p_drop, generator, cond.device)
    mask = mask.to(device=cond.device, dtype=torch.bool)
    if mask.shape != (cond.shape[0],):
        raise ValueError(f"mask must have shape [{cond.shape[0]}], got {list(mask.shape)}")
    if replacement is None:
        replacement = torch.zeros((), dtype=cond.dtype, device=cond.device)
    replacement = replacement.to(device=cond.device, dtype=cond.dtype)
    where = mask.reshape(-1, *([1] * (cond.ndim - 1)))
    return torch.where(where, replacement, cond), mask
