"""Load a teacher diffusion model: the embedded digits DDPM, a local diffusers folder, a hub id,
or a tiny random-init UNet for tests.

A teacher is a UNet plus the noise scheduler it was trained with. Every source gives the same
``Teacher`` so the rest of the code never asks where a model came from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from dq.errors import DQError, choice_error

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_TEACHER = ASSETS / "digits_teacher"
SOURCES = ("embedded", "local", "hub", "tiny")

# The embedded teacher's architecture: 1.1M parameters, three resolutions (16, 8, 4) with
# self-attention at 8×8 on the way down and up. Kept here so pretraining and tests share it.
DIGITS_UNET = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=16,
)

# google/ddpm-cifar10-32's architecture (35.7M parameters), for benchmarks with random weights.
DDPM_CIFAR10_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, norm_eps=1e-6, attention_head_dim=None, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1,
)

# Random-init architectures (model=tiny_unet etc.): tiny ones for tests, a few thousand
# parameters that run in milliseconds on CPU, and ddpm_cifar10 for benchmarks.
TINY_ARCHS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm_cifar10": (UNet2DModel, DDPM_CIFAR10_UNET),
    "unet2d": (UNet2DModel, dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8)),
    "unet2d_cond": (UNet2DConditionModel, dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8)),
}


@dataclass
class Teacher:
    """A full-precision diffusion model: ``unet`` predicts ε; ``scheduler`` is its training noise schedule."""

    unet: UNet2DModel | UNet2DConditionModel
    scheduler: DDPMScheduler
    name: str

    @property
    def conditional(self) -> bool:
        return isinstance(self.unet, UNet2DConditionModel)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, size, size)


def _load_folder(path: Path, name: str) -> Teacher:
    if not path.is_dir():
        raise DQError(f"model folder {str(path)!r} does not exist; give model.path=<a diffusers folder with "
                      f"unet/ and scheduler/> or use model=embedded_digits")
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    cfg_file = unet_dir / "config.json"
    if not cfg_file.is_file():
        raise DQError(f"{str(unet_dir)!r} holds no diffusers config.json; expected a save_pretrained folder")
    import json

    cls_name = json.loads(cfg_file.read_text()).get("_class_name", "UNet2DModel")
    cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(cls_name)
    if cls is None:
        raise choice_error("UNet class in " + str(cfg_file), cls_name, ["UNet2DModel", "UNet2DConditionModel"])
    unet = cls.from_pretrained(unet_dir)
    sched_dir = path / "scheduler"
    scheduler = DDPMScheduler.from_pretrained(sched_dir) if sched_dir.is_dir() else DDPMScheduler()
    return Teacher(unet.eval(), scheduler, name)


def _load_hub(repo_id: str) -> Teacher:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = (f"cannot download {repo_id!r} from the Hugging Face hub{' (HF_HUB_OFFLINE is set)' if offline else ''}; "
            f"on a machine with network run `python -c \"from diffusers import DiffusionPipeline; "
            f"DiffusionPipeline.from_pretrained('{repo_id}').save_pretrained('DIR')\"`, copy DIR here and use "
            f"model=local model.path=DIR")
    if offline:
        raise DQError(hint)
    try:
        unet_cls = UNet2DConditionModel if "stable-diffusion" in repo_id else UNet2DModel
        try:
            unet = unet_cls.from_pretrained(repo_id, subfolder="unet")
        except EnvironmentError:
            unet = unet_cls.from_pretrained(repo_id)
        try:
            scheduler = DDPMScheduler.from_pretrained(repo_id, subfolder="scheduler")
        except EnvironmentError:
            scheduler = DDPMScheduler.from_pretrained(repo_id)
    except OSError as e:  # network errors and missing repos surface as OSError subclasses
        raise DQError(f"{hint} (hub said: {str(e).splitlines()[0]})") from None
    return Teacher(unet.eval(), scheduler, repo_id)


def build_tiny(arch: str, seed: int = 0) -> Teacher:
    """A random-init tiny UNet for tests; ``arch`` is one of TINY_ARCHS."""
    if arch not in TINY_ARCHS:
        raise choice_error("tiny model arch", arch, TINY_ARCHS)
    cls, kwargs = TINY_ARCHS[arch]
    torch.manual_seed(seed)
    return Teacher(cls(**kwargs).eval(), DDPMScheduler(num_train_timesteps=1000), f"tiny_{arch}")


def load_teacher(model_cfg: Any) -> Teacher:
    """Build the teacher described by the ``model`` config group (source: embedded|local|hub|tiny)."""
    source = model_cfg.get("source")
    if source == "embedded":
        if not EMBEDDED_TEACHER.is_dir():
            raise DQError(f"the embedded teacher is missing at {EMBEDDED_TEACHER}; "
                          f"rebuild it with `python train.py task=pretrain`")
        teacher = _load_folder(EMBEDDED_TEACHER, "embedded_digits")
    elif source == "local":
        if not model_cfg.get("path"):
            raise DQError("model=local needs model.path=<a diffusers save_pretrained folder>")
        teacher = _load_folder(Path(str(model_cfg.path)).expanduser(), str(model_cfg.path))
    elif source == "hub":
        teacher = _load_hub(str(model_cfg.id))
    elif source == "tiny":
        teacher = build_tiny(str(model_cfg.arch), int(model_cfg.get("seed", 0)))
    else:
        raise choice_error("model.source", source, SOURCES)
    teacher.unet.requires_grad_(False)
    return teacher


def ddim_scheduler(teacher: Teacher) -> DDIMScheduler:
    """A DDIM sampler on the teacher's training noise schedule."""
    return DDIMScheduler.from_config(teacher.scheduler.config)


REFERENCE_FILE = "reference_io.safetensors"


@torch.no_grad()
def write_reference_io(unet: torch.nn.Module, folder: Path, seed: int = 0) -> None:
    """Save a fixed (input, timestep, output) triple next to a saved UNet, so a test can check that
    the shipped weights still give the output they gave at save time."""
    from safetensors.torch import save_file

    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, c.in_channels, size, size, generator=g)
    t = torch.tensor([999, 500, 100, 0])
    save_file({"x": x, "t": t, "out": unet.eval()(x, t).sample.contiguous()}, str(folder / REFERENCE_FILE))
