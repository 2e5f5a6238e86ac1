"""The UNet family's block states and how its down / mid / up blocks are cut into distillation units (the
family itself, dq/models/families/unet.py, picks which cut): whole blocks, or each block's ResNets,
attentions and resamplers replaying the block's own control flow (tested equal to the block forward)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from dq.models.blocks import Block


@dataclass
class UNetState:
    """What flows between blocks. ``res`` is the stack of skip tensors the down blocks pushed."""

    sample: torch.Tensor                       # [B, C, H, W] hidden state (x_t before the stem)
    timestep: torch.Tensor                     # [B] raw timesteps
    emb: torch.Tensor | None = None            # [B, D] time embedding, set by the stem
    res: tuple[torch.Tensor, ...] = ()         # skip tensors, pushed by stem/down, popped by up
    encoder_hidden_states: torch.Tensor | None = None  # [B, L, D] for text-conditional UNets
    class_labels: torch.Tensor | None = None           # [B] integer labels for class-conditional UNets
    new: tuple[torch.Tensor, ...] = field(default=())   # this block's outputs for the loss

    def detach(self) -> "UNetState":
        """A gradient-free copy whose tensors are contiguous. Contiguity is not cosmetic: attention blocks
        emit channels-last strided maps, and torch 2.13 on CPU segfaults in the backward of a
        GroupNorm→SiLU→Conv2d resnet fed such a map as a non-grad leaf (tests/test_blocks.py)."""
        d = lambda t: None if t is None else t.detach().contiguous()  # noqa: E731
        return replace(self, sample=d(self.sample), emb=d(self.emb), res=tuple(d(r) for r in self.res),
                       new=tuple(d(n) for n in self.new), encoder_hidden_states=d(self.encoder_hidden_states),
                       class_labels=d(self.class_labels))



def _cross_kwargs(block: nn.Module, s: UNetState) -> dict[str, Any]:
    return {"encoder_hidden_states": s.encoder_hidden_states} if getattr(block, "has_cross_attention", False) else {}


def block_units(unet: nn.Module) -> list[Block]:
    units = []
    for i, down in enumerate(unet.down_blocks):
        def f(s: UNetState, down=down) -> UNetState:
            h, res = down(hidden_states=s.sample, temb=s.emb, **_cross_kwargs(down, s))
            return replace(s, sample=h, res=s.res + tuple(res), new=(h, *res))
        units.append(Block(f"down.{i}", [down], f))
    if unet.mid_block is not None:
        mid = unet.mid_block

        def fm(s: UNetState) -> UNetState:
            h = mid(s.sample, s.emb, **_cross_kwargs(mid, s))
            return replace(s, sample=h, new=(h,))
        units.append(Block("mid", [mid], fm))
    for i, up in enumerate(unet.up_blocks):
        def fu(s: UNetState, up=up) -> UNetState:
            n = len(up.resnets)
            h = up(hidden_states=s.sample, temb=s.emb, res_hidden_states_tuple=s.res[-n:], **_cross_kwargs(up, s))
            return replace(s, sample=h, res=s.res[:-n], new=(h,))
        units.append(Block(f"up.{i}", [up], fu))
    return units


def module_units(unet: nn.Module) -> list[Block]:
    """Down / mid / up blocks split into ResNets, attentions and resamplers, replaying each block's
    own control flow (tested equal to the block forward)."""
    def resnet(name: str, m: nn.Module, push: bool, pop: bool) -> Block:
        def f(s: UNetState) -> UNetState:
            h, res = s.sample, s.res
            if pop:  # up blocks concatenate the matching skip tensor first
                h, res = torch.cat([h, res[-1]], dim=1), res[:-1]
            h = m(h, s.emb)
            return replace(s, sample=h, res=res + ((h,) if push else ()), new=(h,))
        return Block(name, [m], f)

    def attention(name: str, m: nn.Module, push: bool) -> Block:
        def f(s: UNetState) -> UNetState:
            if isinstance(m, Transformer2DModel):  # cross-attention blocks; returns a tuple
                h = m(s.sample, encoder_hidden_states=s.encoder_hidden_states, return_dict=False)[0]
            else:  # a plain Attention gets the time embedding (used only by spatial norms)
                h = m(s.sample, temb=s.emb)
            return replace(s, sample=h, res=s.res + ((h,) if push else ()), new=(h,))
        return Block(name, [m], f)

    def resample(name: str, block: nn.Module, m: nn.Module, push: bool) -> Block:
        takes_temb = getattr(block, "downsample_type", getattr(block, "upsample_type", None)) == "resnet"

        def f(s: UNetState) -> UNetState:
            h = m(s.sample, temb=s.emb) if takes_temb else m(s.sample)
            return replace(s, sample=h, res=s.res + ((h,) if push else ()), new=(h,))
        return Block(name, [m], f)

    units: list[Block] = []
    for i, down in enumerate(unet.down_blocks):
        attns = list(getattr(down, "attentions", None) or [])
        for j, r in enumerate(down.resnets):
            units.append(resnet(f"down.{i}.resnets.{j}", r, push=not attns, pop=False))
            if attns:
                units.append(attention(f"down.{i}.attentions.{j}", attns[j], push=True))
        units += [resample(f"down.{i}.downsamplers.{j}", down, d, True) for j, d in enumerate(down.downsamplers or [])]
    if unet.mid_block is not None:
        mid = unet.mid_block
        units.append(resnet("mid.resnets.0", mid.resnets[0], push=False, pop=False))
        for j, (a, r) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            if a is not None:
                units.append(attention(f"mid.attentions.{j}", a, push=False))
            units.append(resnet(f"mid.resnets.{j + 1}", r, push=False, pop=False))
    for i, up in enumerate(unet.up_blocks):
        attns = list(getattr(up, "attentions", None) or [])
        for j, r in enumerate(up.resnets):
            units.append(resnet(f"up.{i}.resnets.{j}", r, push=False, pop=True))
            if attns:
                units.append(attention(f"up.{i}.attentions.{j}", attns[j], push=False))
        units += [resample(f"up.{i}.upsamplers.{j}", up, u, False) for j, u in enumerate(up.upsamplers or [])]
    return units


def concat_splits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Each up-path resnet reads cat([hidden states, skip]) (diffusers' up blocks concatenate in that
    order): its conv1 (after norm + SiLU, same channel layout) and conv_shortcut (the raw concatenation)
    → (hidden channels, skip channels). The skips are what the down path pushed (conv_in, each down
    resnet, each downsampler), consumed last-in first-out as the UNet's forward does."""
    skips = [model.conv_in.out_channels]
    for block in model.down_blocks:
        skips += [r.out_channels for r in block.resnets]
        skips += [d.out_channels for d in (block.downsamplers or [])]
    out: dict[str, tuple[int, int]] = {}
    for i, block in enumerate(model.up_blocks):
        for j, resnet in enumerate(block.resnets):
            if not skips:
                raise ValueError(f"up_blocks.{i}.resnets.{j} has no skip left to read; this UNet's layout is not understood")
            c_skip = skips.pop()
            c_hidden = resnet.in_channels - c_skip
            if c_hidden < 1:
                raise ValueError(f"up_blocks.{i}.resnets.{j} reads {resnet.in_channels} channels, fewer than its "
                                 f"{c_skip}-channel skip; this UNet's layout is not understood")
            for layer in ("conv1", "conv_shortcut"):
                if getattr(resnet, layer, None) is not None:
                    out[f"up_blocks.{i}.resnets.{j}.{layer}"] = (c_hidden, c_skip)
    if skips:
        raise ValueError(f"{len(skips)} skip connections are not read by any up block; this UNet's layout is not understood")
    return out
