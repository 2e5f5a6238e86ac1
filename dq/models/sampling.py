"""Sampling loops on diffusers schedulers, shared by evaluation and calibration.

Image i of a run starts from noise drawn from a generator seeded with (seed, i) alone, so the
images do not depend on batch size or on how generation is sharded across processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from dq.console import progress
from dq.errors import DQError, choice_error
from dq.models.families import family_of
from dq.models.load import DiffusionModel

SAMPLERS = {"ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}


@dataclass
class SamplerConfig:
    """The ``sampler`` config group: which diffusers scheduler samples, with how many steps and DDIM's η."""

    name: str = "ddim"
    steps: int = 50
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise choice_error("sampler.name", self.name, SAMPLERS)
        if self.steps < 1:
            raise DQError(f"sampler.steps={self.steps} must be >= 1")


def make_sampler(model: DiffusionModel, sampler: SamplerConfig):
    """A scheduler set to ``sampler.steps`` inference steps on the model's noise schedule."""
    max_steps = model.scheduler.config.num_train_timesteps
    if not 1 <= sampler.steps <= max_steps:
        raise DQError(f"sampler.steps={sampler.steps} must be in 1..{max_steps}")
    sched = SAMPLERS[sampler.name].from_config(model.scheduler.config)
    sched.set_timesteps(sampler.steps)
    return sched


def sampler_timesteps(model: DiffusionModel, sampler: SamplerConfig) -> list[int]:
    """The raw timesteps at which the sampler calls the model, in calling order (TPQ rows)."""
    return [int(t) for t in make_sampler(model, sampler).timesteps]


def initial_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T for the images with these global indices: [len(indices), *shape], one generator each."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


def _on(c: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Conditioning on x's device; embeddings in x's dtype, class labels stay integers."""
    if c is None:
        return None
    return c.to(x.device, dtype=x.dtype if c.is_floating_point() else c.dtype)


@torch.no_grad()
def denoise(denoiser: torch.nn.Module, sched, x: torch.Tensor, cond: torch.Tensor | None = None,
            uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, seed: int = 0,
            on_step: Callable[[int, int, torch.Tensor], None] | None = None, eta: float = 0.0) -> torch.Tensor:
    """Run the sampler from x_T to x_0. ``on_step(step, raw_t, x_t)`` sees each model input.

    ``cond`` / ``uncond``: the family's conditioning (encoder hidden states [B, L, D] or class labels
    [B]). With guidance_scale != 1, classifier-free guidance as diffusers pipelines do it: the
    unconditional and conditional halves run in one batch, ε = ε_u + s·(ε_c − ε_u).
    """
    gen = torch.Generator().manual_seed(seed)
    family = family_of(denoiser)
    step_kwargs = {"eta": eta} if isinstance(sched, DDIMScheduler) else {}  # η: DDIM's stochasticity
    use_cfg = cond is not None and guidance_scale != 1.0
    if use_cfg and uncond is None:
        raise DQError(f"guidance_scale={guidance_scale} needs an unconditional input, and this model has none; "
                      f"use guidance_scale=1.0")
    cond, uncond = _on(cond, x), _on(uncond, x)
    both = torch.cat([uncond, cond]) if use_cfg else None
    for step, t in enumerate(sched.timesteps):
        if on_step is not None:
            on_step(step, int(t), x)
        tt = torch.full((x.shape[0] * (2 if use_cfg else 1),), int(t), dtype=torch.long, device=x.device)
        if use_cfg:
            eps_u, eps_c = family.forward(denoiser, torch.cat([x, x]), tt, both).chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = family.forward(denoiser, x, tt, cond)
        x = sched.step(eps, t, x, generator=gen, **step_kwargs).prev_sample
    return x


def batches(indices: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    yield from indices.split(batch_size)


@torch.no_grad()
def sample_images(teacher: DiffusionModel, denoiser: torch.nn.Module, sampler_cfg: SamplerConfig, indices: torch.Tensor, seed: int,
                  batch_size: int = 250, cond_fn: Callable[[torch.Tensor], tuple] | None = None,
                  guidance_scale: float = 1.0, desc: str = "sampling") -> torch.Tensor:
    """Generate the images with global ``indices`` using ``denoiser`` (teacher or student): [N, C, H, W]
    in [−1, 1], float32 on the CPU; a latent model's samples decoded by ``teacher.to_images``.

    ``cond_fn(indices) -> (cond, uncond)`` supplies the conditioning (``dq.models.conditioning``).
    Sampling runs on the denoiser's device and in its dtype; the teacher's VAE follows it.
    """
    if len(indices) == 0:
        raise DQError("number of images to sample must be > 0")
    out = []
    param = next(denoiser.parameters())
    bar = progress(total=len(indices), desc=desc, unit="img", leave=False, per_update=True)
    for chunk in batches(indices, batch_size):
        sched = make_sampler(teacher, sampler_cfg)
        x = initial_noise(chunk, teacher.sample_shape, seed).to(param.device, param.dtype)
        cond, uncond = cond_fn(chunk) if cond_fn is not None else (None, None)
        x = denoise(denoiser, sched, x, cond, uncond, guidance_scale, seed=seed * 7919 + int(chunk[0]),
                    eta=float(sampler_cfg.eta or 0.0))
        out.append(teacher.to_images(x))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)
