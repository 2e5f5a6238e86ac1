"""The scores of one evaluation, per model and seed: FID/KID/IS against the reference, the student
against the FP teacher (dq.metrics.pairwise) and CLIP score; plus what each compared (results.json
"metrics") and why any was not computed (results.json "notes").

The backend runs once per generated image; its features feed both the reference metrics and
FID-to-FP. ``dq.evaluation.evaluate_models`` samples the models (teacher first) and calls ``score``.
"""
from __future__ import annotations

from typing import Any

import torch

from dq.data.digits import DataConfig
from dq.metrics.features import FeatureBackend, extract
from dq.metrics.image_metrics import ImageMetrics, MetricsConfig, score_features
from dq.metrics.pairwise import PAIR_SCORES, PSNR_CAP, TEACHER, ClipScorer, PairwiseMetrics, ordered, ssim_kernel
from dq.metrics.real_data import is_stats_file
from dq.metrics.reference import describe_reference

SCORES = ("fid", "kid", "is")
ALL_SCORES = (*SCORES, *PAIR_SCORES, "clip_score")
__all__ = ["ALL_SCORES", "SCORES", "Scorer", "ordered"]


class Scorer:
    """Scores generated images of the models ``names`` (``fp`` = the FP teacher) sampled at ``shape``.

    ``metrics``: an ImageMetrics holding the reference, or None when the images cannot be compared
    with it. ``prompts``: the prompt of each generated image (global index order, the same for every
    seed), or None when the evaluation has none; CLIP score needs them and ``metrics.clip_model``.
    """

    def __init__(self, cfg: MetricsConfig, data: DataConfig, backend: FeatureBackend, metrics: ImageMetrics | None,
                 names: list[str], shape: tuple[int, ...], prompts: list[str] | None = None,
                 conditional: bool = False) -> None:
        self.backend, self.metrics, self.prompts, self.batch_size = backend, metrics, prompts, int(cfg.batch_size)
        self.notes: list[str] = []
        self.described: dict[str, str] = {}
        feats = f"{backend.name} features{backend.input_note(shape[0]) if len(shape) == 3 else ''}"
        if metrics is not None:
            ref = describe_reference(cfg, data)
            self.described["fid"] = f"each model's images vs {ref}, {feats}"
            if cfg.reference is not None and is_stats_file(cfg.reference):
                self.notes.append(f"kid not computed: metrics.reference={cfg.reference} holds FID statistics (mu, "
                                  f"sigma) only; KID needs the reference features (give the image folder instead)")
            else:
                self.described["kid"] = f"each model's images vs {ref}, {feats}"
            if backend.num_classes:
                self.described["is"] = f"each model's images alone, {backend.name} classifier logits"
        self.pair = self._pairwise(cfg, names, shape)
        self.clip = self._clip(cfg, conditional)

    def _pairwise(self, cfg: MetricsConfig, names: list[str], shape: tuple[int, ...]) -> PairwiseMetrics | None:
        if not cfg.pairwise or not any(n != TEACHER for n in names):
            return None
        if TEACHER not in names:
            self.notes.append("pairwise metrics (fid_to_fp, psnr_to_fp, ssim_to_fp) not computed: the FP teacher is "
                              "not evaluated alongside the student (task.with_teacher=true for eval.py, "
                              "task.compare_fp=true for train.py)")
            return None
        if len(shape) != 3 or shape[0] not in (1, 3):
            self.notes.append(f"pairwise metrics (fid_to_fp, psnr_to_fp, ssim_to_fp) not computed: samples of shape "
                              f"{tuple(shape)} are not 1- or 3-channel images")
            return None
        same = "the FP teacher's images of the same seeds and noise"
        problem = self.backend.check_images(tuple(shape))
        if problem:
            self.notes.append(f"fid_to_fp not computed: {problem} (psnr_to_fp and ssim_to_fp need no backend)")
        else:
            self.described["fid_to_fp"] = (f"student vs {same} (all images, {self.backend.name} features"
                                           f"{self.backend.input_note(shape[0])})")
        k = int(cfg.pairwise_images)
        self.described.update({
            "psnr_to_fp": f"student vs {same}: up to the first {k} image pairs of each seed (row: pairs), in "
                          f"[0, 1], data_range=1, from the pooled MSE; capped at {PSNR_CAP:g} dB (identical images)",
            "ssim_to_fp": f"student vs {same}: mean SSIM of up to the first {k} image pairs of each seed, in [0, 1], "
                          f"data_range=1, Gaussian window {ssim_kernel(shape)}, sigma 1.5"})
        return PairwiseMetrics(None if problem else self.backend.num_features, k, self.batch_size)

    def _clip(self, cfg: MetricsConfig, conditional: bool) -> ClipScorer | None:
        if self.prompts is None:
            if cfg.clip_model is not None or conditional:
                self.notes.append("CLIP score not computed: this evaluation has no text prompts (an unconditional or "
                                  "class-conditional model, or stand-in prompt embeddings)")
            return None
        if cfg.clip_model is None:
            self.notes.append("CLIP score not computed: metrics.clip_model (a local CLIP model folder) is not set")
            return None
        self.described["clip_score"] = (f"each model's images vs their prompts: 100 x cosine of CLIP embeddings "
                                        f"({cfg.clip_model}), mean over images")
        return ClipScorer(cfg.clip_model)

    def score(self, name: str, seed: int, images: torch.Tensor) -> dict[str, Any]:
        """The scores of model ``name``'s images [N, C, H, W] of ``seed``; the teacher must come first."""
        n = len(images)
        out: dict[str, Any] = {"n_fake": n, **{k: None for k in SCORES}}
        if self.metrics is None and (self.pair is None or self.pair.num_features is None):
            feats = logits = None
        else:
            feats, logits = extract(self.backend, images, self.batch_size)
        if self.metrics is not None:
            out.update(score_features(self.metrics, feats, logits))
        if self.pair is not None:
            if name == TEACHER:
                self.pair.add_teacher(seed, feats, images)
            else:
                out.update(self.pair.score(seed, feats, images))
        if self.clip is not None:
            out["clip_score"] = self.clip(images, self.prompts[:n])
        return out
