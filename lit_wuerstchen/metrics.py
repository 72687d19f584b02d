"""Small metrics of our own (torchmetrics-style, so they reduce correctly under DDP)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    """How much of a VQ codebook is used: perplexity of the code histogram and the share of codes never used."""

    full_state_update = False

    def __init__(self, codebook_size: int, **kwargs):
        super().__init__(**kwargs)
        self.codebook_size = codebook_size
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.flatten(), minlength=self.codebook_size)

    def compute(self) -> dict[str, torch.Tensor]:
        counts = self.counts.float()
        probabilities = counts / counts.sum().clamp_min(1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum()
        return {"perplexity": entropy.exp(), "dead_code_share": (counts == 0).float().mean()}
