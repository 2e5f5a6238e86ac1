"""Run block-wise distillation with a Lightning Trainer: checkpoints, progress, DDP, resume."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from dq.data.calibration import CalibrationDataModule, CalibrationSet
from dq.distill.bkd import BlockDistiller, DistillConfig
from dq.distill.callbacks import BlockProgressBar, PeriodicCheckpoint, QuantDashboard, RankConsistency, is_wandb


@dataclass
class FitRun:
    """What a fit needs from the run around it."""

    out: Path                                   # checkpoints go to out/checkpoints
    seed: int = 0
    trainer: dict[str, Any] = field(default_factory=dict)  # the ``trainer`` config group, as Trainer kwargs
    logger: Any = False
    callbacks: list[L.Callback] = field(default_factory=list)
    resume: str | None = None                   # a checkpoints/last.ckpt to continue from
    resample: Callable[[torch.nn.Module], torch.Tensor] | None = None  # student → calib x_t on its trajectories


def fit(student: torch.nn.Module, teacher: torch.nn.Module, calib: CalibrationSet, dcfg: DistillConfig,
        run: FitRun) -> dict[str, Any]:
    """Distil ``student`` from ``teacher`` on ``calib`` (in place); returns what results.json records."""
    student.train()  # which parameters train is the method's choice (requires_grad)
    inputs = {"x": calib.x, "t": calib.t, **({"cond": calib.cond} if calib.cond is not None else {})}
    module = BlockDistiller(student, teacher, dcfg, inputs=inputs, resample=run.resample)
    dm = CalibrationDataModule(calib, dcfg.batch_size, module.total_steps, run.seed, dcfg.stratify_steps)
    bar = BlockProgressBar()
    callbacks = [PeriodicCheckpoint(run.out / "checkpoints", dcfg.ckpt_every), bar, RankConsistency(), *run.callbacks]
    if is_wandb(run.logger):
        callbacks.append(QuantDashboard())
    # use_distributed_sampler=False: StepSeededBatches already gives each rank its own slice.
    trainer = L.Trainer(**{**run.trainer, "max_steps": module.total_steps, "logger": run.logger,
                           "callbacks": callbacks, "use_distributed_sampler": False, "enable_checkpointing": False,
                           "enable_progress_bar": False, "default_root_dir": str(run.out)})
    trainer.fit(module, datamodule=dm, ckpt_path=run.resume, weights_only=True)  # never unpickle code
    student.eval().requires_grad_(False)
    history = [h for cb in run.callbacks for h in getattr(cb, "history", [])]
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("distill/loss/")}
    return {"steps": trainer.global_step, "world_size": trainer.world_size, "is_global_zero": trainer.is_global_zero,
            "ranks_identical": module.ranks_identical, "last_block_losses": losses, "block_seconds": bar.seconds,
            **({"fid_history": history} if history else {})}
