"""Evaluate a diffusion model: sample with its sampler, score FID / KID / IS against held-out digits.

``python train.py task=evaluate`` (or ``python eval.py``) evaluates the configured teacher; it
writes ``results.json``, a sample grid PNG and prints a table. With ``task.floor=true`` it also
scores the held-out real digits against the train digits: the value a perfect generator would get
at this sample count.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dq.data.digits import DigitsDataModule
from dq.errors import DQError
from dq.metrics.grid import save_grid
from dq.metrics.image_metrics import ImageMetrics, build_metrics, score
from dq.models.load import Teacher, load_teacher
from dq.models.sampling import make_sampler, sample_images
from dq.tasks.common import command_line, run_dir, write_results


def data_module(cfg: Any) -> DigitsDataModule:
    dm = DigitsDataModule(size=cfg.data.size, heldout_fraction=cfg.data.heldout_fraction,
                          split_seed=cfg.data.split_seed)
    dm.setup()
    return dm


def check_num_samples(n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise DQError(f"task.num_samples={n!r} must be a positive integer number of images")
    return n


def floor_row(cfg: Any, dm: DigitsDataModule) -> dict[str, Any]:
    """Held-out real digits scored against the train digits: the best a generator can do here."""
    m = build_metrics(cfg.metrics, dm.train_images)
    return {"name": "real held-out vs train (floor)", **score(m, dm.heldout_images)}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<34} {'images':>6} {'FID':>8} {'KID':>9} {'IS':>6}", "-" * 67]
    for r in rows:
        lines.append(f"{r['name']:<34} {r['n_fake']:>6d} {r['fid']:>8.3f} {r['kid']:>9.5f} {r['is']:>6.2f}")
    return "\n".join(lines)


def evaluate_models(cfg: Any, teacher: Teacher, models: dict[str, torch.nn.Module], out: Path,
                    metrics: ImageMetrics | None = None) -> dict[str, Any]:
    """Sample ``task.num_samples`` images from each model (same sampler, seed, noise) and score them.

    Returns {"rows": [one dict per model (+ floor)], "summary": {"<name>/fid": ..., ...}}.
    """
    n = check_num_samples(cfg.task.num_samples)
    make_sampler(teacher, cfg.sampler)  # fail on a bad sampler config before any work
    dm = data_module(cfg)
    metrics = metrics or build_metrics(cfg.metrics, dm.heldout_images)
    rows = [floor_row(cfg, dm)] if cfg.task.floor else []
    indices = torch.arange(n)
    for name, unet in models.items():
        start = time.time()
        images = sample_images(teacher, unet, cfg.sampler, indices, cfg.seed, cfg.task.batch_size,
                               desc=f"sampling {name}")
        seconds = time.time() - start
        save_grid(images[: cfg.task.grid], out / f"samples_{name}.png")
        rows.append({"name": name, **score(metrics, images), "sample_seconds": seconds,
                     "images_per_second": n / seconds})
    summary = {f"{r['name'].split(' ')[0]}/{k}": r[k] for r in rows for k in ("fid", "kid", "is")}
    return {"rows": rows, "summary": summary}


def evaluate_teacher(cfg: Any, teacher: Teacher, out: Path) -> dict[str, Any]:
    result = evaluate_models(cfg, teacher, {"fp": teacher.unet}, out)
    print(format_table(result["rows"]))
    write_results(out, {"command": command_line(), "model": teacher.name, "sampler": dict(cfg.sampler),
                        "seed": cfg.seed, **result})
    return result


def run(cfg: Any) -> dict[str, Any]:
    check_num_samples(cfg.task.num_samples)
    teacher = load_teacher(cfg.model)
    return evaluate_teacher(cfg, teacher, run_dir(cfg))["summary"]
