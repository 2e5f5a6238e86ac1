"""Plain post-training quantization: min–max calibrated weights and activations, no scaling, no training.

``per_step_tables=true`` gives PTQ with TPQ tables; ``calib_method`` picks the activation range rule.
"""
from dataclasses import dataclass, field

from dq.methods import register
from dq.methods.base import Job, Student, check_calib_method
from dq.quant.quantizers import CALIBRATION_METHODS


@dataclass
class PTQConfig:
    name: str = "ptq"
    per_step_tables: bool = False
    calib_method: str = field(default="minmax", metadata={"choices": CALIBRATION_METHODS})

    def __post_init__(self) -> None:
        check_calib_method(self.calib_method)


@register(PTQConfig)
def run(job: Job, cfg: PTQConfig) -> Student:
    student, qcfg = job.prepare(shared_tables=not cfg.per_step_tables)
    job.calibrate(student, cfg.calib_method)
    return Student(student, qcfg)
