"""Typed configs: every hydra config group has a dataclass schema, stored in hydra's ConfigStore as
``<group>/schema`` (methods: ``method/<name>_schema``, tasks: ``task/<name>_schema``); each yaml of the
group starts from it, so a wrong type or an unknown key fails when the config is composed, and the
dataclass's ``__post_init__`` checks values (``typed``). Library code receives these objects; only the
entry points (``dq.tasks.*.run``) see the DictConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dq.data.calibration import CalibConfig
from dq.data.digits import DataConfig
from dq.distill.bkd import DistillConfig
from dq.errors import DQError, choice_error
from dq.metrics.callbacks import CallbacksConfig
from dq.metrics.image_metrics import MetricsConfig
from dq.models.export import RUNTIMES
from dq.models.load import ModelConfig
from dq.models.sampling import SamplerConfig
from dq.quant.config import QuantSpec

LOGGERS = ("wandb", "csv", "none")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
DEVICES = "a positive integer, -1 (all), 'auto', or a list of device indices such as [0,1]"


@dataclass
class LoggerConfig:
    """The ``logger`` group: wandb (offline by default: nothing asks for a key), csv, or none."""

    kind: str = field(default="wandb", metadata={"choices": LOGGERS})
    mode: str = "offline"
    project: str = "dq"
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in LOGGERS:
            raise choice_error("logger.kind", self.kind, LOGGERS)


@dataclass
class TrainerConfig:
    """The ``trainer`` group: keyword arguments of ``lightning.Trainer`` (the ones dq sets)."""

    accelerator: str = field(default="cpu", metadata={"choices": ACCELERATORS})
    devices: Any = field(default=1, metadata={"choices": DEVICES})
    strategy: str = "auto"
    precision: Any = 32
    num_nodes: int = 1
    log_every_n_steps: int = 10
    enable_checkpointing: bool = False
    enable_model_summary: bool = False
    fast_dev_run: bool = False
    profiler: Optional[str] = None

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise choice_error("trainer.accelerator", self.accelerator, ACCELERATORS)
        d = self.devices
        ok = (isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1)) or d == "auto" \
            or (isinstance(d, str) and all(p.strip().lstrip("-").isdigit() for p in d.split(",") if p.strip())
                and d.strip() != "") \
            or (isinstance(d, (list, tuple)) and d and all(isinstance(i, int) and i >= 0 for i in d))
        if not ok:
            raise DQError(f"trainer.devices={d!r} is not valid; valid: {DEVICES}")


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    cache_dir: str = ".cache/dq"


GROUPS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "quant": QuantSpec, "distill": DistillConfig, "calib": CalibConfig,
    "sampler": SamplerConfig, "metrics": MetricsConfig, "trainer": TrainerConfig, "logger": LoggerConfig,
    "callbacks": CallbacksConfig, "paths": PathsConfig,
}


def register() -> None:
    """Store every group's schema (and, by importing them, every method's and task's) in the ConfigStore."""
    cs = ConfigStore.instance()
    for group, node in GROUPS.items():
        cs.store(group=group, name="schema", node=node)
    import dq.methods  # noqa: F401  (each method registers method/<name>_schema)
    from dq.tasks import TASK_CONFIGS

    for name, node in TASK_CONFIGS.items():
        cs.store(group="task", name=f"{name}_schema", node=node)


def typed(cfg: DictConfig, group: str) -> Any:
    """The group's dataclass instance (its ``__post_init__`` validates values)."""
    node = cfg[group]
    return OmegaConf.to_object(node) if OmegaConf.is_config(node) else node


def check(cfg: DictConfig) -> None:
    """Build every typed group of a composed config, so a bad value fails before any work."""
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise DQError(f"seed={cfg.get('seed')!r} must be an integer")
    if "runtime" in cfg and cfg.runtime not in RUNTIMES:
        raise choice_error("runtime", cfg.runtime, RUNTIMES)
    fast = cfg.get("task", {}).get("student_runtime", "reference")
    if fast not in RUNTIMES:
        raise choice_error("task.student_runtime", fast, RUNTIMES)
    if fast == "reference" and cfg.get("task", {}).get("compare_reference", False):
        raise DQError("task.compare_reference=true compares the student's export with the fake-quant student: name "
                      "the export's runtime too, e.g. task.student_runtime=auto")
    for group in [*(g for g in GROUPS if g != "paths"), "method", "task"]:  # paths resolve only under hydra
        if group in cfg and OmegaConf.get_type(cfg, group) not in (dict, None):
            typed(cfg, group)


register()
