"""The interface of a model family: everything dq needs to know about one kind of diffusers denoiser.

A family is one file in this folder that subclasses :class:`ModelFamily` and registers itself for the
diffusers classes it knows (``dq.models.families.register``). Nothing else in dq names a model class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dq.errors import DQError
from dq.models.blocks import Block
from dq.quant.config import QuantConfig
from dq.quant.scaling import DilationGroup


@dataclass(frozen=True)
class Conditioning:
    """What a denoiser is conditioned on (``ModelFamily.conditioning``).

    kind "text": encoder hidden states [B, L, dim] (from the pipeline's text encoder, or a stand-in);
    kind "class": integer class labels [B] in 0..num_classes-1; ``null_class`` is the label the model
    was trained to read as "no class" (classifier-free guidance), None when it has none.
    """

    kind: str
    dim: int | None = None
    num_classes: int | None = None
    null_class: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("text", "class"):
            raise ValueError(f"Conditioning.kind={self.kind!r}; valid: text, class")


class ModelFamily:
    """Override every method; the docstrings are the contract."""

    #: the diffusers classes this family handles
    classes: tuple[type, ...] = ()
    #: named random-init architectures: name → (class, constructor kwargs) (``model=tiny_*``, benchmarks)
    archs: dict[str, tuple[type, dict[str, Any]]] = {}

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        """ε-prediction [B, C, H, W] for x_t [B, C, H, W] at raw timesteps t ([B] or scalar); ``cond`` is
        None, a tensor (the family's conditioning input) or a dict of extra keyword arguments."""
        raise NotImplementedError

    def pipeline(self, model: Any, scheduler: Any) -> Any:
        """The diffusers pipeline of ``model`` (a DiffusionModel: denoiser and, where it has them, vae,
        text_encoder, tokenizer) sampling with ``scheduler``; a one-line DQError where a part is missing."""
        raise NotImplementedError

    @staticmethod
    def parts_of(model: Any, pipeline: str, *roles: str) -> dict[str, Any]:
        """{role: part} of ``model`` for a diffusers ``pipeline``, or the one-line error naming what is missing."""
        missing = [r for r in roles if getattr(model, r) is None]
        if missing:
            raise DQError(f"a {pipeline} needs the model's {', '.join(missing)}; load a pipeline folder or an "
                          f"export that carries them")
        return {r: getattr(model, r) for r in roles}

    def timestep_of(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor | int, int]:
        """(timestep argument, batch size) of a call ``model(*args, **kwargs)`` (the TPQ hook reads it)."""
        raise NotImplementedError

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of one sample in the space the model denoises."""
        raise NotImplementedError

    def conditioning(self, model: nn.Module) -> Conditioning | None:
        """What the model is conditioned on (None: unconditional)."""
        raise NotImplementedError

    def layer_bits(self, name: str, layer: nn.Module, qcfg: QuantConfig) -> tuple[int, int | None] | None:
        """(w_bits, a_bits) of a Conv2d / Linear, or None to keep it in float."""
        raise NotImplementedError

    def embedding_branch(self, name: str) -> bool:
        """True for a layer that reads only the conditioning embedding (timestep / class / prompt), not
        the image: its input activations stay float when ``quant.quantize_embedding_acts`` is off."""
        return False

    def quantize_attention(self, model: nn.Module, qcfg: QuantConfig) -> None:
        """Install the attention processors that quantize q, k, v and the probabilities (in place)."""
        raise NotImplementedError

    def concat_splits(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """Layers that read a concatenation of separately produced tensors → channels per part, in order
        (``quant.split_concat``). None in a family without such layers."""
        return {}

    def skip_shortcuts(self, model: nn.Module) -> list[str]:
        """Layers that read a raw skip concatenation (no normalization before them): where 4-bit
        activations cost most in a UNet (docs/w4a4_gap.md); ``quant.lowrank_scope=skip_shortcuts``."""
        return []

    def dilation_groups(self, model: nn.Module) -> list[DilationGroup]:
        """Quantized layers grouped by the input they read, with the producer that can absorb 1/s."""
        raise NotImplementedError

    def fold_scales(self, model: nn.Module, report: list[dict] | None = None) -> None:
        """After WD / SmoothQuant: fold input_scales that no DilationGroup producer could take (e.g. into
        adaLN modulation rows), exactly, updating the report rows' ``folded_into``. Default: nothing."""

    def blocks(self, model: nn.Module, granularity: str = "block") -> list[Block]:
        """The model's distillation units in network order (granularity: block | module | model)."""
        raise NotImplementedError

    def initial_state(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> Any:
        """The state the first block takes (x_t, raw timesteps [B], conditioning)."""
        raise NotImplementedError
