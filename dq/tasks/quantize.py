"""The main job: quantize a teacher with a method (``method=``, dq/methods/), then evaluate it.

``python train.py`` = embedded digits teacher, W4A4, DilateQuant (WD + TPQ + BKD):

1. calibration trajectories from the teacher's own sampler (cached on disk), built when the method
   first asks for them;
2. the method turns a copy of the teacher into a student (dq/methods/<name>.py);
3. FP and student sampled with the same sampler, seed and noise, scored, written to results.json,
   and the student saved as ``student.safetensors``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dq.config import typed
from dq.data.calibration import generate, load_or_generate
from dq.distill.callbacks import act_tables, is_wandb
from dq.distill.fit import FitRun, fit
from dq.errors import DQError
from dq.evaluation import evaluate_models, format_table
from dq.methods import recipe_for
from dq.methods.base import Job, Student
from dq.metrics.callbacks import fid_callback
from dq.metrics.grid import side_by_side_png
from dq.models.blocks import select_blocks
from dq.models.checkpoint import save_student
from dq.models.conditioning import check_guidance, conditioning_notes, prompt_of, standin
from dq.models.export import export_from_checkpoint, load_export
from dq.models.load import DiffusionModel
from dq.models.sampling import sampler_timesteps
from dq import allocator
from dq.phases import Phases
from dq.quant.lowrank import lowrank_summary
from dq.tasks.common import (command_line, finish_logger, load_teacher, make_logger, protocol, run_dir,
                             trainer_kwargs, wandb_group, write_results)

log = logging.getLogger("dq")
STUDENT_FILE = "student.safetensors"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn: Any, phases: Phases, key: str) -> Any:
    """``fn`` run as the phase ``key`` (wall time and peak memory in results.json's ``phases``)."""
    def wrapper(*args: Any) -> Any:
        with phases(key):
            return fn(*args)
    return wrapper


def make_job(cfg: DictConfig, teacher: DiffusionModel, out: Path, logger: Any, phases: Phases) -> Job:
    sampler, calib_cfg, dcfg = typed(cfg, "sampler"), typed(cfg, "calib"), typed(cfg, "distill")
    resume = cfg.task.resume
    if resume and not Path(str(resume)).is_file():
        raise DQError(f"task.resume={resume!r} does not exist; give a checkpoints/last.ckpt of an earlier run")
    if resume:  # read it once here with weights_only=True: a foreign or broken file is one line, and runs nothing
        try:
            state = torch.load(str(resume), map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "state_dict" not in state:
                raise ValueError("no state_dict in it")
        except Exception as e:
            raise DQError(f"task.resume={resume!r} is not a readable training checkpoint "
                          f"({str(e).splitlines()[0][:160]}); give a checkpoints/last.ckpt of an earlier run") from None
    # bad block names fail before any work
    select_blocks(teacher.family.blocks(teacher.denoiser, dcfg.granularity), dcfg.blocks)
    calibration = functools.cache(timed(lambda: load_or_generate(teacher, sampler, calib_cfg,
                                                                 Path(str(cfg.paths.cache_dir))), phases, "calibration_data"))
    fid = fid_callback(typed(cfg, "callbacks").fid, teacher, sampler, typed(cfg, "metrics"), typed(cfg, "data"),
                       str(cfg.paths.cache_dir), int(cfg.seed), out_dir=out)
    run = FitRun(out=out, seed=int(cfg.seed), trainer=trainer_kwargs(cfg), logger=logger,
                 callbacks=[fid] if fid else [], resume=str(resume) if resume else None,
                 resample=lambda student: generate(dataclasses.replace(teacher, denoiser=student), sampler, calib_cfg).x)
    check_guidance(teacher, calib_cfg.guidance_scale, "calib.guidance_scale")
    notes = conditioning_notes(teacher)
    for note in notes:
        (log.warning if standin(teacher) else log.info)(note)
    return Job(notes=notes, teacher=teacher, quant=typed(cfg, "quant"), distill=dcfg, timesteps=sampler_timesteps(teacher, sampler),
               calibration=calibration,
               fit=timed(lambda student, d: fit(student, teacher.denoiser, calibration(), d, run), phases, "distill"),
               act_init_samples=calib_cfg.act_init_samples, resume=bool(resume))


def run(cfg: DictConfig) -> dict[str, Any]:
    start = time.time()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = run_dir(cfg)
    method = typed(cfg, "method")
    recipe = recipe_for(method)
    p = protocol(cfg)  # validates the evaluation settings before any work
    phases = Phases()
    with phases("load_teacher"):
        teacher = load_teacher(cfg)
    check_guidance(teacher, p.guidance_scale, "task.guidance_scale")
    logger = make_logger(cfg, out, job="quantize")
    try:
        job = make_job(cfg, teacher, out, logger, phases)
        student: Student = timed(recipe, phases, "method")(job, method)
        allocator.release()  # what distillation freed (optimizer states, activations) back to the OS
        sec = {k: v["seconds"] for k, v in phases.records.items()}
        timings = {k: sec[k] for k in ("calibration_data", "distill") if k in sec}
        timings["method_other"] = sec["method"] - sum(timings.values())
        results: dict[str, Any] = {
            "command": command_line(), "model": teacher.name, "method": OmegaConf.to_container(cfg.method),
            "quant": OmegaConf.to_container(cfg.quant), "sampler": OmegaConf.to_container(cfg.sampler),
            "seed": int(cfg.seed), "bits": "FP" if student.model is None else job.quant.label,
            "train": student.train, "scaling": student.scaling, "notes": job.notes + student.notes,
            "wandb_group": wandb_group(cfg) if cfg.logger.kind == "wandb" else None,
            "lowrank": None if student.model is None else lowrank_summary(student.model),
        }
        for note in student.notes:  # job.notes were logged as warnings where they arose
            log.info(note)
        if not student.train.get("is_global_zero", True):
            return {"bits": results["bits"]}
        if student.model is not None:
            parts = [k for k in ("vae", "text_encoder", "tokenizer") if getattr(teacher, k) is not None]
            with phases("save_student"):
                save_student(out / STUDENT_FILE, student.model, teacher, student.qcfg,
                             {"command": results["command"], "sampler": OmegaConf.to_container(cfg.sampler),
                              "method": results["method"], "teacher_parts": parts,
                              "run_config": OmegaConf.to_container(cfg, resolve=False)})
        results["train_seconds"] = time.time() - start
        if cfg.task.evaluate:
            if student.model is None:
                models = {"fp": teacher.denoiser}
            elif cfg.task.compare_fp:
                models = {"fp": teacher.denoiser, "student": student.model}
            else:
                models = {"student": student.model}
            if student.model is not None:  # Lightning hands the trained student back on the CPU
                student.model.to(teacher.device)
                results["student_runtime"] = "reference"
                if cfg.task.student_runtime != "reference":
                    with phases("export"):
                        results["student_runtime"], fast = fast_student(out, str(cfg.task.student_runtime),
                                                                        teacher.device)
                    models["student"] = fast
                    if cfg.task.compare_reference:
                        models["student_reference"] = student.model
            with phases("evaluation"):
                ev = evaluate_models(p, teacher, models, out, prompts=prompt_of(teacher, torch.arange(p.num_samples)))
            print(format_table(ev["rows"]))
            if {"fp", "student"} <= set(models):
                side_by_side_png([out / "samples_fp.png", out / "samples_student.png"],
                                 out / "samples_teacher_vs_student.png",
                                 labels=["FP teacher", f"student {results['bits']} {method.name}"
                                         + ("" if results.get("student_runtime") == "reference"
                                            else f" ({results['student_runtime']} runtime)")],
                                 title=f"{teacher.name}, {p.sampler.name} {p.sampler.steps} steps, seed {p.seed}")
            results.update({**ev, "notes": results["notes"] + ev["notes"]})
            timings.update({f"sampling_{r['name']}": r["sample_seconds"] for r in ev["rows"] if "sample_seconds" in r})
            timings["evaluation"] = time.time() - start - results["train_seconds"]
            log_eval(logger, ev, out, student)
        results["wall_seconds"] = time.time() - start
        results["timings"] = {"startup": results["train_seconds"] - sum(v for k, v in timings.items()
                                                                      if k in ("calibration_data", "distill", "method_other")),
                              **timings}
        results["peak_memory_mb"] = peak_memory_mb()
        results["phases"] = phases.summary()
        write_results(out, results)
        return {"bits": results["bits"], **results.get("summary", {}), "wall_seconds": results["wall_seconds"]}
    finally:
        finish_logger(logger)


def fast_student(out: Path, runtime: str, device: torch.device) -> tuple[str, torch.nn.Module]:
    """(the runtime ``runtime`` resolved to, the denoiser of the saved student's export on it): the student row
    sampled as a deployment runs it, with the seeds the fake-quant student would get."""
    if device.type != "cpu":
        raise DQError(f"task.student_runtime={runtime}: the integer runtimes run on the CPU and this job samples "
                      f"on {device}; use task.student_runtime=reference (eval.py ckpt_path=<export> on a CPU)")
    fast, qc = load_export(export_from_checkpoint(out / STUDENT_FILE, out / "export"), runtime)
    return qc["runtime"], fast.denoiser


def log_eval(logger: Any, ev: dict[str, Any], out: Path, student: Student) -> None:
    """wandb: metrics, teacher-vs-student sample grid, scaling statistics table, final Δ_x tables."""
    if not logger:
        return
    logger.log_metrics({f"eval/{k}": v for k, v in ev["summary"].items()})
    if not is_wandb(logger):
        return
    import wandb

    pair = out / "samples_teacher_vs_student.png"
    if pair.is_file():
        logger.experiment.log({"samples/teacher_vs_student": wandb.Image(str(pair), caption="teacher | student")},
                              commit=False)
    if student.scaling:
        cols = sorted({k for r in student.scaling for k in r if not isinstance(r[k], (list, dict))})
        rows = [[",".join(r["layers"])] + [r.get(c) for c in cols] for r in student.scaling]
        logger.experiment.log({"scaling/layers": wandb.Table(columns=["layers", *cols], data=rows)}, commit=False)
    tables = act_tables(student.model) if student.model is not None else {}
    if tables:
        names = list(tables)
        logger.experiment.log({"tpq/delta_x_final": wandb.plot.line_series(
            xs=list(range(len(tables[names[0]]))), ys=[tables[n].tolist() for n in names], keys=names,
            title="per-step activation step size Δ_x (final)", xname="sampling step")})
