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
from diffusers.models.transformers.transformer_2d import Transformer2DModel

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


GRANULARITIES = ("block", "module", "model")


def unet_blocks(unet: nn.Module, granularity: str = "block") -> list[Block]:
    """The UNet's blocks in network order (see module docstring).

    ``granularity="module"`` splits every down / mid / up block into its ResNets, attentions and
    resamplers ("down.1.resnets.0", "down.1.attentions.0", "down.1.downsamplers.0", ...): finer
    distillation units, replaying the block's own control flow (tested equal to the block forward).
    ``granularity="model"`` is one unit, the whole UNet against the teacher's output: full-model QAT
    (the paper's costly baseline) through the same distillation code.
    """
    if granularity not in GRANULARITIES:
        raise choice_error("distill.granularity", granularity, GRANULARITIES)
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

    head_modules = [m for m in (unet.conv_norm_out, unet.conv_act, unet.conv_out) if m is not None]

    def head(s: UNetState) -> UNetState:
        h = s.sample
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        h = unet.conv_out(h)
        if not cond and unet.config.time_embedding_type == "fourier":
            h = h / s.timestep.to(h.device).reshape(-1, *([1] * (h.dim() - 1)))
        return replace(s, sample=h, new=(h,))

    stem_modules = [unet.time_proj, unet.time_embedding, unet.conv_in]
    if cond and unet.time_embed_act is not None:
        stem_modules.append(unet.time_embed_act)
    blocks = [Block("stem", stem_modules, stem)]

    if granularity == "module":
        return blocks + _module_units(unet) + [Block("head", head_modules, head)]
    if granularity == "model":
        parts = unet_blocks(unet, "block")
        return [Block("model", [unet], lambda s: run_blocks(parts, s, len(parts) - 1))]

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

    blocks.append(Block("head", head_modules, head))
    return blocks


def _attend(attn: nn.Module, s: UNetState) -> torch.Tensor:
    """One attention unit as its parent block calls it: Transformer2DModel (cross-attention blocks)
    returns a tuple; a plain Attention gets the time embedding (used only by spatial norms)."""
    if isinstance(attn, Transformer2DModel):
        return attn(s.sample, encoder_hidden_states=s.encoder_hidden_states, return_dict=False)[0]
    return attn(s.sample, temb=s.emb)


def _module_units(unet: nn.Module) -> list[Block]:
    """Down / mid / up blocks split into ResNets, attentions and resamplers (granularity "module")."""
    units: list[Block] = []

    def resnet_unit(name: str, resnet: nn.Module, push: bool, pop: bool) -> Block:
        def f(s: UNetState) -> UNetState:
            res = s.res
            h = s.sample
            if pop:  # up blocks concatenate the matching skip tensor first
                h, res = torch.cat([h, res[-1]], dim=1), res[:-1]
            h = resnet(h, s.emb)
            return replace(s, sample=h, res=res + ((h,) if push else ()), new=(h,))
        return Block(name, [resnet], f)

    def attn_unit(name: str, attn: nn.Module, push: bool) -> Block:
        def f(s: UNetState) -> UNetState:
            h = _attend(attn, s)
            return replace(s, sample=h, res=s.res + ((h,) if push else ()), new=(h,))
        return Block(name, [attn], f)

    def resample_unit(name: str, block: nn.Module, sampler: nn.Module, push: bool) -> Block:
        takes_temb = getattr(block, "downsample_type", getattr(block, "upsample_type", None)) == "resnet"

        def f(s: UNetState) -> UNetState:
            h = sampler(s.sample, temb=s.emb) if takes_temb else sampler(s.sample)
            return replace(s, sample=h, res=s.res + ((h,) if push else ()), new=(h,))
        return Block(name, [sampler], f)

    for i, down in enumerate(unet.down_blocks):
        attns = list(getattr(down, "attentions", None) or [])
        for j, resnet in enumerate(down.resnets):
            units.append(resnet_unit(f"down.{i}.resnets.{j}", resnet, push=not attns, pop=False))
            if attns:
                units.append(attn_unit(f"down.{i}.attentions.{j}", attns[j], push=True))
        for j, ds in enumerate(down.downsamplers or []):
            units.append(resample_unit(f"down.{i}.downsamplers.{j}", down, ds, push=True))
    if unet.mid_block is not None:
        mid = unet.mid_block
        units.append(resnet_unit("mid.resnets.0", mid.resnets[0], push=False, pop=False))
        for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            if attn is not None:
                units.append(attn_unit(f"mid.attentions.{j}", attn, push=False))
            units.append(resnet_unit(f"mid.resnets.{j + 1}", resnet, push=False, pop=False))
    for i, up in enumerate(unet.up_blocks):
        attns = list(getattr(up, "attentions", None) or [])
        for j, resnet in enumerate(up.resnets):
            units.append(resnet_unit(f"up.{i}.resnets.{j}", resnet, push=False, pop=True))
            if attns:
                units.append(attn_unit(f"up.{i}.attentions.{j}", attns[j], push=False))
        for j, us in enumerate(up.upsamplers or []):
            units.append(resample_unit(f"up.{i}.upsamplers.{j}", up, us, push=False))
    return units


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
