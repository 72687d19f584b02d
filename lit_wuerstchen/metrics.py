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


class ShapesAlignment(Metric):
    """Share of generated images showing what their synthetic-set prompt asks (see evaluation.shapes_alignment)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from .evaluation import ATTRIBUTES

        self.names = (*ATTRIBUTES, "all")
        self.add_state("correct", torch.zeros(len(self.names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        from .evaluation import shapes_alignment

        scores = shapes_alignment(images.detach().float().cpu(), list(prompts))
        count = scores["count"]
        self.correct += torch.tensor([scores[name] * count for name in self.names], dtype=torch.float64,
                                     device=self.correct.device)
        self.count += count

    def compute(self) -> dict[str, float]:
        count = float(self.count)
        scores = {name: float(value) / count if count else 0.0 for name, value in zip(self.names, self.correct)}
        return {**scores, "count": count}
