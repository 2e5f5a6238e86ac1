"""Load a diffusion model: the embedded digits DDPM, a local diffusers folder, a hub id, or a named
random-init architecture (tests, cost benchmarks).

A :class:`DiffusionModel` is a denoiser plus the noise schedule it was trained with; teachers and
students alike. Every source gives the same type, so the rest of the code never asks where a model
came from. Denoiser classes come from the folder's configs (``_class_name``), never from names.
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
from dq.models.families import archs, family_of, model_class

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_TEACHER = ASSETS / "digits_teacher"
SOURCES = ("embedded", "local", "hub", "tiny")


@dataclass
class ModelConfig:
    """The ``model`` config group. source: embedded | local (``path``) | hub (``id``) | tiny (``arch``, ``seed``)."""

    source: str = "embedded"
    path: Optional[str] = None
    id: Optional[str] = None
    arch: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise choice_error("model.source", self.source, SOURCES)
        used = {"embedded": (), "local": ("path",), "hub": ("id",), "tiny": ("arch",)}[self.source]
        stray = [f for f in ("path", "id", "arch") if getattr(self, f) is not None and f not in used]
        if stray:  # a setting that would be silently ignored
            raise DQError(f"model.{stray[0]} is not used with model.source={self.source}; drop it or pick the "
                          f"source that reads it (model=local: path, model=hub: id, model=tiny_*: arch)")


@dataclass
class DiffusionModel:
    """``denoiser`` predicts ε; ``scheduler`` is its training noise schedule; ``name`` says where it came from."""

    denoiser: torch.nn.Module
    scheduler: DDPMScheduler
    name: str

    @property
    def family(self) -> Any:
        return family_of(self.denoiser)

    @property
    def conditioning(self) -> Any:
        """The family's ``Conditioning`` of the denoiser, None when unconditional."""
        return self.family.conditioning(self.denoiser)

    @property
    def conditional(self) -> bool:
        return self.conditioning is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.family.sample_shape(self.denoiser)


def _scheduler(path: Path) -> DDPMScheduler:
    """The folder's noise schedule: ``scheduler/`` (a pipeline) or a flat ``scheduler_config.json``."""
    for folder in (path / "scheduler", path):
        if (folder / "scheduler_config.json").is_file():
            return DDPMScheduler.from_pretrained(folder)
    raise DQError(f"no noise scheduler in {str(path)!r} (looked for scheduler/scheduler_config.json and "
                  f"scheduler_config.json); save one next to the model with scheduler.save_pretrained(DIR)")


def _load_folder(path: Path, name: str) -> DiffusionModel:
    if not path.is_dir():
        raise DQError(f"model folder {str(path)!r} does not exist; give model.path=<a diffusers folder> "
                      f"or use model=embedded_digits")
    model_dir = path / "unet" if (path / "unet").is_dir() else path
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise DQError(f"{str(model_dir)!r} holds no diffusers config.json; expected a save_pretrained folder")
    cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    if not cls_name:
        raise DQError(f"{str(cfg_file)!r} has no _class_name; it is not a diffusers model config")
    denoiser = model_class(cls_name).from_pretrained(model_dir)
    return DiffusionModel(denoiser.eval(), _scheduler(path), name)


def _load_hub(repo_id: str) -> DiffusionModel:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (f"cannot download {repo_id!r} from the Hugging Face hub{' (HF_HUB_OFFLINE is set)' if offline else ''}; "
            f"on a machine with network run `python -c \"from diffusers import DiffusionPipeline; "
            f"DiffusionPipeline.from_pretrained('{repo_id}').save_pretrained('DIR')\"`, copy DIR here and use "
            f"model=local model.path=DIR")
    if offline:
        raise DQError(hint)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "unet/*", "scheduler/*"])
    except OSError as e:  # network errors and missing repos surface as OSError subclasses
        raise DQError(f"{hint} (hub said: {str(e).splitlines()[0]})") from None
    return _load_folder(Path(folder), repo_id)


def build_arch(arch: str, seed: int = 0) -> DiffusionModel:
    """A random-init model of a named architecture (``dq.models.families.archs()``), linear DDPM schedule."""
    known = archs()
    if arch not in known:
        raise choice_error("model.arch", arch, known)
    cls, kwargs = known[arch]
    torch.manual_seed(seed)
    return DiffusionModel(cls(**kwargs).eval(), DDPMScheduler(num_train_timesteps=1000), f"tiny_{arch}")


def load_model(cfg: ModelConfig) -> DiffusionModel:
    """The model described by the ``model`` config group, frozen (requires_grad False)."""
    if cfg.source == "embedded":
        if not EMBEDDED_TEACHER.is_dir():
            raise DQError(f"the embedded teacher is missing at {EMBEDDED_TEACHER}; rebuild it with "
                          f"`python train.py task=pretrain task.export_to={EMBEDDED_TEACHER}`")
        model = _load_folder(EMBEDDED_TEACHER, "embedded_digits")
    elif cfg.source == "local":
        if not cfg.path:
            raise DQError("model=local needs model.path=<a diffusers save_pretrained folder>")
        model = _load_folder(Path(cfg.path).expanduser(), cfg.path)
    elif cfg.source == "hub":
        if not cfg.id:
            raise DQError("model=hub needs model.id=<a hub repository id>")
        model = _load_hub(cfg.id)
    else:
        if not cfg.arch:
            raise DQError(f"model.source=tiny needs model.arch; valid choices: {', '.join(archs())}")
        model = build_arch(cfg.arch, cfg.seed)
    model.denoiser.requires_grad_(False)
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
