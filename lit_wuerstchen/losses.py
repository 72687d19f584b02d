"""Training losses that need more than a formula: the LPIPS perceptual loss and the GAN hinge losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from .offline import torchvision_weights_file

# LPIPS network name -> the torchvision weights torchmetrics builds its backbone from
_LPIPS_BACKBONES = {
    "vgg": torchvision.models.VGG16_Weights,
    "alex": torchvision.models.AlexNet_Weights,
    "squeeze": torchvision.models.SqueezeNet1_1_Weights,
}


class PerceptualLoss(nn.Module):
    """LPIPS through torchmetrics' public metric, as a differentiable mean over the batch; call it on [0, 1] images.

    torchmetrics ships LPIPS's linear heads and takes the ImageNet backbone from torchvision, which reads torch's
    hub cache: the file is located first (offline and missing: a clear error now, not a hang in download retries).
    """

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in _LPIPS_BACKBONES:
            raise ValueError(f"perceptual net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
        torchvision_weights_file(_LPIPS_BACKBONES[net].DEFAULT)
        self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="mean", normalize=True)
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The metric's network, not the metric: its update refuses values outside [0, 1], which a VQGAN in training
        # reconstructs (a loss must take them and pass their gradient; clamping would cut it off). Keeps no state.
        return self.metric.net(images, targets, normalize=True).mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
