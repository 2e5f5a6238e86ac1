"""A diffusers UNet as a chain of blocks, for block-wise distillation.

Blocks follow the model's own structure (no patched model code): ``stem`` (time embedding +
conv_in), ``down.{i}``, ``mid``, ``up.{i}``, ``head`` (norm_out, act, conv_out). Each block maps a
``UNetState`` to the next; running all blocks in order equals ``unet(x, t).sample`` exactly (tested).
A block's ``outputs`` are what distillation compares: the stem's feature map and time embedding, a
down block's hidden state and every residual it emits for the skip connections, the hidden state
of mid / up blocks, and the network output of the head.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel, UNet2DModel

from dq.errors import DQError, choice_error


@dataclass
class UNetState:
    """What flows between blocks. ``res`` is the stack of skip tensors the down blocks pushed."""

    sample: torch.Tensor                       # [B, C, H, W] hidden state (x_t before the stem)
    timestep: torch.Tensor                     # [B] raw timesteps
    emb: torch.Tensor | None = None            # [B, D] time embedding, set by the stem
    res: tuple[torch.Tensor, ...] = ()         # skip tensors, pushed by stem/down, popped by up
    encoder_hidden_states: torch.Tensor | None = None  # [B, L, D] for conditional UNets
    new: tuple[torch.Tensor, ...] = field(default=())   # this block's outputs for the loss

    def detach(self) -> "UNetState":
        """A gradient-free copy whose tensors are contiguous. Contiguity is not cosmetic: attention blocks
        emit channels-last strided maps, and torch 2.13 on CPU segfaults in the backward of a
        GroupNorm→SiLU→Conv2d resnet fed such a map as a non-grad leaf (tests/test_blocks.py)."""
        d = lambda t: None if t is None else t.detach().contiguous()  # noqa: E731
        return replace(self, sample=d(self.sample), emb=d(self.emb), res=tuple(d(r) for r in self.res),
                       new=tuple(d(n) for n in self.new), encoder_hidden_states=d(self.encoder_hidden_states))


@dataclass
class Block:
    name: str
    modules: list[nn.Module]                  # whose parameters this block owns
    fn: Callable[[UNetState], UNetState]

    def __call__(self, state: UNetState) -> UNetState:
        return self.fn(state)

    def parameters(self):
        for m in self.modules:
            yield from m.parameters()


def _is_cross(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def unet_blocks(unet: nn.Module) -> list[Block]:
    """The UNet's blocks in network order (see module docstring)."""
    if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        raise DQError(f"block-wise distillation supports UNet2DModel and UNet2DConditionModel, not {type(unet).__name__}")
    cond = isinstance(unet, UNet2DConditionModel)
    if any(hasattr(b, "skip_conv") for b in [*unet.down_blocks, *unet.up_blocks]):
        raise DQError("UNets with skip-sample blocks (SkipDownBlock2D / AttnSkip*) are not supported")
    if cond and (unet.config.addition_embed_type or unet.config.class_embed_type or unet.config.encoder_hid_dim_type):
        raise DQError("UNet2DConditionModel with class/addition embeddings or encoder_hid_proj is not supported yet")
    if not cond and unet.class_embedding is not None:
        raise DQError("class-conditional UNet2DModel is not supported yet")

    def stem(s: UNetState) -> UNetState:
        t = s.timestep.to(s.sample.device) * torch.ones(s.sample.shape[0], dtype=s.timestep.dtype,
                                                        device=s.sample.device)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=s.sample.dtype))
        if cond and unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        h = unet.conv_in(s.sample)
        return replace(s, sample=h, emb=emb, res=(h,), new=(h, emb))

    stem_modules = [unet.time_proj, unet.time_embedding, unet.conv_in]
    if cond and unet.time_embed_act is not None:
        stem_modules.append(unet.time_embed_act)
    blocks = [Block("stem", stem_modules, stem)]

    for i, down in enumerate(unet.down_blocks):
        def f(s: UNetState, down=down) -> UNetState:
            if _is_cross(down):
                h, res = down(hidden_states=s.sample, temb=s.emb, encoder_hidden_states=s.encoder_hidden_states)
            else:
                h, res = down(hidden_states=s.sample, temb=s.emb)
            return replace(s, sample=h, res=s.res + tuple(res), new=(h, *res))
        blocks.append(Block(f"down.{i}", [down], f))

    if unet.mid_block is not None:
        mid = unet.mid_block

        def fm(s: UNetState) -> UNetState:
            if _is_cross(mid):
                h = mid(s.sample, s.emb, encoder_hidden_states=s.encoder_hidden_states)
            else:
                h = mid(s.sample, s.emb)
            return replace(s, sample=h, new=(h,))
        blocks.append(Block("mid", [mid], fm))

    for i, up in enumerate(unet.up_blocks):
        def fu(s: UNetState, up=up) -> UNetState:
            n = len(up.resnets)
            res, rest = s.res[-n:], s.res[:-n]
            if _is_cross(up):
                h = up(hidden_states=s.sample, temb=s.emb, res_hidden_states_tuple=res,
                       encoder_hidden_states=s.encoder_hidden_states)
            else:
                h = up(hidden_states=s.sample, temb=s.emb, res_hidden_states_tuple=res)
            return replace(s, sample=h, res=rest, new=(h,))
        blocks.append(Block(f"up.{i}", [up], fu))

    head_modules = [m for m in (unet.conv_norm_out, unet.conv_act, unet.conv_out) if m is not None]

    def head(s: UNetState) -> UNetState:
        h = s.sample
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        h = unet.conv_out(h)
        if not cond and unet.config.time_embedding_type == "fourier":
            h = h / s.timestep.to(h.device).reshape(-1, *([1] * (h.dim() - 1)))
        return replace(s, sample=h, new=(h,))

    blocks.append(Block("head", head_modules, head))
    return blocks


def select_blocks(blocks: list[Block], names: list[str] | None) -> list[int]:
    """Indices of the named blocks (all when ``names`` is empty), validated against the model's blocks."""
    known = [b.name for b in blocks]
    if not names:
        return list(range(len(blocks)))
    bad = [n for n in names if n not in known]
    if bad:
        raise choice_error("block name", bad[0], known)
    return sorted(known.index(n) for n in names)


def run_blocks(blocks: list[Block], state: UNetState, upto: int) -> UNetState:
    """Run blocks[0..upto] (inclusive) from ``state``."""
    for b in blocks[: upto + 1]:
        state = b(state)
    return state
