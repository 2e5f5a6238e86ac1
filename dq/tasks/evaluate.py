"""``python eval.py``: evaluate a model (``model=...``) or a saved student (``ckpt_path=...``).

    python eval.py                                      # the configured model (default: the embedded teacher)
    python eval.py ckpt_path=outputs/quantize/<run>/student.safetensors [task.with_teacher=true]
    python eval.py ckpt_path=<export dir>                      # an export folder, on the fastest runtime here
    python eval.py ckpt_path=<export dir> runtime=reference    # ... or a named one: reference | int8 | compiled

A student checkpoint carries its configuration, so its path is all eval needs: it is sampled with
the sampler it was trained for, and ``task.with_teacher=true`` adds the FP teacher its run started
from. Overrides: ``sampler.name/steps/eta`` (null in conf/eval.yaml = keep the checkpoint's, or
``base_sampler`` for a teacher), ``task.num_samples``, ``seed``, ``task.seeds=k`` (mean ± std over
seeds seed … seed+k−1), ``task.batch_size``, ``task.guidance_scale``, ``metrics=...``.

A student's per-step activation tables belong to the raw timesteps it was trained at; with another
sampler or step count they are moved to the new timesteps (``dq.quant.retarget``: trained steps kept
exactly, others interpolated in raw t, outside the trained range clamped) and results.json records
the mapping under ``tpq_mapping``.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from dq.config import typed
from dq.errors import DQError
from dq.evaluation import evaluate_models, format_table, log_results
from dq.metrics.features import make_backend
from dq.models.checkpoint import attach_teacher_parts, load_student
from dq.models.export import is_export, load_export, resolve_runtime, use_runtime
from dq.models.conditioning import prompt_of, with_prompts
from dq.models.load import DiffusionModel
from dq.models.sampling import SamplerConfig, sampler_timesteps
from dq.quant.retarget import retarget
from dq.tasks.common import (command_line, finish_logger, load_teacher, make_logger, protocol, run_device, run_dir,
                             write_results)

log = logging.getLogger("dq")


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


def match_student_steps(meta: dict[str, Any], student: DiffusionModel, sampler: SamplerConfig) -> dict[str, Any] | None:
    """Fit a student's per-step activation tables to the sampler's raw timesteps when they differ from
    those it was trained at (``dq.quant.retarget``: exact rows kept, others interpolated in raw t or
    clamped to the trained range). Returns how parameters were mapped (for results.json), or None."""
    if meta["quant"].get("shared_tables"):
        return None  # one table for all steps: any schedule works
    trained = [int(t) for t in meta["quant"]["timesteps"]]
    wanted = sampler_timesteps(student, sampler)
    if trained == wanted:
        return None
    try:
        mapping = retarget(student.denoiser, wanted)
    except ValueError as e:
        raise DQError(f"cannot move the student's tables from its {len(trained)} trained steps to sampler "
                      f"{sampler.name} with {len(wanted)} steps: {e}") from None
    log.info("TPQ: %s (sampler %s, %d steps)", mapping.summary(), sampler.name, len(wanted))
    return {"summary": mapping.summary(), **vars(mapping)}


def load_checkpoint(cfg: DictConfig) -> tuple[SamplerConfig, DiffusionModel, dict[str, torch.nn.Module], dict[str, Any]]:
    """(the resolved sampler, the student, models to evaluate, info for results.json)."""
    path = str(cfg.ckpt_path)
    runtime = str(cfg.runtime)
    if runtime == "auto" and run_device(cfg).type != "cpu":
        runtime = "reference"  # the integer kernels are CPU kernels
        log.info("runtime=auto on %s: reference", run_device(cfg))
    if is_export(path):  # a folder written by export.py
        student, qc = load_export(path, runtime)
        runtime = qc["runtime"]
        prov = qc.get("provenance") or {}
        meta = {"quant": qc["quant"], "sampler": qc["sampler"], "teacher": prov.get("teacher"),
                "run_config": prov.get("run_config")}
    else:
        student, meta = load_student(path)
        if runtime == "auto":  # a training checkpoint is scored as it trained: the fake-quant model
            runtime = "reference"
            log.info("runtime=auto on a student.safetensors: reference (export it for the fast runtimes)")
        runtime = resolve_runtime(runtime)
        use_runtime(student.denoiser.eval(), runtime)
    sampler = resolve_sampler(cfg, meta["sampler"])
    mapping = match_student_steps(meta, student, sampler)
    models: dict[str, torch.nn.Module] = {}
    parts = [] if is_export(path) else meta.get("teacher_parts") or []  # an export carries its parts itself
    if cfg.task.with_teacher or parts:
        why = "task.with_teacher=true" if cfg.task.with_teacher else f"the student needs its teacher's {', '.join(parts)}"
        teacher = attach_teacher_parts(student, {**meta, "teacher_parts": parts}, why)
        if cfg.task.with_teacher:
            models["fp"] = teacher.to(run_device(cfg)).denoiser
    with_prompts(student, cfg.data.get("prompts")).to(run_device(cfg))
    models["student"] = student.denoiser
    info = {"ckpt_path": path, "runtime": runtime, "model": meta["teacher"], "quant": meta["quant"],
            "trained_sampler": meta["sampler"], "tpq_mapping": mapping, "run_config": meta.get("run_config")}
    return sampler, student, models, info


def run(cfg: DictConfig) -> dict[str, Any]:
    backend = make_backend(typed(cfg, "metrics"))  # a missing backend fails before any model is loaded
    if cfg.get("ckpt_path"):
        sampler, model, models, info = load_checkpoint(cfg)
    else:
        sampler = resolve_sampler(cfg, None)
        model = load_teacher(cfg)
        models, info = {"fp": model.denoiser}, {"model": model.name}
    run_config = info.pop("run_config", None)
    if cfg.task.guidance_scale is None:  # a student samples with the guidance it was distilled under
        trained = ((run_config or {}).get("calib") or {}).get("guidance_scale", 1.0)
        cfg.task.guidance_scale = float(trained) if isinstance(trained, (int, float)) else 1.0
        if cfg.task.guidance_scale != 1.0:
            log.info("task.guidance_scale=%s: the guidance the student was distilled under", cfg.task.guidance_scale)
        info["guidance_scale"] = cfg.task.guidance_scale
    p = protocol(cfg, sampler)
    out = run_dir(cfg)
    logger = make_logger(cfg, out, job="evaluate")
    try:
        result = evaluate_models(p, model, models, out, backend=backend,
                                 prompts=prompt_of(model, torch.arange(p.num_samples)))
        print(format_table(result["rows"]))
        write_results(out, {"command": command_line(), **info, "sampler": vars(sampler),
                            "metrics_backend": backend.name, "seed": int(cfg.seed), **result})
        log_results(logger, result, out)
    finally:
        finish_logger(logger)
    return result["summary"]
