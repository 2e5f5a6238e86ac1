"""Callbacks of the distillation run: a progress bar per block and the wandb quantization dashboard."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from dq.console import progress

from dq.quant.quantizers import TemporalActQuantizer


class BlockProgressBar(L.Callback):
    """One progress bar per curriculum block ("block down.1 (3/9)") showing that block's loss — one line
    per block when the output is not a terminal. ``seconds`` records each block's wall time."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.block: int | None = None
        self.name: str | None = None
        self.started = 0.0
        self.seconds: dict[str, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the step just taken
        k = module.block_index(step)
        if k != self.block:
            self._close()
            pos, total, done = module.block_position(step)
            self.bar = progress(total=module.stage_length(step), initial=done, unit="steps",
                                desc=f"block {module.block_name(step)} ({pos + 1}/{total})")
            self.block, self.name, self.started = k, module.block_name(step), time.time()
        self.bar.update(1)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.bar.set_postfix(loss=f"{float(loss):.3g}", refresh=False)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.seconds[self.name] = self.seconds.get(self.name, 0.0) + time.time() - self.started

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, module: Any, exception: BaseException) -> None:
        self._close()


def act_tables(student: torch.nn.Module, limit: int = 4) -> dict[str, torch.Tensor]:
    """Δ_x per step ([T], head-averaged) of up to ``limit`` per-step activation quantizers, spread over the net."""
    qs = [(n, q) for n, q in student.named_modules() if isinstance(q, TemporalActQuantizer) and q.delta.shape[0] > 1]
    if not qs:
        return {}
    pick = [qs[round(i * (len(qs) - 1) / max(1, limit - 1))] for i in range(min(limit, len(qs)))]
    return {n: q.delta.detach().float().reshape(q.delta.shape[0], -1).mean(1).cpu() for n, q in pick}


class QuantDashboard(L.Callback):
    """wandb: at the end of each block, a line plot of the per-step Δ_x of a few layers."""

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not module.block_ends_at(step) or not is_wandb(trainer.logger):
            return
        import wandb

        tables = act_tables(module.student)
        if not tables:
            return
        names = list(tables)
        block = module.block_name(step - 1)
        steps = list(range(len(next(iter(tables.values())))))
        trainer.logger.experiment.log({f"tpq/delta_x_after_{block}": wandb.plot.line_series(
            xs=steps, ys=[tables[n].tolist() for n in names], keys=names,
            title=f"per-step activation step size Δ_x after block {block}", xname="sampling step")},
            commit=False)


def is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


class RankConsistency(L.Callback):
    """At the end of fit, checks that every DDP rank holds the same student (per-tensor float64 sums,
    all-gathered); records ``module.ranks_identical`` and raises if they differ."""

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        sums = torch.stack([t.detach().double().sum() for t in module.student.state_dict().values()
                            if t.is_floating_point()])
        gathered = trainer.strategy.all_gather(sums.to(module.device)) if trainer.world_size > 1 else sums[None]
        gathered = gathered.reshape(trainer.world_size, -1)
        module.ranks_identical = bool((gathered == gathered[0]).all())
        if not module.ranks_identical:
            raise RuntimeError("DDP ranks ended with different students; gradients were not synchronised")


class PeriodicCheckpoint(L.Callback):
    """``<dirpath>/last.ckpt`` every ``every`` optimisation steps, at the end of fit and when fit stops on
    an exception (Ctrl-C included): resume with ``task.resume=<that file>``.

    dq's distillation uses manual optimisation and its state is a pure function of ``global_step``, so
    the state after the optimizer step is exactly what a resume needs. (Lightning's ModelCheckpoint warns
    on every manual-optimisation save that it cannot save a pre-step state; that does not apply here.)
    Written to a temporary name and renamed, so a crash mid-save never leaves a truncated last.ckpt.
    """

    def __init__(self, dirpath: str | Path, every: int) -> None:
        self.dirpath, self.every = Path(dirpath), every

    def save(self, trainer: L.Trainer) -> None:
        final = self.dirpath / "last.ckpt"
        tmp = self.dirpath / "last.ckpt.tmp"
        trainer.save_checkpoint(tmp)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, final)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self.save(trainer)

    def on_exception(self, trainer: L.Trainer, module: Any, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1:
            self.save(trainer)
