"""The PixArt family: diffusers ``PixArtTransformer2DModel`` (text-conditional latent transformer, adaLN-single).

Blocks: ``stem`` (patch embedding, the adaLN-single timestep embedding shared by all blocks, the caption
projection of the text states), ``blocks.{i}`` (each transformer block), ``head`` (final adaLN norm with
the model's scale_shift_table, output projection, unpatchify). Module granularity splits a block into
``blocks.{i}.attn1`` (self-attention; owns the block's scale_shift_table), ``blocks.{i}.attn2``
(cross-attention) and ``blocks.{i}.ff``. The MLP unit reads the table's MLP rows (3..5): they train with
it, while the attention rows get zero gradient there (and a fresh Adam state: BKD drops the state of
parameters outside the unit), so a finished unit's function does not move.

Conditioning: encoder hidden states [B, L, caption_channels]. Models without micro-conditioning get
added_cond_kwargs {resolution: None, aspect_ratio: None}; micro-conditioned ones (PixArt-α 1024-MS) need
a resolution and aspect ratio per image, which dq does not supply yet (a one-line error says so).

Weight Dilation: self-attention q/k/v share one s; cross-attention k/v (the projected text) share one;
the cross-attention q and the MLP's first Linear each have their own. Nothing folds: a block's shift/scale
are its scale_shift_table plus the adaLN-single output shared by every block (and the head's modulation
shares the embedded timestep with adaln_single.linear), so a per-block 1/s has no exclusive producer;
every layer carries 1/s as its input_scale. ``pos_embed.proj`` and ``proj_out`` get first_last_bits.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from diffusers import PixArtTransformer2DModel

from dq.errors import DQError
from dq.models.blocks import Block, check_granularity, whole_model
from dq.models.families import register
from dq.models.families.base import Conditioning, ModelFamily
from dq.models.families.transformer_blocks import (TokenState, attention_unit, batch_timesteps, check_block,
                                                   cross_attention_unit, epsilon, groups_of, layer_bits, mlp_unit,
                                                   quantize_attention, unpatchify)
from dq.quant.config import QuantConfig

FIRST_LAST = ("pos_embed.proj", "proj_out")
EMBEDDINGS = ("adaln_single.emb", "caption_projection")

ARCHS = {
    "pixart_tiny": (PixArtTransformer2DModel, dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12)),
}


def _added_cond_kwargs(model) -> dict:
    if model.use_additional_conditions:
        raise DQError("micro-conditioned PixArt (use_additional_conditions=True, e.g. PixArt-α 1024-MS) needs a "
                      "resolution and aspect ratio per image, which dq does not supply yet; use a model without "
                      "micro-conditioning (PixArt-α 256/512)")
    return {"resolution": None, "aspect_ratio": None}


def _text(cond, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3 or cond.shape[0] != x.shape[0]:
        got = None if cond is None else tuple(getattr(cond, "shape", ()))
        raise DQError(f"PixArtTransformer2DModel is text-conditional: cond must be encoder hidden states "
                      f"[B={x.shape[0]}, L, D], got {got}")
    return cond


def _block_mod(blk, s: TokenState) -> torch.Tensor:
    return blk.scale_shift_table[None] + s.t_emb.reshape(s.t_emb.shape[0], 6, -1)


class PixArtFamily(ModelFamily):
    classes = (PixArtTransformer2DModel,)
    archs = ARCHS

    # ------------------------------------------------------------------ calling the model
    def pipeline(self, model, scheduler):
        from diffusers import PixArtAlphaPipeline

        return PixArtAlphaPipeline(transformer=model.denoiser, scheduler=scheduler,
                                   **self.parts_of(model, "PixArtAlphaPipeline", "vae", "text_encoder", "tokenizer"))

    def forward(self, model, x, t, cond=None):
        t = batch_timesteps(t, x)
        if isinstance(cond, dict):
            out = model(x, timestep=t, **{"added_cond_kwargs": _added_cond_kwargs(model), **cond}).sample
        else:
            out = model(x, encoder_hidden_states=_text(cond, x), timestep=t,
                        added_cond_kwargs=_added_cond_kwargs(model)).sample
        return epsilon(out, model.config.in_channels)

    def timestep_of(self, args, kwargs):
        sample = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (kwargs["timestep"] if "timestep" in kwargs else args[2]), sample.shape[0]

    def sample_shape(self, model):
        c = model.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def conditioning(self, model):
        c = model.config
        return Conditioning("text", dim=c.caption_channels if c.caption_channels is not None else c.cross_attention_dim)

    def initial_state(self, x, t, cond=None):
        return TokenState(sample=x, timestep=batch_timesteps(t, x), encoder_hidden_states=_text(cond, x))

    # ------------------------------------------------------------------ quantization
    def layer_bits(self, name, layer, qcfg: QuantConfig):
        return layer_bits(name, qcfg, FIRST_LAST, embedding=any(name.startswith(p + ".") for p in EMBEDDINGS))

    def embedding_branch(self, name):  # timestep embedding MLP + adaLN-single Linear, the caption projection
        return name.startswith(("adaln_single.", "caption_projection."))

    def quantize_attention(self, model, qcfg: QuantConfig) -> None:
        quantize_attention(model, qcfg)

    def dilation_groups(self, model):
        shared = []
        for i in range(len(model.transformer_blocks)):
            p = f"transformer_blocks.{i}."
            shared += [(f"{p}attn1.to_q", f"{p}attn1.to_k", f"{p}attn1.to_v"), (f"{p}attn2.to_k", f"{p}attn2.to_v")]
        return groups_of(model, shared)

    def fold_scales(self, model, report=None) -> None:
        """Nothing folds (see the module docstring): every group keeps its input_scale."""

    # ------------------------------------------------------------------ blocks
    def blocks(self, model, granularity: str = "block") -> list[Block]:
        check_granularity(granularity)
        for b in model.transformer_blocks:
            check_block(b, "ada_norm_single")
        if granularity == "model":
            return whole_model(model, self.blocks(model, "block"))
        c = model.config
        added = _added_cond_kwargs(model)

        def stem(s: TokenState) -> TokenState:
            h = model.pos_embed(s.sample)
            b = h.shape[0]
            t_emb, emb = model.adaln_single(s.timestep, added, batch_size=b, hidden_dtype=h.dtype)
            ehs = s.encoder_hidden_states
            if model.caption_projection is not None:
                ehs = model.caption_projection(ehs).view(b, -1, h.shape[-1])
            return replace(s, sample=h, t_emb=t_emb, emb=emb, encoder_hidden_states=ehs, new=(h, t_emb, emb, ehs))

        def head(s: TokenState) -> TokenState:
            shift, scale = (model.scale_shift_table[None] + s.emb[:, None]).chunk(2, dim=1)
            h = model.norm_out(s.sample) * (1 + scale) + shift
            out = unpatchify(model.proj_out(h).squeeze(1), c.patch_size, model.out_channels)
            return replace(s, sample=out, new=(out,))

        table = nn.Module()  # the head owns the model-level scale_shift_table
        table.register_parameter("scale_shift_table", model.scale_shift_table)
        stem_modules = [m for m in (model.pos_embed, model.adaln_single, model.caption_projection) if m is not None]
        units = [Block("stem", stem_modules, stem)]
        for i, blk in enumerate(model.transformer_blocks):
            def attn1(s, blk=blk):
                h = attention_unit(blk, blk.norm1, s.sample, _block_mod(blk, s))
                return replace(s, sample=h, new=(h,))

            def attn2(s, blk=blk):
                h = cross_attention_unit(blk, s.sample, s.encoder_hidden_states)
                return replace(s, sample=h, new=(h,))

            def ff(s, blk=blk):
                h = mlp_unit(blk, blk.norm2, s.sample, _block_mod(blk, s))
                return replace(s, sample=h, new=(h,))

            if granularity == "module":
                own = nn.Module()
                own.register_parameter("scale_shift_table", blk.scale_shift_table)
                p = f"blocks.{i}."
                units += [Block(f"{p}attn1", [own, blk.norm1, blk.attn1], attn1),
                          *([Block(f"{p}attn2", [blk.attn2], attn2)] if blk.attn2 is not None else []),
                          Block(f"{p}ff", [blk.norm2, blk.ff], ff)]
            else:
                cross = attn2 if blk.attn2 is not None else (lambda s: s)
                units.append(Block(f"blocks.{i}", [blk], lambda s, a=attn1, x=cross, f=ff: f(x(a(s)))))
        return units + [Block("head", [model.norm_out, model.proj_out, table], head)]


register(PixArtFamily())
