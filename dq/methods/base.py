"""What every method gets (a :class:`Job`) and returns (a :class:`Student`), and the steps they share.

A method file reads top to bottom as its recipe, e.g. DilateQuant:

    student, qcfg = job.prepare(shared_tables=False)          # fake-quant copy of the teacher
    scaling = weight_dilation(student, job.batches())          # WD (dq.models.student)
    job.calibrate(student, "percentile")                       # per-step activation tables
    train = job.fit(student, job.distill)                      # block-wise distillation
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dq.data.calibration import CalibrationSet
from dq.distill.bkd import DistillConfig
from dq.models.load import DiffusionModel
from dq.models.student import calibrate, prepare, shortcut_branch
from dq.errors import DQError, choice_error
from dq.quant.config import LowRank, QuantConfig, QuantSpec
from dq.quant.lowrank import lowrank_summary, svd_init
from dq.quant.quantizers import CALIBRATION_METHODS

log = logging.getLogger("dq")


def check_calib_method(value: str) -> str:
    """``method.calib_method`` must name an activation-table rule (minmax | percentile | mse)."""
    if value not in CALIBRATION_METHODS:
        raise choice_error("method.calib_method", value, CALIBRATION_METHODS)
    return value


@dataclass
class Student:
    """A method's result. ``model`` None: the method evaluates the teacher itself (the FP reference)."""

    model: torch.nn.Module | None
    qcfg: QuantConfig | None = None
    train: dict[str, Any] = field(default_factory=lambda: {"steps": 0})
    scaling: list[dict] = field(default_factory=list)   # per layer group: what WD / SmoothQuant did
    notes: list[str] = field(default_factory=list)      # defaults a method applied by design (results.json)


@dataclass
class Job:
    """The run a method works in: the teacher, the bit settings, the distillation protocol, the data.

    ``calibration()`` builds (or reads from the cache) the teacher's calibration trajectories the first
    time it is called; ``fit(student, dcfg)`` runs block-wise distillation with the run's trainer,
    logger, checkpoints and callbacks. ``resume``: a checkpoint will restore the student's trained
    state, so scaling and calibration must be skipped (the checkpoint holds their result).
    """

    teacher: DiffusionModel
    quant: QuantSpec
    distill: DistillConfig
    timesteps: list[int]
    calibration: Callable[[], CalibrationSet]
    fit: Callable[[torch.nn.Module, DistillConfig], dict[str, Any]]
    act_init_samples: int = 1024
    resume: bool = False
    notes: list[str] = field(default_factory=list)  # what was filled in by rule on the way (results.json)

    def quant_config(self, shared_tables: bool, tpq_knots: int = 0, lowrank: LowRank = LowRank()) -> QuantConfig:
        """``lowrank``: the method's own low-rank branch, used where ``quant.lowrank_rank`` is unset."""
        steps = len(self.timesteps)
        if tpq_knots > steps and not shared_tables and steps:  # the default K on a short schedule
            self.note(f"method.tpq_knots={tpq_knots} > the sampler's {steps} steps: one knot per step (K={steps}), "
                      f"the per-step table's expressiveness in the knot form")
            tpq_knots = steps
        try:
            chosen = self.quant.resolve_lowrank(lowrank)
            if self.quant.lowrank_rank is None and chosen.rank:  # the method's own choice, not the user's
                chosen = self._method_branch(chosen)
            return QuantConfig.from_spec(self.quant, self.timesteps, shared_tables, tpq_knots, chosen)
        except ValueError as e:
            raise DQError(str(e)) from None

    def _method_branch(self, chosen: LowRank) -> LowRank:
        """A method's own branch (quant.lowrank_rank unset), noted; none where its scope names no layer of
        this model that the rank fits (skip_shortcuts on a model without skip concatenations, e.g. a DiT, or
        too narrow for it) — by design, where the user asked for nothing."""
        model = self.teacher.denoiser
        if shortcut_branch(model, chosen) is None:
            why = "shortcuts too narrow" if self.teacher.family.skip_shortcuts(model) else "no skip concatenation"
            self.note(f"quant.lowrank_rank unset: the method's low-rank branch (rank {chosen.rank} on "
                      f"skip_shortcuts) fits no layer of this {type(model).__name__} ({why}): none built")
            return LowRank()
        self.note(f"quant.lowrank_rank unset: the method's own low-rank branch, rank {chosen.rank} on "
                  f"{chosen.scope} (quant.lowrank_rank=0 for none)")
        return chosen

    def note(self, text: str) -> None:
        """Log a default filled in by rule once, and keep it for results.json."""
        if text not in self.notes:
            log.info(text)
            self.notes.append(text)

    def prepare(self, shared_tables: bool, tpq_knots: int = 0,
                lowrank: LowRank = LowRank()) -> tuple[torch.nn.Module, QuantConfig]:
        """A fake-quantized, trainable copy of the teacher's denoiser (min–max Δ_w; activation tables not
        yet set). Every parameter requires grad; a method freezes what it does not train. ``tpq_knots``:
        0 = per-step tables, K = the continuous knot form (dq.quant.knots). ``lowrank``: the method's own
        low-rank branch (DilateQuant's, SVDQuant's), used where ``quant.lowrank_rank`` is unset."""
        qcfg = self.quant_config(shared_tables, tpq_knots, lowrank)
        return prepare(copy.deepcopy(self.teacher.denoiser), qcfg).requires_grad_(True), qcfg

    def calibrate(self, student: torch.nn.Module, method: str, pooled: bool = False) -> None:
        """Initialise the activation tables from the first ``act_init_samples`` calibration inputs
        (``pooled``: every step's row from all steps' statistics); what had to be filled in by rule
        (steps never seen, quantizers never run) goes to ``notes``. A student with low-rank branches
        (``qcfg.lowrank_rank``) first gets them from its weights' SVD — after any scaling, which every method
        applies before calibrating — so the tables are calibrated on the branched layers."""
        if svd_init(student):
            log.info("low-rank branches: %s", lowrank_summary(student))
        self.notes += calibrate(student, self.batches(), method, pooled=pooled).notes()

    def batches(self) -> list[tuple]:
        """The first ``act_init_samples`` calibration inputs as (x_t, raw_t, cond) batches."""
        return self.calibration().batches(self.act_init_samples, device=self.teacher.device)
