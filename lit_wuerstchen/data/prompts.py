"""Prompts for generation: reading prompt files and a DataModule for Lightning's ``predict`` (e.g. 30k for FID)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (.txt), or JSON lines with a ``prompt``/``caption``/``text`` field (.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            prompt = next((record[k] for k in ("prompt", "caption", "text") if isinstance(record.get(k), str)), None)
            if prompt is None:
                raise ValueError(f"{path}:{number}: no 'prompt', 'caption' or 'text' string field")
            prompts.append(prompt)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class PromptBatches(Dataset):
    """Pre-made batches of prompts: item b = {prompt: [...], index: [...], seed: seed + b, height, width}."""

    def __init__(self, prompts: list[str], batch_size: int, seed: int, height: int, width: int):
        self.prompts, self.batch_size, self.seed, self.height, self.width = prompts, batch_size, seed, height, width

    def __len__(self) -> int:
        return -(-len(self.prompts) // self.batch_size)

    def __getitem__(self, batch_index: int) -> dict:
        start = batch_index * self.batch_size
        indices = list(range(start, min(start + self.batch_size, len(self.prompts))))
        return {
            "prompt": [self.prompts[i] for i in indices],
            "index": indices,
            "seed": self.seed + batch_index,
            "height": self.height,
            "width": self.width,
        }


class PromptDataModule(L.LightningDataModule):
    """Prompts for ``python -m lit_wuerstchen predict``; under DDP the batches are spread over the ranks.

    Args:
        prompts / prompts_file: the prompts (a list in the YAML, or a .txt / .jsonl file); both may be given.
        images_per_prompt: each prompt is repeated this many times (consecutive indices).
        seed: batch b samples with seed ``seed + b``, so a job is reproducible for the same batch size.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        images_per_prompt: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        height: int = 256,
        width: int = 256,
    ):
        super().__init__()
        if images_per_prompt < 1 or batch_size < 1:
            raise ValueError("images_per_prompt and batch_size must be >= 1")
        self.prompts, self.prompts_file = list(prompts or []), prompts_file
        self.images_per_prompt, self.batch_size, self.seed = images_per_prompt, batch_size, seed
        self.height, self.width = height, width

    def all_prompts(self) -> list[str]:
        prompts = self.prompts + (read_prompts(self.prompts_file) if self.prompts_file else [])
        if not prompts:
            raise ValueError("no prompts: set data.init_args.prompts or data.init_args.prompts_file")
        return [prompt for prompt in prompts for _ in range(self.images_per_prompt)]

    def predict_dataloader(self) -> DataLoader:
        dataset = PromptBatches(self.all_prompts(), self.batch_size, self.seed, self.height, self.width)
        return DataLoader(dataset, batch_size=None, shuffle=False)
