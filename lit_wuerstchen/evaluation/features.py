"""Feature extractors and statistics for image-quality metrics: FID (clean-fid's Inception) and CLIP score.

Everything here works on image tensors ``[N, 3, H, W]`` float in [0, 1] and runs in float32 under
``torch.no_grad()`` with autocast disabled, whatever the caller's precision context is.

- :class:`InceptionFeatures`: clean-fid's ``"clean"`` mode: the torchscript Inception of StyleGAN2-ADA
  (``inception-2015-12-05.pt``), images resized to 299x299 with clean-fid's own resizer (PIL bicubic on float
  channels, no quantisation), 2048-d pool features. clean-fid keeps the weights at a fixed path (see
  :func:`default_inception_path`); a missing file fails at construction, offline without any network attempt.
- :class:`FeatureExtractor`: what FID needs: any callable ``images -> [N, D]``.
- :class:`RandomConvFeatures`: a fixed, seeded random conv net: a Fréchet distance that works offline (tests, toy
  runs). A proxy that moves with blur, noise and colour statistics, never comparable with Inception FID.
- :func:`feature_statistics`, :func:`frechet_distance`, :func:`frechet_distance_from_statistics`: FID with
  clean-fid's own Fréchet distance; :func:`load_or_compute_reference_stats`: an ``.npz`` cache of reference statistics.
- :class:`ClipScorer`: torchmetrics' CLIP score definition (``100 * max(cos(image, text), 0)``) on an open_clip
  model that can load from a local file or an offline cache (found by :mod:`lit_wuerstchen.offline`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cleanfid.downloads_helper
import cleanfid.fid
import cleanfid.resize
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ..files import atomic_file
from ..offline import is_offline, resolve_open_clip_model

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


@runtime_checkable
class FeatureExtractor(Protocol):
    """A callable ``images [N, 3, H, W] float in [0, 1] -> features [N, D]`` (float32 or float64).

    An optional ``name`` attribute identifies the extractor in reference-statistics caches (statistics of one
    extractor are never reused for another). Tests pass small fixed random networks; training uses
    :class:`InceptionFeatures`.
    """

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def extractor_name(extractor: Any) -> str:
    """The cache identity of a feature extractor: its ``name`` attribute, else its class name."""
    name = getattr(extractor, "name", None)
    return str(name) if name else type(extractor).__name__


# --- Inception (clean-fid) -------------------------------------------------------------------------------------
def default_inception_path() -> Path:
    """Where clean-fid looks for (and downloads) the Inception torchscript file.

    ``cleanfid.features.feature_extractor`` passes the folder ``/tmp`` (``./`` on Windows) to
    ``InceptionV3W``, which reads ``<folder>/inception-2015-12-05.pt``; there is no setting to move it.
    """
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / INCEPTION_FILENAME


def _inception_message(path: Path, reason: str) -> str:
    return (
        f"clean-fid's Inception weights are not available: {reason}.\n"
        f"Expected file: {path}\n"
        f"On a machine with network access get it with\n"
        f"    wget {INCEPTION_URL} -O {INCEPTION_FILENAME}\n"
        f"and copy it to {default_inception_path()} (where clean-fid looks for it) or anywhere else and pass its "
        f"path as inception_weights=... (FIDEvaluation) / --inception_weights (evaluate)."
    )


class InceptionFeatures:
    """clean-fid's Inception features (``"clean"`` mode): ``images [N,3,H,W] in [0,1] -> float32 [N, 2048]``.

    Args:
        weights_file: the torchscript ``inception-2015-12-05.pt``; None: clean-fid's location
            (:func:`default_inception_path`), downloaded there once when online.
        device: where the network runs.
        batch_size: images per Inception forward (the resize runs per image on the CPU, as in clean-fid).

    Raises :class:`RuntimeError` at construction when the file is missing (offline: at once, no network
    attempt; online: after a failed download) or cannot be loaded, naming the expected path.
    """

    name = "clean-fid-inception-2015-12-05"

    def __init__(
        self, weights_file: str | os.PathLike | None = None, device: str | torch.device = "cpu", batch_size: int = 64
    ):
        path = Path(weights_file) if weights_file is not None else default_inception_path()
        if not path.is_file():
            if weights_file is not None:
                raise RuntimeError(_inception_message(path, "the given inception_weights file does not exist"))
            if is_offline():
                raise RuntimeError(
                    _inception_message(
                        path, "the file is missing and offline mode is on (HF_HUB_OFFLINE / LIT_WUERSTCHEN_OFFLINE)"
                    )
                )
            try:
                cleanfid.downloads_helper.check_download_inception(fpath=str(path.parent))
            except Exception as err:
                try:  # a partial download would be taken for the real file next time
                    if path.is_file() and path.stat().st_size == 0:
                        path.unlink()
                except OSError:
                    pass
                raise RuntimeError(
                    _inception_message(path, f"the file is missing and the download failed ({err})")
                ) from err
        try:
            base = torch.jit.load(str(path), map_location="cpu").eval()
            self.layers = base.layers  # the network after clean-fid's resize (what InceptionV3W uses in clean mode)
        except Exception as err:
            raise RuntimeError(_inception_message(path, f"the file exists but could not be loaded ({err})")) from err
        self.path = path
        self.device = torch.device(device)
        self.layers = self.layers.to(self.device)
        self.batch_size = batch_size
        self._resize = cleanfid.resize.build_resizer("clean")  # PIL bicubic to 299x299 on float channels in [0, 255]

    def to(self, device: str | torch.device) -> InceptionFeatures:
        self.device = torch.device(device)
        self.layers = self.layers.to(self.device)
        return self

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        arr = (images.detach().float().clamp(0, 1) * 255.0).cpu().numpy().transpose(0, 2, 3, 1)
        out = np.stack([self._resize(np.ascontiguousarray(img)) for img in arr])  # [N, 299, 299, 3] float32
        return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feats = []
        with torch.autocast(device_type=self.device.type, enabled=False):
            for chunk in images.split(self.batch_size):
                x = self._resized(chunk).to(self.device)
                x = (x - 128.0) / 128.0  # InceptionV3W's normalisation in clean mode
                feats.append(self.layers.forward(x).view(x.shape[0], 2048).float())
        return torch.cat(feats).to(images.device) if feats else images.new_zeros(0, 2048)


class RandomConvFeatures(torch.nn.Module):
    """A fixed random conv net with global mean and max pooling: ``images -> float32 [N, 32]``.

    The weights come from ``seed`` alone, so the same seed gives the same features on every machine and the
    reference-statistics cache stays valid. Random conv features respond to colour statistics, edges, blur and
    noise: enough to watch a Fréchet distance fall over a toy run offline, not a measure to report as FID.
    """

    def __init__(self, seed: int = 0, width: int = 16):
        super().__init__()
        self.name = f"random-conv-{width}-seed{seed}"
        # Drawn from a private generator only (nn.Conv2d's default init would also draw from the global stream,
        # shifting the training noise of the run this metric watches).
        gen = torch.Generator().manual_seed(seed)
        shapes = {"weight1": (width, 3, 3, 3), "bias1": (width,), "weight2": (width, width, 3, 3), "bias2": (width,)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.randn(shape, generator=gen) * 0.5)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images.float().to(self.weight1.device) * 2 - 1
            x = torch.relu(F.conv2d(x, self.weight1, self.bias1, padding=1))
            x = torch.relu(F.conv2d(x, self.weight2, self.bias2, padding=1))
            return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1).to(images.device)


FID_FEATURES = ("inception", "random")


def check_fid_features(features: str) -> str:
    if features not in FID_FEATURES:
        raise ValueError(
            f"unknown FID features {features!r}: use 'inception' (clean-fid FID) or 'random' (offline proxy)"
        )
    return features


def make_fid_features(
    features: str, inception_weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """The FID feature extractor by name (:data:`FID_FEATURES`): ``"inception"`` (clean-fid, the real FID) or
    ``"random"`` (:class:`RandomConvFeatures`, offline proxy)."""
    if check_fid_features(features) == "inception":
        return InceptionFeatures(inception_weights, device=device)
    return RandomConvFeatures().to(device)


# --- FID ---------------------------------------------------------------------------------------------------------
def _as_numpy64(features: Any) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {arr.shape}")
    return arr


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` in float64 (``np.cov`` with ``rowvar=False``, as clean-fid)."""
    arr = _as_numpy64(features)
    if arr.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {arr.shape[0]}")
    return arr.mean(axis=0), np.cov(arr, rowvar=False)


class RunningStatistics:
    """Mean and covariance of features added batch by batch (float64 sums): memory does not grow with the count."""

    def __init__(self) -> None:
        self.count = 0
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, features: Any) -> None:
        arr = _as_numpy64(features)
        if self.total is None:
            self.total, self.outer = np.zeros(arr.shape[1]), np.zeros((arr.shape[1], arr.shape[1]))
        self.count += arr.shape[0]
        self.total += arr.sum(axis=0)
        self.outer += arr.T @ arr

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` as :func:`feature_statistics` (unbiased covariance)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mu = self.total / self.count
        return mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def frechet_distance_from_statistics(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance of two Gaussians: clean-fid's own ``frechet_distance`` (``eps`` on the diagonals when the
    product is singular; a large imaginary part raises :class:`ValueError`). Tiny negative values from rounding are
    returned as 0."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:  # clean-fid asserts; say it as an error
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    return max(float(cleanfid.fid.frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)), 0.0)


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """FID between two feature sets ``[N, D]`` / ``[M, D]`` (tensors or arrays)."""
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))


# --- reference statistics cache ----------------------------------------------------------------------------------
def read_reference_stats(cache_path: str | os.PathLike, key: str | None = None) -> dict[str, Any] | None:
    """The cached statistics (``mu``, ``sigma``, ``count``, ``extractor``, ``key``), or None when the file is
    missing, unreadable, or was written for another ``key``."""
    path = Path(cache_path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {
                "mu": data["mu"],
                "sigma": data["sigma"],
                "count": int(data["count"]),
                "extractor": str(data["extractor"]),
                "key": str(data["key"]) if "key" in data else "",
            }
    except Exception:
        return None
    if key is not None and stats["key"] != key:
        return None
    return stats


def write_reference_stats(
    cache_path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, count: int, extractor: str = "", key: str = ""
) -> Path:
    """Write the statistics atomically (:func:`lit_wuerstchen.files.atomic_file`)."""
    path = Path(cache_path)
    with atomic_file(path) as partial:
        np.savez(partial, mu=mu, sigma=sigma, count=np.int64(count), extractor=np.str_(extractor), key=np.str_(key))
    return path


def load_or_compute_reference_stats(
    cache_path: str | os.PathLike,
    compute_fn: Callable[[], Any],
    extractor: str = "",
    key: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from the ``.npz`` cache, or from ``compute_fn()`` (features ``[N, D]``), then cached.

    ``key`` (e.g. dataset + resolution + count + extractor) must match the cached one for reuse; a mismatch
    recomputes and overwrites. The file also records the feature count and the extractor name.
    """
    cached = read_reference_stats(cache_path, key)
    if cached is not None:
        return cached["mu"], cached["sigma"]
    features = _as_numpy64(compute_fn())
    mu, sigma = feature_statistics(features)
    write_reference_stats(cache_path, mu, sigma, features.shape[0], extractor, key or "")
    return mu, sigma


# --- CLIP score --------------------------------------------------------------------------------------------------
class ClipScorer:
    """CLIP score as torchmetrics defines it: ``100 * max(cos(image_embedding, text_embedding), 0)`` per pair.

    Args:
        model_name: open_clip architecture (``ViT-bigG-14``; ``wuerstchen-tiny-clip`` is the shipped random tiny
            config for tests/toy runs).
        pretrained: open_clip pretrained tag, resolved offline-aware by
            :func:`lit_wuerstchen.offline.resolve_pretrained` (missing + offline: RuntimeError at once).
        weights_file: a local open_clip checkpoint (takes precedence over ``pretrained``).
        model_config_file: an open_clip model-config JSON for custom architectures.
        device: where the model runs.
        encoders: ``(image_encoder, text_encoder)`` callables for tests: ``images [N,3,H,W] in [0,1] -> [N, E]``
            and ``list[str] -> [N, E]``; no model is built then.

    ``score(images, prompts)`` returns float32 ``[N]`` on the CPU. The model is frozen and in eval mode; images
    get the model's own preprocessing on tensors (bicubic resize of the shorter side, centre crop, mean/std).
    """

    def __init__(
        self,
        model_name: str = "ViT-bigG-14",
        pretrained: str | None = None,
        weights_file: str | None = None,
        model_config_file: str | None = None,
        device: str | torch.device = "cpu",
        encoders: tuple[Callable, Callable] | None = None,
        batch_size: int = 64,
    ):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = None
        if encoders is not None:
            self._encode_image, self._encode_text = encoders
            self.name = f"injected:{model_name}"
            return
        _, checkpoint = resolve_open_clip_model(model_name, pretrained, weights_file, model_config_file)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        if checkpoint is not None:
            open_clip.load_checkpoint(model, checkpoint, strict=True)
        self.model = model.to(self.device).float().eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        if pretrained and weights_file is None:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
            cfg = {**cfg, **{k: tag_cfg[k] for k in ("mean", "std") if tag_cfg.get(k) is not None}}
        size = cfg.get("size", model.visual.image_size)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.mean = torch.tensor(cfg.get("mean") or OPENAI_DATASET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std") or OPENAI_DATASET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.name = f"open_clip:{model_name}:{pretrained or weights_file or 'random'}"

    def to(self, device: str | torch.device) -> ClipScorer:
        self.device = torch.device(device)
        if self.model is not None:
            self.model = self.model.to(self.device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's eval transform on a tensor batch: resize shorter side (bicubic, antialiased), centre crop,
        normalise."""
        x = images.float().clamp(0, 1)
        th, tw = self.image_size
        h, w = x.shape[-2:]
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top : top + th, left : left + tw]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(images.to(self.device)))

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if images.shape[0] != len(prompts):
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        out = []
        with torch.autocast(device_type=self.device.type, enabled=False):
            for start in range(0, len(prompts), self.batch_size):
                img = torch.as_tensor(self._encode_image(images[start : start + self.batch_size])).float()
                txt = (
                    torch.as_tensor(self._encode_text(prompts[start : start + self.batch_size])).float().to(img.device)
                )
                cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
                out.append((100.0 * cos).clamp_min(0.0).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    __call__ = score
