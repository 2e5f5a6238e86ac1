"""Shared plumbing of the tasks: run directory, trainer, logger, the entry-point wrapper."""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dq import allocator, machine
from dq.config import LoggerConfig, typed
from dq.evaluation import Protocol
from dq.errors import DQError, choice_error
from dq.tasks import TASK_CONFIGS

log = logging.getLogger("dq")
TASKS = tuple(TASK_CONFIGS)


def run_dir(cfg: DictConfig) -> Path:
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_line() -> str:
    """The command that started this process, as a user would retype it."""
    args = " ".join(sys.argv[1:])
    return f"python {Path(sys.argv[0]).name} {args}".strip()


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The ``trainer`` group (validated) as lightning.Trainer keyword arguments."""
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(typed(cfg, "trainer")).items() if v is not None}


def run_device(cfg: DictConfig) -> torch.device:
    """The device this process's trainer uses (so the teacher, its VAE and text encoder follow it):
    cuda:<local rank> for trainer.accelerator=gpu/cuda (or auto with CUDA present), mps, else cpu."""
    acc = str(cfg.trainer.accelerator)
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DQError(f"trainer.accelerator={acc} but no CUDA device is visible; use trainer.accelerator=cpu")
        d, local = cfg.trainer.devices, int(os.environ.get("LOCAL_RANK", 0))
        ids = [int(i) for i in d] if OmegaConf.is_list(d) or isinstance(d, (list, tuple)) else \
            [int(i) for i in d.split(",") if i.strip()] if isinstance(d, str) and d != "auto" else []
        return torch.device("cuda", ids[local] if local < len(ids) else local)  # an int N: the first N GPUs
    if acc == "mps" or (acc == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def load_teacher(cfg: DictConfig) -> Any:
    """The ``model`` group's model with the ``data.prompts`` it is sampled with (text-conditional
    pipelines), on the run's device."""
    from dq.models.conditioning import with_prompts
    from dq.models.load import load_model

    teacher = with_prompts(load_model(typed(cfg, "model")), cfg.data.get("prompts"))
    return teacher.to(run_device(cfg))


def make_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    return L.Trainer(**{**trainer_kwargs(cfg), **overrides})


def make_logger(cfg: DictConfig, out: Path, job: str):
    """A Lightning logger from the ``logger`` group: wandb (offline by default), csv or none."""
    lc: LoggerConfig = typed(cfg, "logger")
    if lc.kind == "none":
        return False
    if lc.kind == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(out), name=job)
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(out), project=lc.project, group=wandb_group(cfg),
                         name=lc.name or f"{job}-{out.name}", mode=lc.mode, job_type=job, tags=list(lc.tags),
                         config=OmegaConf.to_container(cfg, resolve=False))
    logger._wandb_init.pop("anonymous", None)  # Lightning always passes anonymous=None; wandb warns on it
    return logger


def protocol(cfg: DictConfig, sampler: Any = None) -> Protocol:
    """The evaluation protocol of a run (task group + sampler, metrics, data, cache)."""
    t = cfg.task
    return Protocol(sampler=sampler or typed(cfg, "sampler"), metrics=typed(cfg, "metrics"), data=typed(cfg, "data"),
                    cache_dir=str(cfg.paths.cache_dir), num_samples=t.num_samples, batch_size=t.batch_size,
                    seed=int(cfg.seed), seeds=int(t.get("seeds", 1)), floor=bool(t.floor), grid=int(t.grid),
                    guidance_scale=float(t.get("guidance_scale", 1.0)))


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def wandb_group(cfg: DictConfig) -> str | None:
    """logger.group, or for a hydra multirun the sweep's directory name, so one sweep = one group."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if is_multirun():
        from hydra.core.hydra_config import HydraConfig

        return f"{cfg.task.name}-{Path(HydraConfig.get().sweep.dir).name}"
    return None


def finish_logger(logger: Any) -> None:
    """Close a wandb run so the next job of a multirun starts a fresh one, even after a failure."""
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()


def job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """results.json, written to a temporary name and renamed (never half-written)."""
    results = {"overrides": job_overrides(), **results, "allocator": allocator.STATE, "machine": machine.describe(),
               "code": machine.code_version()}
    path = out / "results.json"
    tmp = out / f"results.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2, default=float))
    tmp.replace(path)
    return path


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Entry point body shared by train.py and eval.py: dispatch to ``dq.tasks.<task>.run(cfg)``.

    A ``DQError`` (bad user input) prints as one line and exits with status 2. In a multirun any
    failure is logged with its traceback and the sweep goes on to the next job.
    """
    from dq import console

    console.configure()
    state = allocator.tune()  # a no-op when dq.cli.run already applied it
    log.info("memory allocator: %s%s", state["reason"], f" {state['settings']}" if state.get("settings") else "")
    name = cfg.task.name
    try:
        if name not in TASKS:
            raise choice_error("task", name, TASKS)
        task: Callable[[DictConfig], dict[str, Any]] = importlib.import_module(f"dq.tasks.{name}").run
        return task(cfg)
    except Exception as e:
        if is_multirun():
            log.exception("job failed, the sweep goes on: %s", e)
            return None
        if isinstance(e, DQError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
