"""Block-wise knowledge distillation (BKD) as a LightningModule.

The frozen full-precision teacher and the quantized student are cut into the same blocks
(``family.blocks``, see dq/models/families/). Blocks are trained one after another in network order — a curriculum whose
position is a pure function of ``global_step`` (block = step // steps_per_block), so a resumed run
needs no extra state. For block k:

    target = teacher blocks 0..k on the teacher chain          (no grad)
    input  = student blocks 0..k-1 (quantized prefix)         (no grad; or the teacher's, as option)
    loss   = mean over the block's outputs of MSE(student block k(input), target)

Only block k's parameters get gradients, and when block k starts the Adam moments of finished
blocks are dropped (they never train again), so training memory is that of one block. Its weights,
Δ_w and per-step activation tables (Δ_x, z_x) train together, each with its own learning rate.

``distill.model_steps=N`` appends one more stage to the curriculum: N steps of the whole student against
the teacher's output (every parameter trains; the loss is the MSE of the denoiser's output). Block-wise
training matches each block on the inputs it is given; this stage corrects what the blocks' small
errors add up to at the output. With ``distill.model_trajectory=student`` its inputs x_t are the student's
own trajectories — sampled by the student when the stage starts, from the calibration set's noise, at the
same (trajectory, step) picks — so it learns to match the teacher where it actually samples, not only
on the teacher's path (measured in docs/w4a4_gap.md). The curriculum is a list of stages (block k or
the whole model, each with its step count), still a pure function of ``global_step``.

The teacher is held outside the module registry: it is not in the checkpoint and DDP never wraps it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from dq.errors import DQError, choice_error
from dq.models.blocks import GRANULARITIES, run_blocks, select_blocks
from dq.distill.prefix_cache import PrefixCache
from dq.models.families import family_of
from dq.quant.prepare import rows_of
from dq.quant.knots import KnotActQuantizer
from dq.quant.quantizers import TemporalActQuantizer, WeightQuantizer, clear_weight_caches

INPUT_MODES = ("student", "teacher")
TRAJECTORIES = ("teacher", "student")


@dataclass
class DistillConfig:
    """The ``distill`` config group (conf/distill/default.yaml): the block-wise distillation protocol."""

    steps_per_block: int = 400
    batch_size: int = 32
    lr_weights: float = 1e-4
    lr_delta_w: float = 1e-3
    lr_act: float = 1e-3
    lr_act_knots: Optional[float] = None  # the knot form's per-step deviations r(t), o(t); None: lr_act
    input: str = field(default="student", metadata={"choices": INPUT_MODES})  # student prefix | teacher chain
    granularity: str = field(default="block", metadata={"choices": GRANULARITIES})
    blocks: List[str] = field(default_factory=list)  # subset of block names to train (empty: all, in order)
    cosine: bool = True                # per-block cosine decay of every learning rate
    ckpt_every: int = 100              # save checkpoints/last.ckpt every N steps
    cache_mb: float = 4096             # memory for the block inputs of the calibration set; 0 = recompute
    cache_disk_mb: float = 0           # beyond cache_mb: memory-mapped files up to this size (same values); 0 = none
    cache_dir: Optional[str] = None    # where those files go (default: the system temp dir); unlinked at once
    stratify_steps: bool = False       # batches spread evenly over the sampler's steps (not uniform draws)
    tpq_smooth: float = 0.0            # λ · Σ roughness of the block's per-step activation curves, added to the loss
    model_steps: int = 0               # a last stage of N steps distilling the whole model's output (0: none)
    model_trajectory: str = field(default="teacher", metadata={"choices": TRAJECTORIES})  # that stage's x_t

    def __post_init__(self) -> None:
        if self.input not in INPUT_MODES:
            raise choice_error("distill.input", self.input, INPUT_MODES)
        if self.granularity not in GRANULARITIES:
            raise choice_error("distill.granularity", self.granularity, GRANULARITIES)
        for name in ("steps_per_block", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise DQError(f"distill.{name}={getattr(self, name)} must be >= 1")
        if self.model_trajectory not in TRAJECTORIES:
            raise choice_error("distill.model_trajectory", self.model_trajectory, TRAJECTORIES)
        if self.model_steps < 0:
            raise DQError(f"distill.model_steps={self.model_steps} must be >= 0 (0: no whole-model stage)")
        if self.model_steps and self.granularity == "model":
            raise DQError(f"distill.model_steps={self.model_steps} adds a whole-model stage after the blocks, but "
                          f"distill.granularity=model already trains the whole model: set distill.model_steps=0 "
                          f"(and distill.steps_per_block for its length) or distill.granularity=block|module")
        if self.tpq_smooth < 0:
            raise DQError(f"distill.tpq_smooth={self.tpq_smooth} must be >= 0 (0: no smoothness penalty)")
        object.__setattr__(self, "blocks", tuple(self.blocks))


def keep_optimizer_state(optimizer: torch.optim.Optimizer, params) -> None:
    """Drop the optimizer state (Adam moments) of every parameter not in ``params``.

    Called when a block starts: finished blocks never get gradients again, so their moments are dead
    weight — up to 2 × the model's size by the last block.
    """
    keep = {id(p) for p in params}
    for p in [p for p in optimizer.state if id(p) not in keep]:
        del optimizer.state[p]


def param_groups(student: nn.Module, cfg: DistillConfig) -> list[dict[str, Any]]:
    """Student parameters split into weights / Δ_w / activation tables, each with its own lr.

    ``lr_delta_w`` and ``lr_act`` are the rates of 4-bit quantizers. Δ scales as 1/(2^b − 1) and Adam's
    steps are absolute, so a quantizer of b bits gets lr · 15 / (2^b − 1): the same relative change of Δ
    at any bit-width (unscaled, an 8-bit Δ moves ~17× too far per step and W8A8 training diverges).
    One group per (kind, bits).
    """
    quant_params: dict[int, tuple[str, int]] = {}
    for m in student.modules():
        if isinstance(m, (TemporalActQuantizer, WeightQuantizer)):
            kind = "act" if isinstance(m, TemporalActQuantizer) else "delta_w"
            quant_params.update({id(p): (kind, m.bits) for p in m.parameters()})
        if isinstance(m, KnotActQuantizer) and cfg.lr_act_knots is not None:
            quant_params.update({id(p): ("act_knots", m.bits) for p in (m.log_scale, m.zp_offset)})
    groups: dict[tuple[str, int], list[nn.Parameter]] = {}
    for p in student.parameters():
        if not p.requires_grad:  # frozen by the method (e.g. EfficientDM's base weights)
            continue
        groups.setdefault(quant_params.get(id(p), ("weights", 0)), []).append(p)
    base = {"weights": cfg.lr_weights, "delta_w": cfg.lr_delta_w, "act": cfg.lr_act, "act_knots": cfg.lr_act_knots}
    out = []
    for (kind, bits), ps in sorted(groups.items()):
        lr = base[kind] if kind == "weights" else base[kind] * 15 / (2 ** bits - 1)
        out.append({"params": ps, "lr": lr, "base_lr": lr, "name": kind if kind == "weights" else f"{kind}_{bits}bit"})
    return out


class BlockDistiller(L.LightningModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig,
                 inputs: dict[str, torch.Tensor] | None = None,
                 resample: Callable[[nn.Module], torch.Tensor] | None = None) -> None:
        """``inputs``: the whole calibration set ({"x", "t"(, "cond")}); batches then carry "idx" into it,
        and the block inputs are cached (``cfg.cache_mb``) instead of recomputed every step.
        ``resample(student)``: the calibration set's x_t on the student's own trajectories (same noise, same
        picks, index for index); needed by ``model_trajectory=student``."""
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.student = student
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.family = family_of(student)
        self.student_blocks = self.family.blocks(student, cfg.granularity)
        self.teacher_blocks = self.family.blocks(teacher, cfg.granularity)
        self.schedule = select_blocks(self.student_blocks, list(cfg.blocks))
        # The curriculum: one stage per scheduled block, then (model_steps) the whole model. A stage is an
        # index into student_blocks; MODEL (one past the last block) stands for the whole-model stage.
        self.MODEL = len(self.student_blocks)
        self.stages = list(self.schedule) + ([self.MODEL] if cfg.model_steps else [])
        self.stage_lengths = [cfg.steps_per_block] * len(self.schedule) + ([cfg.model_steps] if cfg.model_steps else [])
        self.stage_starts = [sum(self.stage_lengths[:i]) for i in range(len(self.stages))]
        self.model_pair = ((self.family.blocks(student, "model")[0], self.family.blocks(teacher, "model")[0])
                           if cfg.model_steps else None)
        if cfg.model_steps and cfg.model_trajectory == "student" and resample is None:
            raise DQError("distill.model_trajectory=student needs the run's sampler to resample the student's "
                          "trajectories (BlockDistiller(resample=...)); dq.distill.fit passes it")
        self.resample = resample
        self.input_shape = None if inputs is None else tuple(inputs["x"].shape)
        self.trajectory_x: torch.Tensor | None = None  # the student's x_t, set when the model stage starts
        self.ranks_identical: bool | None = None
        self.cache = None if inputs is None else PrefixCache(
            inputs, self.family.initial_state, student, self.student_blocks, self.teacher_blocks,
            teacher_input=cfg.input == "teacher", budget_mb=cfg.cache_mb, disk_mb=cfg.cache_disk_mb,
            spill_dir=cfg.cache_dir)

    # ---------------------------------------------------------------- curriculum (pure in global_step)
    @property
    def total_steps(self) -> int:
        return sum(self.stage_lengths)

    def _stage(self, step: int) -> int:
        """Position in the curriculum of the stage that trains at optimisation step ``step``."""
        return min(max(bisect.bisect_right(self.stage_starts, step) - 1, 0), len(self.stages) - 1)

    def block_index(self, step: int) -> int:
        """Index into the model's blocks trained at optimisation step ``step`` (``MODEL``: the whole model)."""
        return self.stages[self._stage(step)]

    def block_name(self, step: int) -> str:
        """Name of the block trained at optimisation step ``step`` ("model" in the whole-model stage)."""
        k = self.block_index(step)
        return "model" if k == self.MODEL else self.student_blocks[k].name

    def block_position(self, step: int) -> tuple[int, int, int]:
        """(position of step's stage in the curriculum from 0, number of stages, steps done in it before ``step``)."""
        pos = self._stage(step)
        return pos, len(self.stages), step - self.stage_starts[pos]

    def stage_length(self, step: int) -> int:
        """Optimisation steps of the stage that trains at ``step``."""
        return self.stage_lengths[self._stage(step)]

    def block_ends_at(self, step: int) -> bool:
        """Whether a stage's last optimisation step is ``step - 1`` (``step`` steps taken so far)."""
        return step > 0 and (step in self.stage_starts or step == self.total_steps)

    def lr_factor(self, step: int) -> float:
        if not self.cfg.cosine:
            return 1.0
        pos, _, done = self.block_position(step)
        return 0.5 * (1.0 + math.cos(math.pi * done / self.stage_lengths[pos]))

    def stage_parameters(self, k: int):
        """The parameters stage ``k`` trains (a block's, or the whole student's)."""
        return self.student.parameters() if k == self.MODEL else self.student_blocks[k].parameters()

    # ------------------------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def configure_optimizers(self):
        return torch.optim.Adam(param_groups(self.student, self.cfg))

    def block_loss(self, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        state = self.family.initial_state(batch["x"], batch["t"], batch.get("cond"))
        step_index = self.student.dq_step_index
        rows = rows_of(self.student, batch["t"])
        if k == self.MODEL:  # the whole-model stage: the denoiser's output against the teacher's
            student_model, teacher_model = self.model_pair
            if self.cfg.model_trajectory == "student":
                x = self.trajectory_x[batch["idx"].cpu()].to(batch["x"])
                state = self.family.initial_state(x, batch["t"], batch.get("cond"))
            with torch.no_grad():
                target = teacher_model(state).new
            with step_index.use(rows):
                out = student_model(state).new
            return self._loss(out, target, [self.student])
        cached = None if self.cache is None or k == 0 else self.cache.inputs_of(k, batch["idx"], batch["x"].device)
        with torch.no_grad():
            if cached is not None:  # prefixes (and targets) from the cache: no teacher work per step
                inp = cached["input"]
                target = cached["target"] if cached["target"] is not None else self.teacher_blocks[k](inp).new
            else:
                target = run_blocks(self.teacher_blocks, state, k).new
                if k == 0:
                    inp = state
                elif self.cfg.input == "teacher":
                    inp = run_blocks(self.teacher_blocks, state, k - 1)
                else:
                    with step_index.use(rows):
                        inp = run_blocks(self.student_blocks, state, k - 1)
            inp = inp.detach()
        with step_index.use(rows):
            out = self.student_blocks[k](inp).new
        return self._loss(out, target, self.student_blocks[k].modules)

    def _loss(self, out, target, modules: list[nn.Module]) -> torch.Tensor:
        """Mean MSE over the outputs, plus the smoothness penalty on the per-step tables in ``modules``."""
        loss = sum(F.mse_loss(o, t) for o, t in zip(out, target)) / len(out)
        if self.cfg.tpq_smooth:
            loss = loss + self.cfg.tpq_smooth * sum(q.roughness() for m in modules
                                                    for q in m.modules() if isinstance(q, TemporalActQuantizer))
        return loss

    @torch.no_grad()
    def student_trajectories(self) -> torch.Tensor:
        """The calibration inputs' x_t as the student samples them now (kept in the checkpoint: a resumed
        run trains on exactly these, not on trajectories of a student that trained on)."""
        was_training = self.student.training
        self.student.eval()
        try:
            x = self.resample(self.student).cpu()
        finally:
            self.student.train(was_training)
        if self.input_shape is not None and tuple(x.shape) != self.input_shape:
            raise DQError(f"resampled student trajectories have shape {tuple(x.shape)}, the calibration set "
                          f"{self.input_shape}: resample must follow the calibration set's picks")
        return x

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trajectory_x is not None:
            checkpoint["dq_student_trajectory_x"] = self.trajectory_x

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.trajectory_x = checkpoint.get("dq_student_trajectory_x")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        k = self.block_index(step)
        name = self.block_name(step)
        opt = self.optimizers()
        if step in self.stage_starts:  # a stage starts (also right after a resume at a boundary)
            keep_optimizer_state(opt.optimizer, self.stage_parameters(k))
            clear_weight_caches(self.student)  # the finished blocks' fake-quant weight copies (prefix passes)
        if k == self.MODEL and self.cfg.model_trajectory == "student" and self.trajectory_x is None:
            self.trajectory_x = self.student_trajectories()
        factor = self.lr_factor(step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        loss = self.block_loss(batch, k)
        if not torch.isfinite(loss):
            raise DQError(f"non-finite distillation loss ({loss.item()}) in block {name!r} at step {step}; "
                          f"lower the learning rates (distill.lr_*)")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.log(f"distill/loss/{name}", loss, prog_bar=False)
        self.log("distill/loss", loss, prog_bar=True)
        self.log("distill/block", float(k))
        for g in opt.param_groups:
            self.log(f"lr/{g['name']}", g["lr"])
        return loss
