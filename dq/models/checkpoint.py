"""Save and load a quantized student as one safetensors file that carries its own configuration.

The tensors are the student's state_dict; the file's metadata (``dq`` key, JSON) holds the denoiser's
class and config (so no teacher weights are needed to rebuild it), the noise-scheduler config, the
QuantConfig, the sampler it was trained for, the method and the run's config. Nothing is unpickled
on load: a checkpoint from someone else cannot run code. Loading = build the denoiser from its
config → ``prepare`` → strict load.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dq.errors import DQError
from dq.models.families import model_class
from dq.models.load import DiffusionModel, ModelConfig, load_model
from dq.models.student import prepare
from dq.quant.config import QuantConfig

FORMAT = "dq-student-v2"


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_student(path: Path, student: torch.nn.Module, teacher: DiffusionModel, qcfg: QuantConfig,
                 info: dict[str, Any]) -> Path:
    """Write ``student`` to ``path`` (written to a temporary name first, then renamed: never half-written).
    ``info`` (sampler, method, run_config, ...) is stored as JSON beside the format fields."""
    meta = {
        "format": FORMAT,
        "class": type(student).__name__,
        "config": {k: v for k, v in dict(student.config).items() if not k.startswith("_")},
        "scheduler_config": dict(teacher.scheduler.config),
        "quant": dataclasses.asdict(qcfg),
        "teacher": teacher.name,
        **info,
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"dq": json.dumps(_jsonable(meta))})
    tmp.replace(path)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, or a one-line DQError for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise DQError(f"student checkpoint {str(path)!r} does not exist; give the student.safetensors a "
                      f"`python train.py` run wrote")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("dq")
    except (SafetensorError, OSError, ValueError) as e:
        raise DQError(f"{str(path)!r} is not a readable safetensors file ({str(e).splitlines()[0]}); it may be "
                      f"truncated or not a dq student — re-run the job that wrote it") from None
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise DQError(f"{str(path)!r} is not a dq student checkpoint (expected format {FORMAT!r}, "
                      f"found {meta.get('format')!r})")
    return meta


def load_student(path: str | Path) -> tuple[DiffusionModel, dict[str, Any]]:
    """(the student as a DiffusionModel, the checkpoint's metadata)."""
    meta = read_meta(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DQError(f"{str(path)!r} could not be read ({str(e).splitlines()[0]}); it may be truncated") from None
    quant = {**meta["quant"], "timesteps": tuple(meta["quant"]["timesteps"]), "skip": tuple(meta["quant"]["skip"]), "a8_layers": tuple(meta["quant"].get("a8_layers", ())),
             "lowrank_layers": tuple(meta["quant"].get("lowrank_layers", ()))}
    denoiser = prepare(model_class(meta["class"]).from_config(meta["config"]), QuantConfig(**quant))
    denoiser.load_state_dict(state, strict=True)
    denoiser.eval().requires_grad_(False)
    return DiffusionModel(denoiser, DDPMScheduler.from_config(meta["scheduler_config"]), f"student:{path}"), meta


PARTS = ("vae", "text_encoder", "tokenizer")


def attach_teacher_parts(student: DiffusionModel, meta: dict[str, Any], why: str) -> DiffusionModel:
    """Load the teacher a student's run started from (its ``run_config.model``) and give the student the
    pipeline parts it was trained with (``meta["teacher_parts"]``: VAE, text encoder, tokenizer).
    Returns the teacher. ``why`` names the reason in the one-line error when the teacher cannot be loaded."""
    model_cfg = (meta.get("run_config") or {}).get("model")
    if model_cfg is None:
        raise DQError(f"{why}: the student does not record the teacher it came from (run_config.model)")
    try:
        teacher = load_model(ModelConfig(**model_cfg))
    except DQError as e:
        raise DQError(f"{why}: cannot load the student's teacher: {e}") from None
    for part in meta.get("teacher_parts") or []:
        setattr(student, part, getattr(teacher, part))
    return teacher
