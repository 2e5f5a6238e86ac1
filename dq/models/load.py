"""Load a diffusion model: the embedded digits DDPM, a local diffusers folder, a hub id, or a named
random-init architecture (tests, cost benchmarks, tiny stand-ins of real pipelines).

A :class:`DiffusionModel` is a denoiser plus the noise schedule it was trained with, and — where the
pipeline has them — its VAE (latent models), text encoder and tokenizer; teachers and students alike.
Every source gives the same type, so the rest of the code never asks where a model came from.

Folders (``model=local``, ``model=hub``): a diffusers pipeline folder (``model_index.json`` lists the
components and their classes), a bare denoiser folder (``config.json`` with ``_class_name``), or a
flat folder holding the denoiser config next to a ``scheduler_config.json``. Classes come from these
configs, never from names; a missing noise schedule is an error (``model.scheduler=...`` names one).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dq.errors import DQError, choice_error
from dq.models.diffusion_model import DiffusionModel
from dq.models.families import archs, model_class
from dq.models.components import load_component, pipeline_archs

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_TEACHER = ASSETS / "digits_teacher"
SOURCES = ("embedded", "local", "hub", "tiny")
REAL_SIZE = ("ddpm_cifar10", "dit_xl2", "ldm_bedroom_unet", "sd15_unet")  # denoiser archs at a published model's real size


@dataclass
class ModelConfig:
    """The ``model`` config group. source: embedded | local (``path``) | hub (``id``) | tiny (``arch``, ``seed``)."""

    source: str = "embedded"
    path: Optional[str] = None
    id: Optional[str] = None
    arch: Optional[str] = None
    seed: int = 0
    scheduler: Optional[str] = None  # a scheduler folder or its scheduler_config.json (overrides the model's)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise choice_error("model.source", self.source, SOURCES)
        used = {"embedded": (), "local": ("path",), "hub": ("id",), "tiny": ("arch",)}[self.source]
        stray = [f for f in ("path", "id", "arch") if getattr(self, f) is not None and f not in used]
        if stray:  # a setting that would be silently ignored
            raise DQError(f"model.{stray[0]} is not used with model.source={self.source}; drop it or pick the "
                          f"source that reads it (model=local: path, model=hub: id, model=tiny_*: arch)")


def _scheduler(path: Path, given: Optional[str]) -> DDPMScheduler:
    """The noise schedule: ``model.scheduler`` when given, else the folder's ``scheduler/`` (a pipeline)
    or a flat ``scheduler_config.json``. Any diffusers scheduler config works (only the schedule is read)."""
    if given:
        p = Path(given).expanduser()
        folder = p.parent if p.name.endswith(".json") else p
        if not (folder / "scheduler_config.json").is_file():
            raise DQError(f"model.scheduler={given!r} holds no scheduler_config.json; give a folder written by "
                          f"scheduler.save_pretrained(DIR) or the scheduler_config.json itself")
        return DDPMScheduler.from_pretrained(folder)
    for folder in (path / "scheduler", path):
        if (folder / "scheduler_config.json").is_file():
            return DDPMScheduler.from_pretrained(folder)
    raise DQError(f"no noise scheduler in {str(path)!r} (looked for scheduler/scheduler_config.json and "
                  f"scheduler_config.json); save one next to the model with scheduler.save_pretrained(DIR) "
                  f"or name one with model.scheduler=<folder or scheduler_config.json>")


def _denoiser(model_dir: Path, cls_name: Optional[str] = None) -> torch.nn.Module:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise DQError(f"{str(model_dir)!r} holds no diffusers config.json; expected a save_pretrained folder")
    cls_name = cls_name or json.loads(cfg_file.read_text()).get("_class_name")
    if not cls_name:
        raise DQError(f"{str(cfg_file)!r} has no _class_name; it is not a diffusers model config")
    return model_class(cls_name).from_pretrained(model_dir).eval()


DENOISER_KEYS = ("unet", "transformer")


def _load_folder(path: Path, name: str, scheduler: Optional[str] = None) -> DiffusionModel:
    if not path.is_dir():
        raise DQError(f"model folder {str(path)!r} does not exist; give model.path=<a diffusers folder> "
                      f"or use model=embedded_digits")
    index_file = path / "model_index.json"
    if not index_file.is_file():  # a bare denoiser folder, flat or under unet/
        model_dir = path / "unet" if (path / "unet").is_dir() else path
        return DiffusionModel(_denoiser(model_dir), _scheduler(path, scheduler), name)
    index = json.loads(index_file.read_text())
    key = next((k for k in DENOISER_KEYS if isinstance(index.get(k), list) and index[k][1]), None)
    if key is None:
        raise DQError(f"{str(index_file)!r} lists no denoiser (looked for components {', '.join(DENOISER_KEYS)})")
    denoiser = _denoiser(path / key, index[key][1])
    parts = {role: load_component(path, index, role) for role in ("vae", "text_encoder", "tokenizer")}
    return DiffusionModel(denoiser, _scheduler(path, scheduler), name, **parts)


def _load_hub(repo_id: str, scheduler: Optional[str] = None) -> DiffusionModel:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (f"cannot download {repo_id!r} from the Hugging Face hub{' (HF_HUB_OFFLINE is set)' if offline else ''}; "
            f"on a machine with network run `python -c \"from diffusers import DiffusionPipeline; "
            f"DiffusionPipeline.from_pretrained('{repo_id}').save_pretrained('DIR')\"`, copy DIR here and use "
            f"model=local model.path=DIR")
    if offline:
        raise DQError(hint)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                   ignore_patterns=["*.fp16.*", "*non_ema*", "safety_checker/*"])
    except OSError as e:  # network errors and missing repos surface as OSError subclasses
        raise DQError(f"{hint} (hub said: {str(e).splitlines()[0]})") from None
    return _load_folder(Path(folder), repo_id, scheduler)


def build_arch(arch: str, seed: int = 0) -> DiffusionModel:
    """A random-init model of a named architecture, seeded: a denoiser (``dq.models.families.archs()``,
    linear DDPM schedule) or a tiny pipeline with its VAE / text encoder (``pipeline_archs()``)."""
    known, pipes = archs(), pipeline_archs()
    if arch in pipes:
        return pipes[arch](seed)
    if arch not in known:
        raise choice_error("model.arch", arch, [*known, *pipes])
    cls, kwargs = known[arch]
    torch.manual_seed(seed)
    name = f"standin_{arch} (random init)" if arch in REAL_SIZE else f"tiny_{arch}"
    return DiffusionModel(cls(**kwargs).eval(), DDPMScheduler(num_train_timesteps=1000), name)


def load_model(cfg: ModelConfig) -> DiffusionModel:
    """The model described by the ``model`` config group, frozen (requires_grad False)."""
    if cfg.source == "embedded":
        if not EMBEDDED_TEACHER.is_dir():
            raise DQError(f"the embedded teacher is missing at {EMBEDDED_TEACHER}; rebuild it with "
                          f"`python train.py task=pretrain task.export_to={EMBEDDED_TEACHER}`")
        model = _load_folder(EMBEDDED_TEACHER, "embedded_digits", cfg.scheduler)
    elif cfg.source == "local":
        if not cfg.path:
            raise DQError("model=local needs model.path=<a diffusers save_pretrained folder>")
        model = _load_folder(Path(cfg.path).expanduser(), cfg.path, cfg.scheduler)
    elif cfg.source == "hub":
        if not cfg.id:
            raise DQError("model=hub needs model.id=<a hub repository id>")
        model = _load_hub(cfg.id, cfg.scheduler)
    else:
        if not cfg.arch:
            known = [*archs(), *pipeline_archs()]
            raise DQError(f"model.source=tiny needs model.arch; valid choices: {', '.join(known)}")
        model = build_arch(cfg.arch, cfg.seed)
        if cfg.scheduler:
            model.scheduler = _scheduler(Path("."), cfg.scheduler)
    for m in (model.denoiser, model.vae, model.text_encoder):
        if m is not None:
            m.eval().requires_grad_(False)
    return model


def ddim_scheduler(model: DiffusionModel) -> DDIMScheduler:
    """A DDIM sampler on the model's training noise schedule."""
    return DDIMScheduler.from_config(model.scheduler.config)


REFERENCE_FILE = "reference_io.safetensors"


@torch.no_grad()
def write_reference_io(model: DiffusionModel, folder: Path, seed: int = 0) -> None:
    """Save a fixed (input, timestep, output) triple next to a saved model, so a test can check that
    the shipped weights still give the output they gave at save time."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, *model.sample_shape, generator=g)
    t = torch.tensor([999, 500, 100, 0])
    out = model.family.forward(model.denoiser.eval(), x, t)
    save_file({"x": x, "t": t, "out": out.contiguous()}, str(folder / REFERENCE_FILE))
