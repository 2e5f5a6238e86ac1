"""FID, KID and IS through torchmetrics, on a chosen feature backend.

Real-image statistics are kept across ``reset_fake()`` (``reset_real_features=False``), so one
object scores several models against the same reference. All states are torchmetrics states, so
under DDP they are summed / gathered across ranks and sharded generation gives the exact metric.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from dq.errors import choice_error
from dq.metrics.features import BACKENDS, DigitsClassifier, FrozenFeatures, require_torch_fidelity


def _to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] → uint8 [B, 3, H, W], the input torchmetrics' Inception expects."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class ImageMetrics(nn.Module):
    """FID / KID / IS of generated images against real reference images (both in [−1, 1])."""

    def __init__(self, backend: str = "digits", kid_subset_size: int = 100, kid_subsets: int = 50,
                 is_splits: int = 1, sync: bool = False) -> None:
        """``sync``: sum/gather states over the process group at compute time (sharded generation under
        DDP, every rank calling compute); False scores only what this process saw."""
        super().__init__()
        kw = {"sync_on_compute": sync}
        if backend not in BACKENDS:
            raise choice_error("metrics.backend", backend, BACKENDS)
        self.backend = backend
        if backend == "digits":
            net = DigitsClassifier.load()
            feats, logits = FrozenFeatures(net, "features"), FrozenFeatures(net, "logits")
            self.fid = FrechetInceptionDistance(feature=feats, reset_real_features=False, **kw)
            self.kid = KernelInceptionDistance(feature=feats, subset_size=kid_subset_size, subsets=kid_subsets,
                                               reset_real_features=False, **kw)
            self.inception_score = InceptionScore(feature=logits, splits=is_splits, **kw)
        else:
            require_torch_fidelity()
            self.fid = FrechetInceptionDistance(feature=2048, reset_real_features=False, **kw)
            self.kid = KernelInceptionDistance(feature=2048, subset_size=kid_subset_size, subsets=kid_subsets,
                                               reset_real_features=False, **kw)
            self.inception_score = InceptionScore(splits=is_splits, **kw)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.backend == "digits" else _to_uint8_rgb(x)

    @torch.no_grad()
    def update_real(self, images: torch.Tensor) -> None:
        x = self._prep(images)
        self.fid.update(x, real=True)
        self.kid.update(x, real=True)

    @torch.no_grad()
    def update_fake(self, images: torch.Tensor) -> None:
        x = self._prep(images)
        self.fid.update(x, real=False)
        self.kid.update(x, real=False)
        self.inception_score.update(x)

    def reset_fake(self) -> None:
        self.fid.reset()
        self.kid.reset()
        self.inception_score.reset()

    def compute(self) -> dict[str, float]:
        n_real = int(self.fid.real_features_num_samples)
        n_fake = int(self.fid.fake_features_num_samples)
        self.kid.subset_size = min(self.kid.subset_size, n_real, n_fake)
        with torch.random.fork_rng():  # KID draws random subsets: seed them so a score is reproducible
            torch.manual_seed(0)
            kid_mean, kid_std = self.kid.compute()
        with warnings.catch_warnings():  # is_splits=1 has no spread: its std is NaN by design
            warnings.filterwarnings("ignore", message="std\\(\\): degrees of freedom")
            is_mean, is_std = self.inception_score.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                "is": float(is_mean), "is_std": float(is_std), "n_fake": n_fake, "n_real": n_real}


def score(metrics: ImageMetrics, images: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Score ``images`` as the fake set against the reference already in ``metrics``."""
    metrics.reset_fake()
    for chunk in images.split(batch_size):
        metrics.update_fake(chunk)
    return metrics.compute()


def build_metrics(metrics_cfg: Any, real_images: torch.Tensor, sync: bool = False) -> ImageMetrics:
    with warnings.catch_warnings():  # "will save all extracted features": known, and small here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        m = ImageMetrics(metrics_cfg.backend, metrics_cfg.kid_subset_size, metrics_cfg.kid_subsets,
                         metrics_cfg.is_splits, sync=sync)
    for chunk in real_images.split(500):
        m.update_real(chunk)
    return m
