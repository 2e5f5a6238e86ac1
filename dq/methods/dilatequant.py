"""DilateQuant (arXiv 2409.14307): Weight Dilation + Temporal Parallel Quantizer + block-wise distillation,
plus (dq's addition, not the paper's) SVDQuant's float low-rank branch on a UNet's skip-shortcut layers.

The ablations are switches of this one recipe (conf/method/dilatequant_no_{wd,tpq,bkd}.yaml); the paper's
per-step table is conf/method/dilatequant_table.yaml, the default TPQ form is measured in docs/tpq.md.
"""
from dataclasses import dataclass, field

from dq.methods import register
from dq.errors import choice_error
from dq.methods.base import Job, Student, check_calib_method
from dq.models.student import weight_dilation
from dq.quant.config import LowRank
from dq.quant.quantizers import CALIBRATION_METHODS


TPQ_INITS = ("per_step", "pooled")  # each step's row from its own calibration inputs | from all steps'
# SVDQuant's float low-rank branch on the layers that read a raw skip concatenation (a UNet's up-path 1x1
# shortcuts), where the W4A4 error sits: it lowered FID in each of 3 paired seeds on the embedded teacher for
# 15k float parameters (docs/w4a4_gap.md). quant.lowrank_rank / lowrank_scope override it; 0 = none.
BRANCH = LowRank(16, "skip_shortcuts")


@dataclass
class DilateQuantConfig:
    name: str = "dilatequant"
    weight_dilation: bool = True   # false: no scaling (ablation no_wd)
    shared_tables: bool = False    # true: one activation table for all steps (ablation no_tpq)
    bkd: bool = True               # false: post-training only (ablation no_bkd)
    tpq_knots: int = 4             # 0: the paper's per-step table; K: Δ(t) continuous over K knots in raw t
    calib_method: str = field(default="percentile", metadata={"choices": CALIBRATION_METHODS})
    tpq_init: str = field(default="pooled", metadata={"choices": TPQ_INITS})  # pooled: every step starts shared

    def __post_init__(self) -> None:
        check_calib_method(self.calib_method)
        if self.tpq_init not in TPQ_INITS:
            raise choice_error("method.tpq_init", self.tpq_init, TPQ_INITS)


@register(DilateQuantConfig)
def run(job: Job, cfg: DilateQuantConfig) -> Student:
    student, qcfg = job.prepare(cfg.shared_tables, 0 if cfg.shared_tables else cfg.tpq_knots, BRANCH)
    scaling: list[dict] = []
    if not job.resume:  # a resumed run's checkpoint already holds the scaled, calibrated student
        if cfg.weight_dilation:
            scaling = weight_dilation(student, job.batches())
        job.calibrate(student, cfg.calib_method, pooled=cfg.tpq_init == "pooled")
    train = job.fit(student, job.distill) if cfg.bkd else {"steps": 0}
    return Student(student, qcfg, train, scaling)
