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
        return WandbLogger(save_dir=str(out), project=lc.project, group=lc.get("group") or None,
                           name=lc.get("name") or f"{job}-{out.name}", mode=lc.mode, job_type=job,
                           tags=list(lc.get("tags") or []),
                           config=OmegaConf.to_container(cfg, resolve=False))
    raise choice_error("logger.kind", kind, ["wandb", "csv", "none"])


def finish_logger(logger: Any) -> None:
    """Close a wandb run so the next job of a multirun starts a fresh one, even after a failure."""
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()


def write_results(out: Path, results: dict[str, Any]) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    return path


def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Entry point body shared by train.py and eval.py: dispatch to ``dq.tasks.<task>.run(cfg)``.

    A ``DQError`` (bad user input) prints as one line and exits with status 2; in a multirun it is
    logged and the sweep goes on to the next job.
    """
    name = cfg.task.name
    try:
        if name not in TASKS:
            raise choice_error("task", name, TASKS)
        task: Callable[[Any], dict[str, Any]] = importlib.import_module(f"dq.tasks.{name}").run
        return task(cfg)
    except DQError as e:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("job failed: %s", e)
            return None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
