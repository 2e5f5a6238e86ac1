"""The main job: quantize a teacher with DilateQuant (or an ablation), then evaluate it.

``python train.py`` = embedded digits teacher, W4A4, DilateQuant (WD + TPQ + BKD):

1. calibration trajectories from the teacher's own sampler (cached on disk);
2. student = copy of the teacher → prepare (fake-quant layers, per-step tables) → Weight Dilation
   (or SmoothQuant / none) → activation tables initialised per step from calibration inputs;
3. block-wise distillation (Lightning, manual optimisation, checkpoints every distill.ckpt_every);
4. FP and student sampled with the same sampler, seed and noise, scored, written to results.json.
"""
from __future__ import annotations

import copy
import logging
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from dq.data.calibration import CalibrationDataModule, load_or_generate
from dq.distill.bkd import BlockDistiller, DistillConfig
from dq.distill.callbacks import BlockProgressBar, QuantDashboard, RankConsistency, act_tables, is_wandb
from dq.errors import DQError, choice_error
from dq.metrics.callbacks import fid_callback
from dq.metrics.grid import side_by_side_png
from dq.models.blocks import select_blocks, unet_blocks
from dq.models.load import Teacher, load_teacher
from dq.models.quantize import QuantConfig, build_student, prepare
from dq.models.sampling import sampler_timesteps
from dq.models.student import save_student
from dq.tasks.common import (command_line, finish_logger, make_logger, make_trainer, run_dir, wandb_group,
                             write_results)
from dq.tasks.evaluate import check_num_samples, evaluate_models, format_table

log = logging.getLogger("dq")
SCALINGS = {"wd": "wd", "sq": "sq", "none": None}


def quant_config(cfg: Any, timesteps: list[int]) -> QuantConfig:
    q, m = cfg.quant, cfg.method
    try:
        return QuantConfig(w_bits=q.w_bits, a_bits=q.a_bits, timesteps=tuple(timesteps),
                           shared_tables=bool(m.shared_tables), prob_bits=q.prob_bits,
                           first_last_bits=q.first_last_bits, quantize_attention=q.quantize_attention,
                           skip=tuple(q.skip), quantize_time_embedding=q.quantize_time_embedding)
    except ValueError as e:
        raise DQError(f"quant: {e}") from None


def distill_config(cfg: Any) -> DistillConfig:
    d = cfg.distill
    return DistillConfig(steps_per_block=int(d.steps_per_block), lr_weights=float(d.lr_weights),
                         lr_delta_w=float(d.lr_delta_w), lr_act=float(d.lr_act), input=str(d.input),
                         blocks=tuple(d.blocks), cosine=bool(d.cosine), granularity=str(d.granularity))


def calibration_batches(calib, n: int, batch_size: int = 256) -> list[tuple]:
    idx = torch.arange(min(n, len(calib)))
    return [(calib.x[i], calib.t[i], None if calib.cond is None else calib.cond[i]) for i in idx.split(batch_size)]


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_student(cfg: Any, teacher: Teacher, qcfg: QuantConfig, calib, resume: bool) -> tuple[torch.nn.Module, list]:
    """prepare → scaling → activation init; on resume only prepare (the checkpoint holds the rest)."""
    scaling_name = str(cfg.method.scaling)
    student = copy.deepcopy(teacher.unet)
    if resume:
        return prepare(student, qcfg), []
    batches = calibration_batches(calib, int(cfg.calib.act_init_samples))
    student, report = build_student(student, qcfg, batches, scaling=SCALINGS[scaling_name],
                                    calib_method=str(cfg.method.calib_method), sq_alpha=float(cfg.method.sq_alpha))
    return student, report.scaling


def distill(cfg: Any, teacher: Teacher, student: torch.nn.Module, calib, out: Path, logger: Any) -> dict[str, Any]:
    dcfg = distill_config(cfg)
    student.train().requires_grad_(True)
    module = BlockDistiller(student, teacher.unet, dcfg)
    dm = CalibrationDataModule(calib, int(cfg.distill.batch_size), module.total_steps, int(cfg.seed))
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=int(cfg.distill.ckpt_every))
    callbacks = [ckpt, BlockProgressBar(), RankConsistency()] + ([QuantDashboard()] if is_wandb(logger) else [])
    fid = fid_callback(cfg, teacher, out_dir=out)  # callbacks=fid: FID/IS after each block
    if fid is not None:
        callbacks.append(fid)
    # use_distributed_sampler=False: StepSeededBatches already gives each rank its own slice.
    trainer = make_trainer(cfg, max_steps=module.total_steps, logger=logger, callbacks=callbacks,
                           use_distributed_sampler=False,
                           enable_checkpointing=True, enable_progress_bar=False, default_root_dir=str(out))
    resume = cfg.task.resume
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
    student.eval().requires_grad_(False)
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("distill/loss/")}
    return {"steps": trainer.global_step, "world_size": trainer.world_size, "is_global_zero": trainer.is_global_zero,
            "ranks_identical": module.ranks_identical, "last_block_losses": losses}


def run(cfg: Any) -> dict[str, Any]:
    start = time.time()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = run_dir(cfg)
    check_num_samples(cfg.task.num_samples)
    teacher = load_teacher(cfg.model)
    if not cfg.method.quantize:
        return evaluate_fp(cfg, teacher, out, start)
    qcfg = quant_config(cfg, sampler_timesteps(teacher, cfg.sampler))
    dcfg = distill_config(cfg)
    select_blocks(unet_blocks(teacher.unet, dcfg.granularity), list(dcfg.blocks))  # bad input fails before any work
    if str(cfg.method.scaling) not in SCALINGS:
        raise choice_error("method.scaling", cfg.method.scaling, SCALINGS)
    resume = bool(cfg.task.resume)
    if resume and not Path(str(cfg.task.resume)).is_file():
        raise DQError(f"task.resume={cfg.task.resume!r} does not exist; give a checkpoints/last.ckpt of an earlier run")

    calib = load_or_generate(teacher, cfg.sampler, cfg.calib, Path(str(cfg.paths.cache_dir)))
    student, scaling_report = make_student(cfg, teacher, qcfg, calib, resume)
    logger = make_logger(cfg, out, job="quantize")
    try:
        train_info = distill(cfg, teacher, student, calib, out, logger) if cfg.method.bkd else {"steps": 0}
        results: dict[str, Any] = {
            "command": command_line(), "model": teacher.name, "quant": OmegaConf.to_container(cfg.quant),
            "method": OmegaConf.to_container(cfg.method), "sampler": OmegaConf.to_container(cfg.sampler),
            "seed": int(cfg.seed), "bits": f"W{qcfg.w_bits}A{qcfg.a_bits}", "train": train_info,
            "wandb_group": wandb_group(cfg) if cfg.logger.kind == "wandb" else None,
            "weight_dilation": scaling_report,
        }
        if train_info.get("is_global_zero", True):
            save_student(out / "student.pt", student, teacher, qcfg, OmegaConf.to_container(cfg.sampler),
                         OmegaConf.to_container(cfg, resolve=False))
            results["train_seconds"] = time.time() - start
            if cfg.task.evaluate:
                compare = bool(cfg.task.get("compare_fp", True))
                models = {"fp": teacher.unet, "student": student} if compare else {"student": student}
                ev = evaluate_models(cfg, teacher, models, out)
                print(format_table(ev["rows"]))
                if compare:
                    side_by_side_png([out / "samples_fp.png", out / "samples_student.png"],
                                     out / "samples_teacher_vs_student.png")
                results.update(ev)
                log_eval(logger, ev, out, scaling_report, student)
            results["wall_seconds"] = time.time() - start
            results["peak_memory_mb"] = peak_memory_mb()
            write_results(out, results)
        return {"bits": results["bits"], **results.get("summary", {}), "wall_seconds": time.time() - start}
    finally:
        finish_logger(logger)


def evaluate_fp(cfg: Any, teacher: Teacher, out: Path, start: float) -> dict[str, Any]:
    """method=fp: the teacher evaluated exactly like a student would be (the reference row)."""
    ev = evaluate_models(cfg, teacher, {"fp": teacher.unet}, out)
    print(format_table(ev["rows"]))
    write_results(out, {"command": command_line(), "model": teacher.name, "bits": "FP",
                        "method": OmegaConf.to_container(cfg.method), "sampler": OmegaConf.to_container(cfg.sampler),
                        "seed": int(cfg.seed), **ev, "wall_seconds": time.time() - start,
                        "peak_memory_mb": peak_memory_mb()})
    return {"bits": "FP", **ev["summary"], "wall_seconds": time.time() - start}


def log_eval(logger: Any, ev: dict[str, Any], out: Path, scaling_report: list, student: torch.nn.Module) -> None:
    """wandb: metrics, teacher-vs-student sample grid, WD statistics table, final Δ_x tables."""
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
    if scaling_report:
        cols = sorted({k for r in scaling_report for k in r if not isinstance(r[k], (list, dict))})
        rows = [[",".join(r["layers"])] + [r.get(c) for c in cols] for r in scaling_report]
        logger.experiment.log({"weight_dilation/layers": wandb.Table(columns=["layers", *cols], data=rows)},
                              commit=False)
    tables = act_tables(student)
    if tables:
        names = list(tables)
        logger.experiment.log({"tpq/delta_x_final": wandb.plot.line_series(
            xs=list(range(len(tables[names[0]]))), ys=[tables[n].tolist() for n in names], keys=names,
            title="per-step activation step size Δ_x (final)", xname="sampling step")})
