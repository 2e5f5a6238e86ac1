"""Reference features of real images, computed once and cached on disk.

The features (and logits, for the floor's IS) of a data split under a feature backend depend only
on (dataset, its split, image resolution, backend, the backend's input size, the backend's weights).
That tuple is the cache key; its hash names the file under ``paths.cache_dir``, so a change of any
part (e.g. ``metrics.backend`` or ``data.size``) reads or writes another file and nothing stale is
ever reused. Features rather than FID moments are cached: KID needs them, and the moments are cheap.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dq.data.digits import DataConfig, DigitsDataModule
from dq.errors import choice_error
from dq.metrics.features import FeatureBackend, extract
from dq.metrics.image_metrics import ImageMetrics, MetricsConfig, metrics_from_config

log = logging.getLogger("dq")
DATASETS = ("digits",)
SPLITS = ("heldout", "train")


@dataclass
class RealFeatures:
    """features [N, D] float32, logits [N, K] or None (backend without classifier), and the cache key."""

    features: torch.Tensor
    logits: torch.Tensor | None
    key: dict[str, Any]


def real_images(data_cfg: DataConfig, split: str) -> torch.Tensor:
    """The real images of ``split`` (heldout | train): [N, 1, size, size] in [−1, 1]."""
    if data_cfg.name not in DATASETS:
        raise choice_error("data.name", data_cfg.name, DATASETS)
    if split not in SPLITS:
        raise choice_error("reference split", split, SPLITS)
    dm = DigitsDataModule(size=int(data_cfg.size), heldout_fraction=float(data_cfg.heldout_fraction),
                          split_seed=int(data_cfg.split_seed))
    return dm.heldout_images if split == "heldout" else dm.train_images


def reference_key(backend: FeatureBackend, data_cfg: DataConfig, split: str) -> dict[str, Any]:
    return {"dataset": str(data_cfg.name), "split": split, "size": int(data_cfg.size),
            "heldout_fraction": float(data_cfg.heldout_fraction), "split_seed": int(data_cfg.split_seed),
            "backend": backend.name, "input_size": int(backend.input_size), "fingerprint": backend.fingerprint}


def reference_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"reference-{key['backend']}-{key['split']}-{digest}.pt"


def load_cached(path: Path, key: dict[str, Any], label: str) -> RealFeatures | None:
    """The features cached at ``path`` under ``key``; None when absent, stored under another key, or
    unreadable (truncated by a crash or a full disk: logged, then rebuilt by the caller, never trusted)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["key"] == key:  # the file name is a hash; the stored key guards against collisions
            log.info("reference features (%s): reused %s", label, path)
            return RealFeatures(data["features"], data["logits"], key)
    except Exception as e:
        log.warning("reference cache %s is unreadable (%s); rebuilding it", path, str(e).splitlines()[0][:120])
    return None


def save_cached(path: Path, ref: RealFeatures, label: str) -> RealFeatures:
    """Write ``ref`` to ``path`` atomically (concurrent writers leave one complete file, never a partial one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # one temp file per writing process
    torch.save({"key": ref.key, "features": ref.features, "logits": ref.logits}, tmp)
    tmp.replace(path)
    log.info("reference features (%s): computed %d images and cached at %s", label, len(ref.features), path)
    return ref


def reference_features(backend: FeatureBackend, data_cfg: DataConfig, split: str, cache_dir: str | Path,
                       batch_size: int = 250) -> RealFeatures:
    """Features of the real ``split`` images under ``backend``, from the cache when present.

    Logs "reference features … reused <file>" or "… computed and cached at <file>".
    """
    key = reference_key(backend, data_cfg, split)
    path = reference_path(cache_dir, key)
    label = f"{split}, {backend.name}"
    cached = load_cached(path, key, label)
    if cached is not None:
        return cached
    feats, logits = extract(backend, real_images(data_cfg, split), batch_size)
    return save_cached(path, RealFeatures(feats.cpu(), None if logits is None else logits.cpu(), key), label)


def cached_metrics(metrics_cfg: MetricsConfig, data_cfg: DataConfig, cache_dir: str | Path, split: str = "heldout",
                   backend: FeatureBackend | None = None, sync: bool = False, channels: int = 1) -> ImageMetrics:
    """ImageMetrics (from the ``metrics`` group) holding the reference: ``metrics.reference`` when set
    (an image folder read with ``channels`` channels: its cached features; an .npz: its moments, FID
    only), else the cached features of the digits ``split``.

    Under ``sync`` only rank 0 loads the reference (see ImageMetrics.keeps_reference), so only rank 0
    touches the cache.
    """
    m = metrics_from_config(metrics_cfg, backend, sync)
    ref = metrics_cfg.reference
    if ref is not None:
        from dq.metrics.real_data import folder_features, is_stats_file, read_stats

        if is_stats_file(ref):
            m.set_real_moments(*read_stats(ref, m.backend))
        elif m.keeps_reference:
            m.add_real_features(folder_features(m.backend, ref, channels, cache_dir, m.batch_size).features)
    elif m.keeps_reference:
        m.add_real_features(reference_features(m.backend, data_cfg, split, cache_dir, m.batch_size).features)
    return m


def describe_reference(metrics_cfg: MetricsConfig, data_cfg: DataConfig) -> str:
    """What ``fid``/``kid`` compare generated images with, for results.json."""
    ref = metrics_cfg.reference
    if ref is None:
        return f"the held-out {data_cfg.name} images (data split)"
    from dq.metrics.real_data import is_stats_file

    return f"the statistics (mu, sigma) in {ref}" if is_stats_file(ref) else f"the images in folder {ref}"


def shape_problem(shape: tuple[int, ...], data_cfg: DataConfig, backend: FeatureBackend,
                  reference: str | None = None) -> str | None:
    """Why samples of per-image ``shape`` (C, H, W) cannot be scored against the reference (``reference``,
    i.e. metrics.reference, when set: any image size; else the ``data_cfg`` split) under ``backend``;
    None when they can."""
    if reference is not None:
        return backend.check_images(tuple(shape))
    ref = tuple(real_images(data_cfg, "heldout").shape[1:])
    if tuple(shape) != ref:
        return (f"samples of shape {tuple(shape)} cannot be compared with the {data_cfg.name} reference of shape "
                f"{ref}; score them against your own data with metrics.reference=<image folder or .npz>")
    return backend.check_images(tuple(shape))
