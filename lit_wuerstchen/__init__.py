"""lit_wuerstchen: train and sample Würstchen-style three-stage text-to-image diffusion with PyTorch Lightning."""

__version__ = "0.1.0"
