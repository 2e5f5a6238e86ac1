"""Conditioning inputs for conditional UNets when no text encoder is configured.

A text-conditional denoiser consumes encoder hidden states [B, L, D]. Without a text encoder (tests,
tiny models) each image index gets a fixed Gaussian "prompt embedding" drawn from (seed, index), and
the unconditional embedding is zeros — enough to exercise cross-attention and classifier-free
guidance end to end.
"""
from __future__ import annotations

from typing import Callable

import torch

from dq.models.load import DiffusionModel

PROMPT_TOKENS = 8


def cond_fn_for(teacher: DiffusionModel, seed: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """``indices -> (cond, uncond)`` for a conditional teacher, None for an unconditional one."""
    spec = teacher.conditioning
    if spec is None:
        return None
    if spec.kind != "text":
        raise NotImplementedError(f"{spec.kind}-conditional teachers are not wired into calibration/sampling yet")
    dim = spec.dim

    def fn(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = torch.stack([torch.randn(PROMPT_TOKENS, dim, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + int(i) + 17)) for i in indices])
        return cond, torch.zeros_like(cond)

    return fn
