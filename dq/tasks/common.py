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
from omegaconf import DictConfig, OmegaConf

from dq.errors import DQError, choice_error

log = logging.getLogger("dq")
TASKS = ("quantize", "evaluate", "pretrain", "classifier")


def run_dir(cfg: Any) -> Path:
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_line() -> str:
    """The command that started this process, as a user would retype it."""
    args = " ".join(sys.argv[1:])
    return f"python {Path(sys.argv[0]).name} {args}".strip()


def make_trainer(cfg: Any, **overrides: Any) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def make_logger(cfg: Any, out: Path, job: str):
    """A Lightning logger from the ``logger`` group: wandb (offline by default), csv or none."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(out), name=job)
    if kind == "wandb":
        os.environ.setdefault("WANDB_SILENT", "true")
        from lightning.pytorch.loggers import WandbLogger

        lc = cfg.logger
        return WandbLogger(save_dir=str(out), project=lc.project, group=wandb_group(cfg),
                           name=lc.get("name") or f"{job}-{out.name}", mode=lc.mode, job_type=job,
                           tags=list(lc.get("tags") or []),
                           config=OmegaConf.to_container(cfg, resolve=False))
    raise choice_error("logger.kind", kind, ["wandb", "csv", "none"])


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def wandb_group(cfg: Any) -> str | None:
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
    results = {"overrides": job_overrides(), **results}
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    return path


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Entry point body shared by train.py and eval.py: dispatch to ``dq.tasks.<task>.run(cfg)``.

    A ``DQError`` (bad user input) prints as one line and exits with status 2. In a multirun any
    failure is logged with its traceback and the sweep goes on to the next job.
    """
    name = cfg.task.name
    try:
        if name not in TASKS:
            raise choice_error("task", name, TASKS)
        task: Callable[[Any], dict[str, Any]] = importlib.import_module(f"dq.tasks.{name}").run
        return task(cfg)
    except Exception as e:
        if is_multirun():
            log.exception("job failed, the sweep goes on: %s", e)
            return None
        if isinstance(e, DQError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
