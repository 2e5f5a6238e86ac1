"""Save and load a quantized student as one file that carries its own configuration.

The file holds the UNet's class and config (so no teacher weights are needed to rebuild it), the
noise-scheduler config, the QuantConfig, the sampler it was trained for and the run's config, plus
the student's state_dict. Loading = build the UNet from config → ``prepare`` → strict load.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from dq.errors import DQError
from dq.models.load import Teacher
from dq.models.quantize import QuantConfig, prepare

FORMAT = "dq-student-v1"
UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


def save_student(path: Path, student: torch.nn.Module, teacher: Teacher, qcfg: QuantConfig,
                 sampler: dict[str, Any], run_config: dict[str, Any]) -> Path:
    payload = {
        "format": FORMAT,
        "unet_class": type(student).__name__,
        "unet_config": dict(student.config),
        "scheduler_config": dict(teacher.scheduler.config),
        "quant": dataclasses.asdict(qcfg),
        "sampler": sampler,
        "run_config": run_config,
        "teacher": teacher.name,
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_student(path: str | Path) -> tuple[Teacher, dict[str, Any]]:
    """(a Teacher whose ``unet`` is the quantized student, the checkpoint's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise DQError(f"student checkpoint {str(path)!r} does not exist; give the student.pt a quantize run wrote")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DQError(f"{str(path)!r} is not a dq student checkpoint (expected format {FORMAT!r})")
    cls = UNET_CLASSES[payload["unet_class"]]
    config = {k: v for k, v in payload["unet_config"].items() if not k.startswith("_")}
    unet = prepare(cls.from_config(config), QuantConfig(**payload["quant"]))
    unet.load_state_dict(payload["state_dict"], strict=True)
    unet.eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_config(payload["scheduler_config"])
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return Teacher(unet, scheduler, f"student:{path}"), meta
