"""Evaluate diffusion models: sample with a sampler, score FID / KID / IS against the held-out digits.

    python eval.py                                      # the configured teacher (model=...)
    python eval.py ckpt_path=outputs/quantize/<run>/student.pt [task.with_teacher=true]

A student checkpoint carries its configuration, so its path is all eval needs: it is sampled with
the sampler it was trained for, and ``task.with_teacher=true`` adds the FP teacher its run started
from (``run_config.model`` in the checkpoint). Overrides: ``sampler.name/steps/eta`` (null in
conf/eval.yaml = keep the checkpoint's, or ``base_sampler`` for a teacher), ``task.num_samples``,
``seed``, ``task.seeds=k`` (mean ± std over seeds seed … seed+k−1), ``task.batch_size``,
``task.guidance_scale`` (conditional models), ``metrics=...`` (feature backend).

A student's per-step activation tables are tied to the raw timesteps it was trained at: asking for
another step count is refused with a one-line error naming both counts. Resampling the tables along
t (to run a student at a step count it was not trained for) is not implemented.

Writes ``results.json``, ``samples_<model>.png``, prints a table and logs both to the logger group
(wandb offline by default). ``task.floor=true`` also scores the held-out real digits against the
train digits: the value a perfect generator would get at this sample count. Reference features are
cached under ``paths.cache_dir`` (dq.metrics.reference).

Conditional models sample with stand-in prompt embeddings (dq.models.conditioning) and classifier-
free guidance ``task.guidance_scale``. Their samples are scored only when they have the reference
images' shape; latent models (e.g. tiny_cond_unet's 4×8×8) are sampled and gridded, and FID/KID/IS
are skipped with a note (decoding latents through a VAE is not implemented). No CLIP score is
computed: it needs prompt-driven generation (a text encoder), which dq's conditioning does not have.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dq.errors import DQError
from dq.metrics.features import FeatureBackend, make_backend
from dq.metrics.grid import save_grid
from dq.metrics.image_metrics import ImageMetrics, score
from dq.metrics.reference import cached_metrics, reference_features, shape_problem
from dq.models.conditioning import cond_fn_for
from dq.models.load import Teacher, load_teacher
from dq.models.sampling import make_sampler, sample_images, sampler_timesteps
from dq.models.student import load_student
from dq.tasks.common import command_line, finish_logger, make_logger, run_dir, write_results

log = logging.getLogger("dq")
FLOOR_NAME = "real held-out vs train (floor)"
SCORES = ("fid", "kid", "is")


def check_num_samples(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise DQError(f"task.num_samples={n!r} must be a positive integer number of images")
    return n


def check_seeds(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise DQError(f"task.seeds={k!r} must be a positive integer (k seeds: seed, seed+1, …, seed+k−1)")
    return k


# ------------------------------------------------------------------------------------ sampler / ckpt
def resolve_sampler(cfg: Any, saved: dict[str, Any] | None) -> DictConfig:
    """The sampler to use: ``saved`` (a checkpoint's) or ``cfg.base_sampler``, with every non-null field
    of ``cfg.sampler`` on top (eval.yaml's sampler fields default to null = not overridden)."""
    base = saved if saved is not None else (cfg.get("base_sampler") or {})
    overrides = {k: v for k, v in (cfg.sampler or {}).items() if v is not None}
    sampler = OmegaConf.merge(OmegaConf.create(dict(base)), overrides)
    missing = [k for k in ("name", "steps") if sampler.get(k) is None]
    if missing:
        raise DQError(f"sampler.{missing[0]} is not set; give it on the command line, e.g. sampler.name=ddim "
                      f"sampler.steps=50")
    return sampler


def with_sampler(cfg: Any, sampler: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose ``sampler`` is ``sampler``."""
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.sampler = sampler
    return cfg


def check_student_steps(meta: dict[str, Any], student: Teacher, sampler_cfg: Any, path: str) -> None:
    """Refuse a sampler whose raw timesteps differ from those the student's per-step tables were made for."""
    q = meta["quant"]
    if q.get("shared_tables"):
        return  # one table for all steps: any schedule works
    trained = [int(t) for t in q["timesteps"]]
    wanted = sampler_timesteps(student, sampler_cfg)
    if len(trained) != len(wanted):
        raise DQError(f"student {path} has per-step activation tables for {len(trained)} sampler steps, but "
                      f"sampler.steps={len(wanted)} was requested; use sampler.steps={len(trained)} "
                      f"(resampling the tables to another step count is not implemented)")
    if trained != wanted:
        raise DQError(f"student {path} was trained at timesteps {trained}, but sampler.name={sampler_cfg.name} "
                      f"with {len(wanted)} steps calls it at {wanted}; use the sampler it was trained with "
                      f"(saved: {meta['sampler']})")


def load_checkpoint(cfg: Any) -> tuple[DictConfig, Teacher, dict[str, torch.nn.Module], dict[str, Any]]:
    """(cfg with the resolved sampler, the student as a Teacher, models to evaluate, info for results.json)."""
    path = str(cfg.ckpt_path)
    student, meta = load_student(path)
    cfg = with_sampler(cfg, resolve_sampler(cfg, meta["sampler"]))
    check_student_steps(meta, student, cfg.sampler, path)
    models: dict[str, torch.nn.Module] = {}
    if cfg.task.get("with_teacher", False):
        model_cfg = (meta.get("run_config") or {}).get("model")
        if model_cfg is None:
            raise DQError(f"student {path} does not record the teacher it came from (run_config.model); "
                          f"use task.with_teacher=false")
        try:
            models["fp"] = load_teacher(OmegaConf.create(model_cfg)).unet
        except DQError as e:
            raise DQError(f"task.with_teacher=true: cannot load the student's teacher: {e}") from None
    models["student"] = student.unet
    info = {"ckpt_path": path, "model": meta["teacher"], "quant": meta["quant"], "trained_sampler": meta["sampler"]}
    return cfg, student, models, info


# ------------------------------------------------------------------------------------ scoring
def floor_row(cfg: Any, backend: FeatureBackend) -> dict[str, Any]:
    """Held-out real digits scored against the train digits: the best a generator can do here.
    Both sides come from the reference-feature cache (no feature-network call on a second run)."""
    m = cached_metrics(cfg.metrics, cfg.data, cfg.paths.cache_dir, "train", backend)
    held = reference_features(backend, cfg.data, "heldout", cfg.paths.cache_dir, m.batch_size)
    m.add_fake_features(held.features, held.logits)
    return {"name": FLOOR_NAME, **m.compute()}


def aggregate(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed: its scores. k seeds: mean of fid/kid/is, their std over seeds (``<m>_seed_std``), per_seed."""
    if len(scores) == 1:
        return scores[0]
    out: dict[str, Any] = {"n_fake": scores[0]["n_fake"], "n_real": scores[0]["n_real"], "per_seed": scores}
    for k in SCORES:
        vals = [s[k] for s in scores]
        if None in vals:
            out[k] = None
            continue
        v = torch.tensor(vals, dtype=torch.float64)
        out[k], out[f"{k}_seed_std"] = float(v.mean()), float(v.std())
    return out


def evaluate_models(cfg: Any, teacher: Teacher, models: dict[str, torch.nn.Module], out: Path,
                    metrics: ImageMetrics | None = None, backend: FeatureBackend | None = None) -> dict[str, Any]:
    """Sample ``task.num_samples`` images from each model (same sampler, seeds, noise) and score them.

    ``teacher`` supplies the noise schedule, sample shape and conditioning; ``metrics`` (optional)
    an ImageMetrics holding the reference; ``backend`` (optional) the feature network to build it.
    Returns {"rows": [one dict per model (+ floor)], "summary": {"<name>/fid": ..., ...}, "notes": [...]}.
    """
    n = check_num_samples(cfg.task.num_samples)
    seeds = [int(cfg.seed) + i for i in range(check_seeds(cfg.task.get("seeds", 1)))]
    make_sampler(teacher, cfg.sampler)  # fail on a bad sampler config before any work
    backend = metrics.backend if metrics is not None else backend or make_backend(cfg.metrics)
    notes: list[str] = []
    reason = shape_problem(teacher.sample_shape, cfg.data, backend)
    if reason:
        notes.append(f"{teacher.name}: {reason}; FID/KID/IS skipped")
        metrics = None
    elif metrics is None:
        metrics = cached_metrics(cfg.metrics, cfg.data, cfg.paths.cache_dir, "heldout", backend)
    if teacher.conditional:
        notes.append("CLIP score not computed: it needs prompt-driven generation (a text encoder); dq's "
                     "conditional sampling uses stand-in prompt embeddings (dq.models.conditioning)")
    for note in notes:
        log.warning(note)
    rows = [floor_row(cfg, backend)] if cfg.task.floor and metrics is not None else []
    guidance = float(cfg.task.get("guidance_scale", 1.0))
    indices = torch.arange(n)
    for name, unet in models.items():
        scores, seconds = [], 0.0
        for s in seeds:
            start = time.time()
            images = sample_images(teacher, unet, cfg.sampler, indices, s, cfg.task.batch_size,
                                   cond_fn=cond_fn_for(teacher, s), guidance_scale=guidance,
                                   desc=f"sampling {name} (seed {s})")
            seconds += time.time() - start
            if s == seeds[0]:  # a latent's first 3 channels, shown as RGB
                save_grid(images[: cfg.task.grid, :3], out / f"samples_{name}.png")
            if metrics is not None:
                scores.append(score(metrics, images))
        row = aggregate(scores) if scores else {"n_fake": n, **{k: None for k in SCORES}}
        rows.append({"name": name, **row, "seeds": seeds, "sample_seconds": seconds,
                     "images_per_second": n * len(seeds) / seconds})
    summary = {f"{r['name'].split(' ')[0]}/{k}": r[k] for r in rows
               for k in (*SCORES, *(f"{m}_seed_std" for m in SCORES)) if r.get(k) is not None}
    return {"rows": rows, "summary": summary, "notes": notes}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    std = row.get(f"{key}_seed_std")
    return format(v, fmt) if std is None else f"{format(v, fmt)}±{format(std, fmt)}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: model, images, FID, KID, IS ("mean±std" over seeds; "—" where not scored)."""
    lines = [f"{'model':<34} {'images':>6} {'FID':>15} {'KID':>17} {'IS':>11}", "-" * 87]
    for r in rows:
        lines.append(f"{r['name']:<34} {r['n_fake']:>6d} {_cell(r, 'fid', '.3f'):>15} "
                     f"{_cell(r, 'kid', '.5f'):>17} {_cell(r, 'is', '.2f'):>11}")
    return "\n".join(lines)


def evaluate_teacher(cfg: Any, teacher: Teacher, out: Path) -> dict[str, Any]:
    result = evaluate_models(cfg, teacher, {"fp": teacher.unet}, out)
    print(format_table(result["rows"]))
    write_results(out, {"command": command_line(), "model": teacher.name, "sampler": dict(cfg.sampler),
                        "seed": cfg.seed, **result})
    return result


def log_results(logger: Any, result: dict[str, Any], out: Path) -> None:
    """Metrics as ``eval/<model>/<metric>``; on wandb also the sample grids and the rows as a table."""
    if not logger:
        return
    logger.log_metrics({f"eval/{k}": v for k, v in result["summary"].items()})
    if type(logger).__name__ != "WandbLogger":
        return
    import wandb

    cols = ["name", "n_fake", *SCORES, *(f"{m}_seed_std" for m in SCORES), "images_per_second"]
    table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in result["rows"]])
    grids = {f"samples/{p.stem.removeprefix('samples_')}": wandb.Image(str(p))
             for p in sorted(out.glob("samples_*.png"))}
    logger.experiment.log({"eval/table": table, **grids})


def run(cfg: Any) -> dict[str, Any]:
    check_num_samples(cfg.task.num_samples)
    check_seeds(cfg.task.get("seeds", 1))
    backend = make_backend(cfg.metrics)  # a missing backend fails before any model is loaded or sampled
    if cfg.get("ckpt_path"):
        cfg, teacher, models, info = load_checkpoint(cfg)
    else:
        cfg = with_sampler(cfg, resolve_sampler(cfg, None))
        teacher = load_teacher(cfg.model)
        models, info = {"fp": teacher.unet}, {"model": teacher.name}
    out = run_dir(cfg)
    logger = make_logger(cfg, out, job="evaluate")
    try:
        result = evaluate_models(cfg, teacher, models, out, backend=backend)
        print(format_table(result["rows"]))
        write_results(out, {"command": command_line(), **info, "sampler": OmegaConf.to_container(cfg.sampler),
                            "metrics_backend": backend.name, "seed": int(cfg.seed), **result})
        log_results(logger, result, out)
    finally:
        finish_logger(logger)
    return result["summary"]
