"""``python eval.py``: evaluate a model (``model=...``) or a saved student (``ckpt_path=...``).

    python eval.py                                      # the configured model (default: the embedded teacher)
    python eval.py ckpt_path=outputs/quantize/<run>/student.safetensors [task.with_teacher=true]
    python eval.py ckpt_path=<export dir> runtime=int8         # an export folder, on the integer kernels

A student checkpoint carries its configuration, so its path is all eval needs: it is sampled with
the sampler it was trained for, and ``task.with_teacher=true`` adds the FP teacher its run started
from. Overrides: ``sampler.name/steps/eta`` (null in conf/eval.yaml = keep the checkpoint's, or
``base_sampler`` for a teacher), ``task.num_samples``, ``seed``, ``task.seeds=k`` (mean ± std over
seeds seed … seed+k−1), ``task.batch_size``, ``task.guidance_scale``, ``metrics=...``.

A student's per-step activation tables are tied to the raw timesteps it was trained at: another
step count is refused with a one-line error naming both.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from dq.config import typed
from dq.errors import DQError
from dq.evaluation import evaluate_models, format_table, log_results
from dq.metrics.features import make_backend
from dq.models.checkpoint import load_student
from dq.models.export import is_export, load_export
from dq.models.load import DiffusionModel, ModelConfig, load_model
from dq.models.sampling import SamplerConfig, sampler_timesteps
from dq.quant.int8 import to_int8
from dq.tasks.common import command_line, finish_logger, make_logger, protocol, run_dir, write_results


def resolve_sampler(cfg: DictConfig, saved: dict[str, Any] | None) -> SamplerConfig:
    """``saved`` (a checkpoint's sampler) or ``cfg.base_sampler``, with every non-null field of
    ``cfg.sampler`` on top (eval.yaml's sampler fields default to null = not overridden)."""
    base = dict(saved if saved is not None else (cfg.get("base_sampler") or {}))
    base.update({k: v for k, v in (cfg.sampler or {}).items() if v is not None})
    missing = [k for k in ("name", "steps") if base.get(k) is None]
    if missing:
        raise DQError(f"sampler.{missing[0]} is not set; give it on the command line, e.g. sampler.name=ddim "
                      f"sampler.steps=50")
    return SamplerConfig(name=str(base["name"]), steps=int(base["steps"]), eta=float(base.get("eta") or 0.0))


def check_student_steps(meta: dict[str, Any], student: DiffusionModel, sampler: SamplerConfig, path: str) -> None:
    """Refuse a sampler whose raw timesteps differ from those the student's per-step tables were made for."""
    q = meta["quant"]
    if q.get("shared_tables"):
        return  # one table for all steps: any schedule works
    trained = [int(t) for t in q["timesteps"]]
    wanted = sampler_timesteps(student, sampler)
    if len(trained) != len(wanted):
        raise DQError(f"student {path} has per-step activation tables for {len(trained)} sampler steps, but "
                      f"sampler.steps={len(wanted)} was requested; use sampler.steps={len(trained)} "
                      f"(resampling the tables to another step count is not implemented)")
    if trained != wanted:
        raise DQError(f"student {path} was trained at timesteps {trained}, but sampler.name={sampler.name} "
                      f"with {len(wanted)} steps calls it at {wanted}; use the sampler it was trained with "
                      f"(saved: {meta['sampler']})")


def load_checkpoint(cfg: DictConfig) -> tuple[SamplerConfig, DiffusionModel, dict[str, torch.nn.Module], dict[str, Any]]:
    """(the resolved sampler, the student, models to evaluate, info for results.json)."""
    path = str(cfg.ckpt_path)
    if is_export(path):  # a folder written by export.py
        student, qc = load_export(path, str(cfg.runtime))
        prov = qc.get("provenance") or {}
        meta = {"quant": qc["quant"], "sampler": qc["sampler"], "teacher": prov.get("teacher"),
                "run_config": prov.get("run_config")}
    else:
        student, meta = load_student(path)
        if cfg.runtime == "int8":
            to_int8(student.denoiser)
    sampler = resolve_sampler(cfg, meta["sampler"])
    check_student_steps(meta, student, sampler, path)
    models: dict[str, torch.nn.Module] = {}
    if cfg.task.with_teacher:
        model_cfg = (meta.get("run_config") or {}).get("model")
        if model_cfg is None:
            raise DQError(f"student {path} does not record the teacher it came from (run_config.model); "
                          f"use task.with_teacher=false")
        try:
            models["fp"] = load_model(ModelConfig(**model_cfg)).denoiser
        except DQError as e:
            raise DQError(f"task.with_teacher=true: cannot load the student's teacher: {e}") from None
    models["student"] = student.denoiser
    info = {"ckpt_path": path, "runtime": str(cfg.runtime), "model": meta["teacher"], "quant": meta["quant"],
            "trained_sampler": meta["sampler"]}
    return sampler, student, models, info


def run(cfg: DictConfig) -> dict[str, Any]:
    backend = make_backend(typed(cfg, "metrics"))  # a missing backend fails before any model is loaded
    if cfg.get("ckpt_path"):
        sampler, model, models, info = load_checkpoint(cfg)
    else:
        sampler = resolve_sampler(cfg, None)
        model = load_model(typed(cfg, "model"))
        models, info = {"fp": model.denoiser}, {"model": model.name}
    p = protocol(cfg, sampler)
    out = run_dir(cfg)
    logger = make_logger(cfg, out, job="evaluate")
    try:
        result = evaluate_models(p, model, models, out, backend=backend)
        print(format_table(result["rows"]))
        write_results(out, {"command": command_line(), **info, "sampler": vars(sampler),
                            "metrics_backend": backend.name, "seed": int(cfg.seed), **result})
        log_results(logger, result, out)
    finally:
        finish_logger(logger)
    return result["summary"]
