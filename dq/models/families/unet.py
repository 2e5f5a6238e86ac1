"""The UNet family: diffusers ``UNet2DModel`` (pixel and latent DDPMs, class-conditional ones with
``num_class_embeds``) and ``UNet2DConditionModel`` (text-conditional latent UNets). Everything dq
knows about these two classes is in this file.

Blocks follow the model's own structure (no patched model code): ``stem`` (time embedding + conv_in),
``down.{i}``, ``mid``, ``up.{i}``, ``head`` (norm_out, act, conv_out). A block's outputs are what
distillation compares: the stem's feature map and time embedding, a down block's hidden state and
every residual it pushes for the skip connections, the hidden state of mid / up blocks, and the
network output of the head. The block state and the cut into units are in unet_blocks.py.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch.nn as nn
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from dq.errors import DQError
from dq.models.attention import install_quant_attention
from dq.models.blocks import Block, check_granularity, whole_model
from dq.models.families import register
from dq.models.families.base import Conditioning, ModelFamily
from dq.models.families.unet_blocks import UNetState, block_units, concat_splits, module_units
from dq.quant.config import QuantConfig
from dq.quant.scaling import DilationGroup

FIRST_LAST = ("conv_in", "conv_out")
EMBEDDINGS = ("time_embedding", "class_embedding", "add_embedding")

# The embedded teacher (1.1M parameters, resolutions 16/8/4, attention at 8×8), google/ddpm-cifar10-32's
# architecture (35.7M) for benchmarks, and tiny ones for tests (thousands of parameters).
_D3, _U3 = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
_D2, _U2 = ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")
DIGITS = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
              down_block_types=_D3, up_block_types=_U3, norm_num_groups=8, attention_head_dim=16)
DDPM_CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    norm_eps=1e-6, attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
ARCHS: dict[str, tuple[type, dict[str, Any]]] = {
    "digits": (UNet2DModel, DIGITS),
    "ddpm_cifar10": (UNet2DModel, DDPM_CIFAR10),
    "unet2d": (UNet2DModel, dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
                                 layers_per_block=1, down_block_types=_D3, up_block_types=_U3, norm_num_groups=4,
                                 attention_head_dim=8)),
    "unet2d_class": (UNet2DModel, dict(  # class-conditional (class_labels), like LDM cin256's UNet
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=_D2, up_block_types=_U2, norm_num_groups=4, attention_head_dim=8, num_class_embeds=10)),
    "unet2d_latent": (UNet2DModel, dict(  # in a VQ autoencoder's 3-channel latent space (model=tiny_ldm)
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=_D2, up_block_types=_U2, norm_num_groups=8, attention_head_dim=8)),
    # real sizes, the denoisers of the stand-in pipelines (dq.models.components): LDM-4 LSUN-Bedroom (274M, in a
    # VQ-f4 64×64×3 latent space) and SD-1.5 (859.5M; diffusers' defaults are SD-1.x's)
    "ldm_bedroom_unet": (UNet2DModel, dict(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896), layers_per_block=2,
        attention_head_dim=32, down_block_types=("DownBlock2D", *("AttnDownBlock2D",) * 3),
        up_block_types=(*("AttnUpBlock2D",) * 3, "UpBlock2D"))),
    "sd15_unet": (UNet2DConditionModel, dict(sample_size=64, cross_attention_dim=768)),
    "unet2d_cond": (UNet2DConditionModel, dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8)),
}


def _skipped(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _affine_norm(m: nn.Module | None) -> bool:
    return isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None


class UNetFamily(ModelFamily):
    classes = (UNet2DModel, UNet2DConditionModel)
    archs = ARCHS

    def pipeline(self, model, scheduler):
        from diffusers import DDIMPipeline, LDMPipeline, StableDiffusionPipeline

        if isinstance(model.denoiser, UNet2DConditionModel):
            return StableDiffusionPipeline(**self.parts_of(model, "StableDiffusionPipeline", "vae", "text_encoder",
                                                           "tokenizer"), unet=model.denoiser, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if model.vae is not None:
            return LDMPipeline(vqvae=model.vae, unet=model.denoiser, scheduler=scheduler)
        return DDIMPipeline(unet=model.denoiser, scheduler=scheduler)

    # ------------------------------------------------------------------ calling the model
    def forward(self, model, x, t, cond=None):
        if cond is None:
            return model(x, t).sample
        if isinstance(cond, dict):
            return model(x, t, **cond).sample
        if isinstance(model, UNet2DConditionModel):
            return model(x, t, encoder_hidden_states=cond).sample
        return model(x, t, class_labels=cond).sample

    def timestep_of(self, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        return (kwargs["timestep"] if "timestep" in kwargs else args[1]), sample.shape[0]

    def sample_shape(self, model):
        c = model.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, size, size)

    def conditioning(self, model):
        if isinstance(model, UNet2DConditionModel):
            return Conditioning("text", dim=model.config.cross_attention_dim)
        if model.class_embedding is not None and model.config.num_class_embeds is not None:
            return Conditioning("class", num_classes=model.config.num_class_embeds)  # no null-class convention
        return None

    def initial_state(self, x, t, cond=None):
        if cond is not None and not cond.is_floating_point():  # integer class labels
            return UNetState(sample=x, timestep=t, class_labels=cond)
        return UNetState(sample=x, timestep=t, encoder_hidden_states=cond)

    # ------------------------------------------------------------------ quantization
    def layer_bits(self, name, layer, qcfg: QuantConfig):
        skip = qcfg.skip + (() if qcfg.quantize_time_embedding else EMBEDDINGS)
        if _skipped(name, skip):
            return None
        if name in FIRST_LAST and qcfg.first_last_bits is not None:
            return qcfg.first_last_bits, None if qcfg.a_bits is None else qcfg.first_last_bits
        return qcfg.w_bits, qcfg.a_bits

    def embedding_branch(self, name):
        return _skipped(name, EMBEDDINGS) or name.endswith(".time_emb_proj")

    def quantize_attention(self, model, qcfg: QuantConfig) -> None:
        if not qcfg.quantize_attention or qcfg.a_bits is None:
            return
        for name, attn in model.named_modules():
            if isinstance(attn, Attention) and not _skipped(name, qcfg.skip):
                install_quant_attention(name, attn, qcfg.a_bits, qcfg.prob_bits, qcfg.num_steps)

    def concat_splits(self, model) -> dict[str, tuple[int, int]]:
        return concat_splits(model)

    def skip_shortcuts(self, model) -> list[str]:
        return [n for n in concat_splits(model) if n.endswith(".conv_shortcut")]

    def dilation_groups(self, model) -> list[DilationGroup]:
        """Self-attention to_q/k/v share the hidden states (producer: Attention.group_norm, or norm1/norm2
        of a plain BasicTransformerBlock); in cross-attention to_k/to_v share encoder_hidden_states;
        norm3 → ff.net[0].proj; Transformer2DModel norm → proj_in. A producer is kept only when every
        consumer of its output is in the group. Every other layer is its own group."""
        from dq.quant.layers import iter_quant_layers

        layers = [n for n, m in iter_quant_layers(model) if m.act_quant is not None]
        groups: list[DilationGroup] = []
        claimed: set[str] = set()

        def add(names: list[str], producer: str | None) -> None:
            present = [n for n in names if n in layers and n not in claimed]
            if present:
                claimed.update(present)
                groups.append(DilationGroup(tuple(present), producer if len(present) == len(names) else None))

        def attention(p: str, attn: Attention, producer: str | None) -> None:
            if attn.spatial_norm is not None:
                producer = None
            elif attn.group_norm is not None:
                producer = f"{p}group_norm" if _affine_norm(attn.group_norm) else None
            if attn.is_cross_attention:
                add([f"{p}to_q"], producer)
                add([f"{p}to_k", f"{p}to_v"], None)
            else:
                add([f"{p}to_q", f"{p}to_k", f"{p}to_v"], producer)

        for name, m in model.named_modules():
            p = f"{name}." if name else ""
            if isinstance(m, BasicTransformerBlock):
                plain = m.norm_type == "layer_norm" and m.pos_embed is None
                norm = lambda n: f"{p}{n}" if plain and _affine_norm(getattr(m, n)) else None  # noqa: E731
                attention(f"{p}attn1.", m.attn1, norm("norm1"))
                if m.attn2 is not None:
                    attention(f"{p}attn2.", m.attn2, norm("norm2"))
                if hasattr(m.ff.net[0], "proj"):
                    add([f"{p}ff.net.0.proj"], norm("norm3"))
            elif isinstance(m, Attention):
                attention(p, m, None)  # not inside a transformer block (UNet2DModel)
            elif isinstance(m, Transformer2DModel) and m.is_input_continuous:
                add([f"{p}proj_in"], f"{p}norm" if isinstance(m.norm, nn.GroupNorm) and m.norm.affine else None)
        groups += [DilationGroup((n,), None) for n in layers if n not in claimed]
        return groups

    # ------------------------------------------------------------------ blocks
    def blocks(self, model, granularity: str = "block") -> list[Block]:
        check_granularity(granularity)
        unet, cond = model, isinstance(model, UNet2DConditionModel)
        if any(hasattr(b, "skip_conv") for b in [*unet.down_blocks, *unet.up_blocks]):
            raise DQError("UNets with skip-sample blocks (SkipDownBlock2D / AttnSkip*) are not supported")
        c = unet.config
        if cond and (c.addition_embed_type or c.class_embed_type or c.encoder_hid_dim_type):
            raise DQError("UNet2DConditionModel with class/addition embeddings or encoder_hid_proj is not supported yet")
        labels = not cond and unet.class_embedding is not None
        if labels and c.class_embed_type is not None:
            raise DQError(f"UNet2DModel with class_embed_type={c.class_embed_type!r} is not supported; "
                          f"supported: num_class_embeds with class_embed_type=None")
        if granularity == "model":
            return whole_model(unet, self.blocks(unet, "block"))

        def stem(s: UNetState) -> UNetState:
            t = s.timestep.to(s.sample.device).expand(s.sample.shape[0])  # a scalar or [B] timestep → [B]
            emb = unet.time_embedding(unet.time_proj(t).to(dtype=s.sample.dtype))
            if cond and unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)
            if labels:  # UNet2DModel adds the class embedding to the time embedding
                emb = emb + unet.class_embedding(s.class_labels.to(emb.device)).to(emb.dtype)
            h = unet.conv_in(s.sample)
            return replace(s, sample=h, emb=emb, res=(h,), new=(h, emb))

        def head(s: UNetState) -> UNetState:
            h = s.sample
            if unet.conv_norm_out is not None:
                h = unet.conv_act(unet.conv_norm_out(h))
            h = unet.conv_out(h)
            if not cond and c.time_embedding_type == "fourier":
                h = h / s.timestep.to(h.device).reshape(-1, *([1] * (h.dim() - 1)))
            return replace(s, sample=h, new=(h,))

        stem_modules = [unet.time_proj, unet.time_embedding, unet.conv_in]
        stem_modules += [unet.time_embed_act] if cond and unet.time_embed_act is not None else []
        stem_modules += [unet.class_embedding] if labels else []
        head_modules = [m for m in (unet.conv_norm_out, unet.conv_act, unet.conv_out) if m is not None]
        middle = module_units(unet) if granularity == "module" else block_units(unet)
        return [Block("stem", stem_modules, stem), *middle, Block("head", head_modules, head)]


register(UNetFamily())
