"""The DiT family: diffusers ``DiTTransformer2DModel`` (class-conditional latent transformer, adaLN-Zero).

Blocks: ``stem`` (patch embedding), ``blocks.{i}`` (each transformer block), ``head`` (adaLN final norm,
output projection, unpatchify). Module granularity splits a block into ``blocks.{i}.norm1`` (its
class+time embedding and adaLN Linear → the [B, 6, D] modulation), ``blocks.{i}.attn1`` and
``blocks.{i}.ff``. Block 0's class+time embedding also conditions the head (as in the model's forward),
so the state carries it and block 0's outputs include it.

Conditioning: class labels [B]; DiT's label embedding has one extra row (index num_classes) for the
null class of classifier-free guidance when it was trained with label dropout. The units embed labels
without diffusers' training-mode label dropout, so a student in train() sees the teacher's labels.

Weight Dilation: q/k/v of each block share one s; the MLP's first Linear has its own. Both read an
adaLN-modulated LayerNorm whose shift/scale are rows of the block's ``norm1.linear``: 1/s folds into
those rows exactly (``fold_scales``, after dq.quant.scaling has carried it as input_scale). The head's
``proj_out_2`` folds into ``proj_out_1``'s rows. Every other layer carries 1/s as its input_scale.
``pos_embed.proj`` and ``proj_out_2`` get first_last_bits; the per-block class+time embedding MLPs are
the conditioning embeddings (``quant.quantize_time_embedding``).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

from dq.errors import DQError
from dq.models.blocks import Block, check_granularity, whole_model
from dq.models.families import register
from dq.models.families.base import Conditioning, ModelFamily
from dq.models.families.transformer_blocks import (AdaFold, TokenState, attention_unit, batch_timesteps, check_block,
                                                   epsilon, fold_modulation, groups_of, layer_bits, mlp_unit,
                                                   quantize_attention, unpatchify)
from dq.quant.config import QuantConfig

FIRST_LAST = ("pos_embed.proj", "proj_out_2")

# DiT-XL/2 at 256 px (32×32×4 latents, learned variance: 8 output channels) for cost benchmarks; a tiny one for tests.
ARCHS = {
    "dit_xl2": (DiTTransformer2DModel, dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
        patch_size=2, num_embeds_ada_norm=1000)),
    "dit_tiny": (DiTTransformer2DModel, dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10)),
}


def _embedding(block, s: TokenState) -> torch.Tensor:
    """CombinedTimestepLabelEmbeddings(t, labels) of a block, without label dropout."""
    e = block.norm1.emb
    temb = e.timestep_embedder(e.time_proj(s.timestep).to(dtype=s.sample.dtype))
    return temb + e.class_embedder.embedding_table(s.labels)


def _modulation(i: int, block, s: TokenState) -> TokenState:
    emb = _embedding(block, s)
    mod = block.norm1.linear(block.norm1.silu(emb))
    mod = mod.view(mod.shape[0], 6, -1)
    if i == 0:
        return replace(s, emb=emb, mod=mod, new=(mod, emb))
    return replace(s, mod=mod, new=(mod,))


class DiTFamily(ModelFamily):
    classes = (DiTTransformer2DModel,)
    archs = ARCHS

    def pipeline(self, model, scheduler):
        from diffusers import DiTPipeline

        return DiTPipeline(transformer=model.denoiser, scheduler=scheduler, **self.parts_of(model, "DiTPipeline", "vae"))

    # ------------------------------------------------------------------ calling the model
    def forward(self, model, x, t, cond=None):
        t = batch_timesteps(t, x)
        if isinstance(cond, dict):
            out = model(x, timestep=t, **cond).sample
        else:
            out = model(x, timestep=t, class_labels=self._labels(cond, x)).sample
        return epsilon(out, model.config.in_channels)

    @staticmethod
    def _labels(cond, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or cond.dim() != 1 or cond.shape[0] != x.shape[0]:
            got = None if cond is None else tuple(getattr(cond, "shape", ()))
            raise DQError(f"DiTTransformer2DModel is class-conditional: cond must be class labels [B={x.shape[0]}], "
                          f"got {got}")
        return cond.to(device=x.device, dtype=torch.long)

    def timestep_of(self, args, kwargs):
        sample = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (kwargs["timestep"] if "timestep" in kwargs else args[1]), sample.shape[0]

    def sample_shape(self, model):
        c = model.config
        return (c.in_channels, c.sample_size, c.sample_size)

    def conditioning(self, model):
        table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        n = model.config.num_embeds_ada_norm
        return Conditioning("class", num_classes=n, null_class=n if table.num_embeddings > n else None)

    def initial_state(self, x, t, cond=None):
        return TokenState(sample=x, timestep=batch_timesteps(t, x), labels=self._labels(cond, x))

    # ------------------------------------------------------------------ quantization
    def layer_bits(self, name, layer, qcfg: QuantConfig):
        return layer_bits(name, qcfg, FIRST_LAST, embedding=".norm1.emb." in name)

    def embedding_branch(self, name):  # class+time embedding MLPs, adaLN Linears, the head's shift/scale
        return ".norm1.emb." in name or name.endswith(".norm1.linear") or name == "proj_out_1"

    def quantize_attention(self, model, qcfg: QuantConfig) -> None:
        quantize_attention(model, qcfg)

    def _folds(self, model) -> list[AdaFold]:
        folds = []
        for i in range(len(model.transformer_blocks)):
            p = f"transformer_blocks.{i}."
            folds.append(AdaFold((f"{p}attn1.to_q", f"{p}attn1.to_k", f"{p}attn1.to_v"), f"{p}norm1.linear", 6, 0, 1))
            folds.append(AdaFold((f"{p}ff.net.0.proj",), f"{p}norm1.linear", 6, 3, 4))
        folds.append(AdaFold(("proj_out_2",), "proj_out_1", 2, 0, 1))
        return folds

    def dilation_groups(self, model):
        return groups_of(model, [f.layers for f in self._folds(model)])

    def fold_scales(self, model, report=None) -> None:
        fold_modulation(model, self._folds(model), report)

    # ------------------------------------------------------------------ blocks
    def blocks(self, model, granularity: str = "block") -> list[Block]:
        check_granularity(granularity)
        for b in model.transformer_blocks:
            check_block(b, "ada_norm_zero")
        if granularity == "model":
            return whole_model(model, self.blocks(model, "block"))
        c = model.config
        out_channels = model.out_channels

        def stem(s: TokenState) -> TokenState:
            h = model.pos_embed(s.sample)
            return replace(s, sample=h, new=(h,))

        def head(s: TokenState) -> TokenState:
            shift, scale = model.proj_out_1(F.silu(s.emb)).chunk(2, dim=1)
            h = model.norm_out(s.sample) * (1 + scale[:, None]) + shift[:, None]
            out = unpatchify(model.proj_out_2(h), c.patch_size, out_channels)
            return replace(s, sample=out, new=(out,))

        units = [Block("stem", [model.pos_embed], stem)]
        for i, blk in enumerate(model.transformer_blocks):
            def norm1(s, i=i, blk=blk):
                return _modulation(i, blk, s)

            def attn1(s, blk=blk):
                h = attention_unit(blk, blk.norm1.norm, s.sample, s.mod)
                return replace(s, sample=h, new=(h,))

            def ff(s, blk=blk):
                h = mlp_unit(blk, blk.norm3, s.sample, s.mod)
                return replace(s, sample=h, mod=None, new=(h,))

            if granularity == "module":
                p = f"blocks.{i}."
                units += [Block(f"{p}norm1", [blk.norm1.emb, blk.norm1.linear], norm1),
                          Block(f"{p}attn1", [blk.norm1.norm, blk.attn1], attn1),
                          Block(f"{p}ff", [blk.norm3, blk.ff], ff)]
            else:
                def whole(s, i=i, norm1=norm1, attn1=attn1, ff=ff):
                    s = ff(attn1(norm1(s)))
                    return replace(s, new=(s.sample, s.emb) if i == 0 else (s.sample,))
                units.append(Block(f"blocks.{i}", [blk], whole))
        return units + [Block("head", [model.norm_out, model.proj_out_1, model.proj_out_2], head)]


register(DiTFamily())
