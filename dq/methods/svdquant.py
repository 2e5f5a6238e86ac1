"""SVDQuant (Li et al., ICLR 2025) on dq's grid: smoothing migrates activation outliers into the weights,
an SVD low-rank branch kept in float absorbs the weights' outliers, and only the residual is quantized.
Post-training, as published: no training.

What differs from the paper, because dq's runtime and the other methods of the comparison share one grid:
activations are quantized per tensor with static, calibrated steps (the paper: per group of 64 channels,
scales computed at run time) and weights per output channel (the paper: per group); the smoothing
strength α is one value for every layer (the paper's code searches it per layer).
"""
from dataclasses import dataclass, field

from dq.errors import DQError
from dq.methods import register
from dq.methods.base import Job, Student, check_calib_method
from dq.models.student import smoothquant
from dq.quant.config import LowRank, check_rank
from dq.quant.quantizers import CALIBRATION_METHODS


@dataclass
class SVDQuantConfig:
    name: str = "svdquant"
    alpha: float = 0.5             # smoothing strength: s = max|X|^α / max|W|^(1−α)
    rank: int = 16                 # rank of the float branch (the paper: 16–32 on 3,072-wide layers)
    per_step_tables: bool = False  # true: per-step activation tables (TPQ) instead of one per layer
    calib_method: str = field(default="percentile", metadata={"choices": CALIBRATION_METHODS})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise DQError(f"method.alpha={self.alpha} must be in [0, 1]")
        try:
            if check_rank(self.rank, "method.rank") == 0:
                raise ValueError("method.rank=0: SVDQuant needs its low-rank branch; give a rank ≥ 1")
        except ValueError as e:
            raise DQError(str(e)) from None
        check_calib_method(self.calib_method)


@register(SVDQuantConfig)
def run(job: Job, cfg: SVDQuantConfig) -> Student:
    student, qcfg = job.prepare(shared_tables=not cfg.per_step_tables, lowrank=LowRank(cfg.rank, "all"))
    if not qcfg.lowrank_rank:
        raise DQError("quant.lowrank_rank=0: SVDQuant needs its low-rank branch; leave quant.lowrank_rank unset "
                      "(method.rank sets it)")
    scaling = smoothquant(student, job.batches(), cfg.alpha)
    job.calibrate(student, cfg.calib_method)  # splits the smoothed weights by their SVD first (Job.calibrate)
    return Student(student, qcfg, scaling=scaling)
