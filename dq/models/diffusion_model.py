"""A diffusion model as dq passes it around: the denoiser, its noise schedule and, where the pipeline has
them, the VAE, text encoder, tokenizer and prompts (loaded by dq.models.load, built by dq.models.components)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from diffusers import DDPMScheduler

from dq.models.families import family_of


@dataclass
class DiffusionModel:
    """``denoiser`` predicts ε; ``scheduler`` is its training noise schedule; ``name`` says where it came from.

    ``vae`` (AutoencoderKL / VQModel): the denoiser works in its latent space and ``to_images`` decodes;
    ``text_encoder`` + ``tokenizer``: how prompts become the denoiser's conditioning; ``prompts``: the
    prompts it is sampled with (image i gets prompts[i % len]; ``dq.models.conditioning``). None when absent.
    """

    denoiser: torch.nn.Module
    scheduler: DDPMScheduler
    name: str
    vae: Optional[torch.nn.Module] = None
    text_encoder: Optional[torch.nn.Module] = None
    tokenizer: Any = None
    prompts: Optional[tuple[str, ...]] = None

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
        """(C, H, W) of what the denoiser denoises (latents for a latent model)."""
        return self.family.sample_shape(self.denoiser)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images ``to_images`` returns."""
        c, h, w = self.sample_shape
        if self.vae is None:
            return c, h, w
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.out_channels, h * f, w * f

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> "DiffusionModel":
        """Move every component (denoiser, VAE, text encoder) to ``device``, in place."""
        for m in (self.denoiser, self.vae, self.text_encoder):
            if m is not None:
                m.to(device)
        return self

    @torch.no_grad()
    def to_images(self, x: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Denoised samples → images in [−1, 1] on the CPU, float32. Latents are decoded as diffusers'
        pipelines do: ``vae.decode(x / vae.config.scaling_factor)`` (AutoencoderKL, and VQModel as in
        LDMPipeline); the VAE runs on x's device."""
        if self.vae is None:
            return x.clamp(-1, 1).float().cpu()
        vae = self.vae.to(x.device)
        dtype = next(vae.parameters()).dtype
        scale = vae.config.scaling_factor
        return torch.cat([vae.decode(part.to(dtype) / scale).sample.clamp(-1, 1).float().cpu()
                          for part in x.split(batch_size)])
