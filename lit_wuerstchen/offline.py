"""Offline-aware loading of pretrained weights.

Training machines often have no network. Pretrained weights are then read from the local torch hub cache
(``$TORCH_HOME/hub/checkpoints``, see :func:`torch.hub.get_dir`) and a missing file fails at once with a
message that says which file to put where, instead of hanging in download retries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

_TRUE = {"1", "true"}


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``LIT_WUERSTCHEN_OFFLINE`` is set to ``"1"`` or ``"true"`` (any case)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "LIT_WUERSTCHEN_OFFLINE"))


def torchvision_weights_path(weights: Any) -> Path:
    """Where :func:`load_torchvision_weights` looks for ``weights`` (a torchvision ``WeightsEnum`` member)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _missing_weights_message(weights: Any, path: Path, reason: str) -> str:
    return (
        f"Pretrained weights {weights!r} are not available: {reason}.\n"
        f"Expected file: {path}\n"
        f"Put the torchvision checkpoint {path.name} there (or point TORCH_HOME at a directory holding "
        f"hub/checkpoints/{path.name}). On a machine with network access, get it with\n"
        f"    wget {weights.url} -O {path.name}\n"
        f"or  python -c \"import torch; torch.hub.load_state_dict_from_url('{weights.url}')\"\n"
        f"(which saves it under that machine's {Path('$TORCH_HOME') / 'hub' / 'checkpoints'}), then copy it over. "
        f"Alternatively build the model with pretrained=False."
    )


def load_torchvision_weights(weights: Any) -> dict[str, torch.Tensor]:
    """State dict of a torchvision ``WeightsEnum`` member, loaded on the CPU.

    Looks for ``torch.hub.get_dir()/checkpoints/<basename of weights.url>`` first. If the file is absent and
    :func:`is_offline` is true, raises :class:`RuntimeError` immediately (no network access) naming the expected
    path and how to obtain the file; if online, downloads it once through ``weights.get_state_dict`` and turns
    any failure into the same clear :class:`RuntimeError`.
    """
    path = torchvision_weights_path(weights)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt or truncated download
            raise RuntimeError(_missing_weights_message(weights, path, f"the file exists but could not be loaded ({err})")) from err
    if is_offline():
        raise RuntimeError(_missing_weights_message(weights, path, "the file is missing and offline mode is on (HF_HUB_OFFLINE / LIT_WUERSTCHEN_OFFLINE)"))
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:
        raise RuntimeError(_missing_weights_message(weights, path, f"the file is missing and the download failed ({err})")) from err
