"""Training losses that need more than a formula: the LPIPS perceptual loss and the GAN hinge losses."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .offline import load_torchvision_weights

# LPIPS network name -> (torchvision builder, torchvision weights enum)
_LPIPS_BACKBONES = {
    "vgg": ("vgg16", "VGG16_Weights"),
    "alex": ("alexnet", "AlexNet_Weights"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights"),
}


def build_lpips(net: str = "vgg", backbone_weights: str | None = None) -> nn.Module:
    """LPIPS through torchmetrics, frozen and in eval mode; call it as ``lpips(x, y, normalize=True)`` on [0, 1].

    torchmetrics ships LPIPS's linear heads; the ImageNet backbone comes from ``backbone_weights`` (a local
    torchvision state-dict file) or torchvision's cache. Offline without it: a clear error now, not a hang.
    """
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"perceptual net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
    import torchvision
    from torchmetrics.functional.image.lpips import _LPIPS

    builder, weights_enum = _LPIPS_BACKBONES[net]
    if backbone_weights is not None:
        path = Path(backbone_weights)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual backbone weights file not found: {path}")
        backbone_state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        backbone_state = load_torchvision_weights(getattr(torchvision.models, weights_enum).DEFAULT)

    lpips = _LPIPS(pretrained=True, net=net, pnet_rand=True)  # linear heads pretrained, backbone random for now
    # torchmetrics keeps the backbone as slices of torchvision's `features`, indexed like `features`.
    slice_state = {}
    for key in lpips.net.state_dict():
        match = re.fullmatch(r"slice\d+\.(\d+)\.(.+)", key)
        if match is None or f"features.{match[1]}.{match[2]}" not in backbone_state:
            raise RuntimeError(f"cannot map LPIPS backbone parameter {key!r} onto torchvision {builder} weights")
        slice_state[key] = backbone_state[f"features.{match[1]}.{match[2]}"]
    lpips.net.load_state_dict(slice_state)
    lpips.eval().requires_grad_(False)
    return lpips


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
