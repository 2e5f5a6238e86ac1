"""FID, KID and IS through torchmetrics, on a chosen feature backend.

The backend runs once per image (features and logits in one pass); FID, KID and IS are fed those
features through an identity "feature network", so cached real features (dq.metrics.reference) load
straight into the metric states. Real statistics are kept across ``reset_fake()``, so one object
scores several models against the same reference.

Sharded generation (``sync=True`` under torch.distributed): every rank feeds its own generated
images and every rank calls ``compute()``; torchmetrics sums the FID moments and gathers the KID /
IS features in rank order, so with contiguous shards (rank r holds images r·N/W … (r+1)·N/W) the
result equals the single-process one. Only rank 0 keeps the reference, so it is counted once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from dq.errors import DQError
from dq.metrics.features import FeatureBackend, build_backend, extract, make_backend


class _Given(nn.Module):
    """torchmetrics ``feature=`` stand-in: what ``update`` receives is already features [B, D]."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ImageMetrics(nn.Module):
    """FID / KID / IS of generated images against real reference images (both in [−1, 1])."""

    def __init__(self, backend: str | FeatureBackend = "digits", kid_subset_size: int = 100, kid_subsets: int = 50,
                 is_splits: int = 1, sync: bool = False, batch_size: int = 250) -> None:
        """``sync``: sum/gather states over the process group at compute time (sharded generation under
        DDP, every rank calling compute); False scores only what this process saw. ``batch_size``:
        images per feature-network call."""
        super().__init__()
        self.backend = build_backend(backend) if isinstance(backend, str) else backend
        self.sync = sync
        self.batch_size = batch_size
        self.kid_subset_size = kid_subset_size
        self.with_kid = True    # False once the reference is moments only (set_real_moments): KID needs features
        self.n_real: int | None = None  # the reference's size when known from moments alone
        kw = {"sync_on_compute": sync}
        d, k = self.backend.num_features, self.backend.num_classes
        with warnings.catch_warnings():  # "will save all extracted features": known, and small here
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.fid = FrechetInceptionDistance(feature=_Given(d), reset_real_features=False, **kw)
            self.kid = KernelInceptionDistance(feature=_Given(d), subset_size=kid_subset_size, subsets=kid_subsets,
                                               reset_real_features=False, **kw)
            self.inception_score = InceptionScore(feature=_Given(k), splits=is_splits, **kw) if k else None

    # ------------------------------------------------------------------------------------ updates
    def _distributed(self) -> bool:
        return self.sync and dist.is_available() and dist.is_initialized()

    @property
    def keeps_reference(self) -> bool:
        """False on ranks other than 0 under ``sync``: states are summed over ranks at compute time, and
        the reference must count once, so only rank 0 holds it (others need not even load it)."""
        return not self._distributed() or dist.get_rank() == 0

    def add_real_features(self, feats: torch.Tensor) -> None:
        """Add reference features [N, D]; a no-op where ``keeps_reference`` is False."""
        if not self.keeps_reference:
            return
        feats = feats.to(self.fid.real_features_sum.device)
        self.fid.update(feats, real=True)
        self.kid.update(feats, real=True)

    def set_real_moments(self, mu: torch.Tensor, sigma: torch.Tensor, n: int | None) -> None:
        """Use precomputed reference statistics (mean [D], ddof=1 covariance [D, D], number of images or None)
        instead of features: FID's real states are set so that its mean and covariance are exactly these
        (any count >= 2 gives the same moments); KID is then not computed (it needs the features)."""
        self.with_kid, self.n_real = False, n
        if not self.keeps_reference:
            return
        fid = self.fid
        mu, sigma = mu.to(fid.real_features_sum), sigma.to(fid.real_features_cov_sum)
        count = n if n is not None and n >= 2 else 2
        fid.real_features_sum.copy_(count * mu)
        fid.real_features_cov_sum.copy_((count - 1) * sigma + count * torch.outer(mu, mu))
        fid.real_features_num_samples.fill_(count)

    def add_fake_features(self, feats: torch.Tensor, logits: torch.Tensor | None) -> None:
        """Add generated images' features [B, D] and (when the backend has a classifier) logits [B, K]."""
        dev = self.fid.fake_features_sum.device
        self.fid.update(feats.to(dev), real=False)
        if self.with_kid:
            self.kid.update(feats.to(dev), real=False)
        if self.inception_score is not None:
            self.inception_score.update(logits.to(dev))

    def update_real(self, images: torch.Tensor) -> None:
        self.add_real_features(extract(self.backend, images, self.batch_size)[0])

    def update_fake(self, images: torch.Tensor) -> None:
        self.add_fake_features(*extract(self.backend, images, self.batch_size))

    def reset_fake(self) -> None:
        self.fid.reset()
        self.kid.reset()
        if self.inception_score is not None:
            self.inception_score.reset()

    # ------------------------------------------------------------------------------------ compute
    def _global_count(self, n: torch.Tensor) -> int:
        if not self._distributed():
            return int(n)
        n = n.clone()
        dist.all_reduce(n)
        return int(n)

    def _pack_lists(self) -> None:
        """One tensor per list state, so every rank all-gathers the same number of tensors (ranks fed
        different numbers of batches otherwise issue mismatched collectives)."""
        lists = [(self.kid, "real_features", self.backend.num_features),
                 (self.kid, "fake_features", self.backend.num_features)]
        if self.inception_score is not None:
            lists.append((self.inception_score, "features", self.backend.num_classes))
        dev = self.fid.fake_features_sum.device
        for metric, name, width in lists:
            parts = getattr(metric, name)
            setattr(metric, name, [torch.cat(parts) if parts else torch.empty(0, width, device=dev)])

    def compute(self) -> dict[str, Any]:
        """{"fid", "kid", "kid_std", "is", "is_std", "n_fake", "n_real"}; "is"/"is_std" are None when the
        backend has no classifier, "kid"/"kid_std" when the reference is moments only (an .npz). KID
        subsets and IS splits are drawn with a fixed seed (reproducible)."""
        n_real = self._global_count(self.fid.real_features_num_samples)
        n_fake = self._global_count(self.fid.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise DQError(f"FID needs at least 2 real and 2 generated images, got {n_real} real and {n_fake} "
                          f"generated; raise task.num_samples")
        self._pack_lists()
        self.kid.subset_size = min(self.kid_subset_size, n_real, n_fake)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            kid = [float(v) for v in self.kid.compute()] if self.with_kid else [None, None]
            out: dict[str, Any] = {"fid": float(self.fid.compute()), "kid": kid[0], "kid_std": kid[1],
                                   "is": None, "is_std": None}
            if self.inception_score is not None:
                with warnings.catch_warnings():  # is_splits=1: torch warns that the std has no degrees of freedom
                    warnings.filterwarnings("ignore", message="std\\(\\): degrees of freedom")
                    is_mean, is_std = self.inception_score.compute()
                # is_splits=1 has no spread: report None rather than NaN (which is not JSON)
                out.update({"is": float(is_mean), "is_std": None if torch.isnan(is_std) else float(is_std)})
        # moments only: the reference's size as its .npz states it (None when it does not)
        return {**out, "n_fake": n_fake, "n_real": n_real if self.with_kid else self.n_real}


def score(metrics: ImageMetrics, images: torch.Tensor, batch_size: int | None = None) -> dict[str, Any]:
    """Score ``images`` [N, C, H, W] as the fake set against the reference already in ``metrics``."""
    return score_features(metrics, *extract(metrics.backend, images, batch_size or metrics.batch_size))


def score_features(metrics: ImageMetrics, feats: torch.Tensor, logits: torch.Tensor | None) -> dict[str, Any]:
    """``score`` of images whose backend features (and logits) were already extracted."""
    metrics.reset_fake()
    metrics.add_fake_features(feats, logits)
    return metrics.compute()


@dataclass
class MetricsConfig:
    """The ``metrics`` config group: the feature backend, the reference, the KID / IS settings and the
    student-vs-teacher (pairwise) metrics."""

    backend: str = field(default="digits", metadata={"choices": "digits, tf_inception, inception"})
    kid_subset_size: int = 100
    kid_subsets: int = 50
    is_splits: int = 1
    batch_size: int = 250  # images per feature-network call
    # null: the digits data split; an image folder (png/jpg); or an .npz with mu and sigma (FID only)
    reference: Optional[str] = None
    pairwise: bool = True  # student vs the FP teacher on the same seeds: fid_to_fp, psnr_to_fp, ssim_to_fp
    pairwise_images: int = 1000  # teacher images kept per seed for PSNR / SSIM (FID-to-FP uses all)
    clip_model: Optional[str] = None  # a local CLIP model folder (transformers): CLIP score when there are prompts

    def __post_init__(self) -> None:
        from dq.metrics.real_data import check_reference

        check_reference(self.reference)
        n = self.pairwise_images
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DQError(f"metrics.pairwise_images={n!r} must be a positive integer (teacher images kept per seed "
                          f"for PSNR / SSIM)")
        if self.clip_model is not None and not (Path(str(self.clip_model)).expanduser() / "config.json").is_file():
            raise DQError(f"metrics.clip_model={self.clip_model} is not a local CLIP model folder (no config.json); "
                          f"save one with CLIPModel.save_pretrained + CLIPProcessor.save_pretrained, or set it to null")


def metrics_from_config(metrics_cfg: MetricsConfig, backend: FeatureBackend | None = None, sync: bool = False) -> ImageMetrics:
    """An empty ImageMetrics from the ``metrics`` config group (reference not loaded)."""
    return ImageMetrics(backend or make_backend(metrics_cfg), int(metrics_cfg.kid_subset_size),
                        int(metrics_cfg.kid_subsets), int(metrics_cfg.is_splits), sync=sync,
                        batch_size=int(metrics_cfg.batch_size))


def build_metrics(metrics_cfg: MetricsConfig, real_images: torch.Tensor, sync: bool = False,
                  backend: FeatureBackend | None = None) -> ImageMetrics:
    """ImageMetrics with ``real_images`` [N, C, H, W] as the reference (features computed, not cached;
    see dq.metrics.reference for the cached reference of a data split)."""
    m = metrics_from_config(metrics_cfg, backend, sync)
    m.update_real(real_images)
    return m
