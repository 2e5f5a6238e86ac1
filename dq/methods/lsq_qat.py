"""Full-model QAT with LSQ step sizes: the whole student against the teacher's output (no blocks), no
scaling, one activation table for all steps — the paper's costly baseline, through the same code.

Its default budget is the BKD total on the 9-block digits UNet (9 × 400 steps)."""
import dataclasses
from dataclasses import dataclass, field

from dq.errors import DQError
from dq.methods import register
from dq.methods.base import Job, Student, check_calib_method
from dq.quant.quantizers import CALIBRATION_METHODS


@dataclass
class LSQQATConfig:
    name: str = "lsq_qat"
    steps: int = 3600              # optimisation steps of the whole model
    shared_tables: bool = True
    calib_method: str = field(default="percentile", metadata={"choices": CALIBRATION_METHODS})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise DQError(f"method.steps={self.steps} must be >= 1")
        check_calib_method(self.calib_method)


@register(LSQQATConfig)
def run(job: Job, cfg: LSQQATConfig) -> Student:
    student, qcfg = job.prepare(cfg.shared_tables)
    if not job.resume:
        job.calibrate(student, cfg.calib_method)
    dcfg = dataclasses.replace(job.distill, granularity="model", steps_per_block=cfg.steps, blocks=(), model_steps=0)
    note = (f"lsq_qat trains the whole model for method.steps={cfg.steps} steps (distill.granularity and "
            f"distill.steps_per_block, distill.model_steps are not used)")
    return Student(student, qcfg, job.fit(student, dcfg), notes=[note])
