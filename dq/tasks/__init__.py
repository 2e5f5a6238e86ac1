"""Tasks: ``dq.tasks.<name>.run(cfg) -> metrics dict``, the only code that sees the composed DictConfig.

The ``task`` config group's schemas are here (one dataclass per task, stored as task/<name>_schema).
"""
from dataclasses import dataclass
from typing import Optional


@dataclass
class QuantizeTask:
    """The main job: quantize the teacher with ``method``, then evaluate FP and student."""

    name: str = "quantize"
    evaluate: bool = True
    num_samples: int = 1000    # images per model for FID/KID/IS
    batch_size: int = 250
    floor: bool = True
    compare_fp: bool = True    # also sample the FP teacher (false: student only, e.g. benchmark cells)
    # what samples the student row: reference (the fake-quant student as trained, the papers' protocol) or its
    # export on auto | int8 | compiled (CPU jobs); compare_reference: then also sample the fake-quant student
    student_runtime: str = "reference"
    compare_reference: bool = False
    grid: int = 64
    guidance_scale: float = 1.0  # classifier-free guidance when sampling (conf: ${calib.guidance_scale})
    resume: Optional[str] = None  # a checkpoints/last.ckpt of an interrupted run


@dataclass
class EvaluateTask:
    """Sample a model (or a saved student) and score it."""

    name: str = "evaluate"
    num_samples: int = 1000
    batch_size: int = 250
    floor: bool = True
    grid: int = 64
    seeds: int = 1
    guidance_scale: Optional[float] = None  # None: a student's own (its run's calib.guidance_scale), else 1
    with_teacher: bool = False


@dataclass
class PretrainTask:
    name: str = "pretrain"
    steps: int = 7000
    batch_size: int = 64
    lr: float = 5.0e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    evaluate: bool = True
    export_to: Optional[str] = None


@dataclass
class ClassifierTask:
    name: str = "classifier"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2.0e-3
    feature_dim: int = 64
    export_to: Optional[str] = None


@dataclass
class ExportTask:
    """A trained student → a deployable folder (python export.py)."""

    name: str = "export"


TASK_CONFIGS = {"quantize": QuantizeTask, "evaluate": EvaluateTask, "pretrain": PretrainTask,
                "classifier": ClassifierTask, "export": ExportTask}
