"""Evaluation as a library: sample models with a sampler and score them (FID / KID / IS) against real
images. Used by the tasks (``python eval.py``, the main job), callbacks and scripts.

Every model of one call samples the same images: the same sampler, seeds and per-image noise
(``dq.models.sampling``), so their scores are paired. ``Protocol.floor`` also scores held-out real
images against the train images: the value a perfect generator would get at this sample count.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dq import allocator
from dq.data.digits import DataConfig
from dq.errors import DQError
from dq.metrics.features import FeatureBackend, make_backend
from dq.metrics.grid import save_grid
from dq.metrics.image_metrics import ImageMetrics, MetricsConfig
from dq.metrics.reference import cached_metrics, reference_features, shape_problem
from dq.metrics.scoring import ALL_SCORES, Scorer, ordered
from dq.models.conditioning import cond_fn_for
from dq.models.load import DiffusionModel
from dq.models.sampling import SamplerConfig, make_sampler, sample_images
from dq.quant.quantizers import clear_weight_caches

log = logging.getLogger("dq")
FLOOR_NAME = "real held-out vs train (floor)"


@dataclass
class Protocol:
    """How models are evaluated: how many images, which seeds and sampler, which features and reference."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache_dir: str = ".cache/dq"
    num_samples: int = 1000       # images per model and seed
    batch_size: int = 250         # images per sampling batch
    seed: int = 0
    seeds: int = 1                # k > 1: mean ± std over seeds seed, seed+1, …, seed+k−1
    floor: bool = True
    grid: int = 64                # images in each saved sample grid
    guidance_scale: float = 1.0   # classifier-free guidance of conditional models

    def __post_init__(self) -> None:
        check_num_samples(self.num_samples)
        check_seeds(self.seeds)


def check_num_samples(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise DQError(f"task.num_samples={n!r} must be a positive integer number of images")
    return n


def check_seeds(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise DQError(f"task.seeds={k!r} must be a positive integer (k seeds: seed, seed+1, …, seed+k−1)")
    return k


def floor_row(p: Protocol, backend: FeatureBackend) -> dict[str, Any]:
    """Held-out real digits scored against the train digits: the best a generator can do here.
    Both sides come from the reference-feature cache (no feature-network call on a second run)."""
    m = cached_metrics(p.metrics, p.data, p.cache_dir, "train", backend)
    held = reference_features(backend, p.data, "heldout", p.cache_dir, m.batch_size)
    m.add_fake_features(held.features, held.logits)
    return {"name": FLOOR_NAME, **m.compute()}


def aggregate(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed: its scores. k seeds: mean of each score, its std over seeds (``<m>_seed_std``), per_seed."""
    if len(scores) == 1:
        return scores[0]
    out: dict[str, Any] = {"n_fake": scores[0]["n_fake"], "n_real": scores[0].get("n_real"), "per_seed": scores}
    for k in ALL_SCORES:
        if k not in scores[0]:
            continue
        vals = [s[k] for s in scores]
        if None in vals:
            out[k] = None
            continue
        v = torch.tensor(vals, dtype=torch.float64)
        out[k], out[f"{k}_seed_std"] = float(v.mean()), float(v.std())
    return out


def evaluate_models(p: Protocol, teacher: DiffusionModel, models: dict[str, torch.nn.Module], out: Path,
                    metrics: ImageMetrics | None = None, backend: FeatureBackend | None = None,
                    prompts: list[str] | None = None) -> dict[str, Any]:
    """Sample ``task.num_samples`` images from each model (same sampler, seeds, noise) and score them.

    ``teacher`` supplies the noise schedule, sample shape and conditioning; ``metrics`` (optional)
    an ImageMetrics holding the reference; ``backend`` (optional) the feature network to build it.
    ``prompts`` (optional): the prompt of each image, for CLIP score (dq.metrics.scoring.Scorer).
    Returns {"rows": [one dict per model (+ floor)], "summary": {"<name>/fid": ..., ...}, "notes": [...],
    "metrics": {"<score>": what it compared}}; students also get fid_to_fp / psnr_to_fp / ssim_to_fp.
    """
    n = p.num_samples
    seeds = [p.seed + i for i in range(p.seeds)]
    make_sampler(teacher, p.sampler)  # fail on a bad sampler config before any work
    backend = metrics.backend if metrics is not None else backend or make_backend(p.metrics)
    notes: list[str] = []
    reason = shape_problem(teacher.image_shape, p.data, backend, p.metrics.reference)
    if reason:
        notes.append(f"{teacher.name}: {reason}; FID/KID/IS skipped")
        metrics = None
    elif metrics is None:
        metrics = cached_metrics(p.metrics, p.data, p.cache_dir, "heldout", backend, channels=teacher.image_shape[0])
    scorer = Scorer(p.metrics, p.data, backend, metrics, list(models), teacher.image_shape, prompts,
                    teacher.conditional)
    notes += scorer.notes
    if p.floor and metrics is not None and p.metrics.reference is not None:
        notes.append(f"floor row not computed: it scores held-out vs train {p.data.name} images, not "
                     f"metrics.reference={p.metrics.reference}")
    for note in notes:
        log.warning(note)
    rows = [floor_row(p, backend)] if p.floor and metrics is not None and p.metrics.reference is None else []
    indices = torch.arange(n)
    for name, unet in ordered(models):  # the FP teacher first: students are compared with its images
        scores, seconds = [], 0.0
        for s in seeds:
            start = time.time()
            images = sample_images(teacher, unet, p.sampler, indices, s, p.batch_size,
                                   cond_fn=cond_fn_for(teacher, s), guidance_scale=p.guidance_scale,
                                   desc=f"sampling {name} (seed {s})")
            seconds += time.time() - start
            clear_weight_caches(unet)  # the student's fake-quant weight copies
            allocator.release()  # the sampler's freed activations back to the OS before scoring
            if s == seeds[0]:  # a latent's first 3 channels, shown as RGB
                save_grid(images[: p.grid, :3], out / f"samples_{name}.png")
            scores.append(scorer.score(name, s, images))
        row = aggregate(scores)
        rows.append({"name": name, **row, "seeds": seeds, "sample_seconds": seconds,
                     "images_per_second": n * len(seeds) / seconds})
    summary = {f"{r['name'].split(' ')[0]}/{k}": r[k] for r in rows
               for k in (*ALL_SCORES, *(f"{m}_seed_std" for m in ALL_SCORES)) if r.get(k) is not None}
    return {"rows": rows, "summary": summary, "notes": notes, "metrics": scorer.described}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    std = row.get(f"{key}_seed_std")
    return format(v, fmt) if std is None else f"{format(v, fmt)}±{format(std, fmt)}"


PAIR_COLUMNS = (("fid_to_fp", "FID-to-FP", ".3f", 15), ("psnr_to_fp", "PSNR", ".2f", 13),
                ("ssim_to_fp", "SSIM", ".4f", 15), ("clip_score", "CLIP", ".2f", 13))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: model, images, FID, KID, IS ("mean±std" over seeds; "—" where not scored), and
    FID-to-FP, PSNR, SSIM (student vs FP teacher) and CLIP score when any row has them."""
    extra = [(k, h, f, w) for k, h, f, w in PAIR_COLUMNS if any(r.get(k) is not None for r in rows)]
    head = "".join(f" {h:>{w}}" for _, h, _, w in extra)
    lines = [f"{'model':<34} {'images':>6} {'FID':>15} {'KID':>17} {'IS':>11}{head}", "-" * (87 + len(head))]
    for r in rows:
        lines.append(f"{r['name']:<34} {r['n_fake']:>6d} {_cell(r, 'fid', '.3f'):>15} "
                     f"{_cell(r, 'kid', '.5f'):>17} {_cell(r, 'is', '.2f'):>11}"
                     + "".join(f" {_cell(r, k, f):>{w}}" for k, _, f, w in extra))
    return "\n".join(lines)


def log_results(logger: Any, result: dict[str, Any], out: Path) -> None:
    """Metrics as ``eval/<model>/<metric>``; on wandb also the sample grids and the rows as a table."""
    if not logger:
        return
    logger.log_metrics({f"eval/{k}": v for k, v in result["summary"].items()})
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    cols = ["name", "n_fake", *ALL_SCORES, *(f"{m}_seed_std" for m in ALL_SCORES), "images_per_second"]
    table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in result["rows"]])
    grids = {f"samples/{p.stem.removeprefix('samples_')}": wandb.Image(str(p))
             for p in sorted(out.glob("samples_*.png"))}
    logger.experiment.log({"eval/table": table, **grids})
