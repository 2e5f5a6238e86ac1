"""FP: the full-precision teacher, evaluated exactly like a student would be (the reference row)."""
from dataclasses import dataclass

from dq.methods import register
from dq.methods.base import Job, Student


@dataclass
class FPConfig:
    name: str = "fp"


@register(FPConfig)
def run(job: Job, cfg: FPConfig) -> Student:
    return Student(model=None)
