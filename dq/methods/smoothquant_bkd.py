"""SmoothQuant α-scaling instead of Weight Dilation, with per-step tables and block-wise distillation:
the baseline that isolates what WD's "keep every weight range" buys over SmoothQuant's balancing."""
from dataclasses import dataclass, field

from dq.errors import DQError
from dq.methods import register
from dq.methods.base import Job, Student, check_calib_method
from dq.models.student import smoothquant
from dq.quant.quantizers import CALIBRATION_METHODS


@dataclass
class SmoothQuantBKDConfig:
    name: str = "smoothquant_bkd"
    alpha: float = 0.5             # migration strength: s = max|X|^α / max|W|^(1−α)
    shared_tables: bool = False
    calib_method: str = field(default="percentile", metadata={"choices": CALIBRATION_METHODS})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise DQError(f"method.alpha={self.alpha} must be in [0, 1]")
        check_calib_method(self.calib_method)


@register(SmoothQuantBKDConfig)
def run(job: Job, cfg: SmoothQuantBKDConfig) -> Student:
    student, qcfg = job.prepare(cfg.shared_tables)
    scaling: list[dict] = []
    if not job.resume:
        scaling = smoothquant(student, job.batches(), cfg.alpha)
        job.calibrate(student, cfg.calib_method)
    return Student(student, qcfg, job.fit(student, job.distill), scaling)
