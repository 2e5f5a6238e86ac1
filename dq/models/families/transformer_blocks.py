"""Shared pieces of the transformer families (dit.py, pixart.py): the block state, the adaLN-modulated
sub-layers of diffusers' ``BasicTransformerBlock`` replayed as units, layer bits, and folding Weight
Dilation's 1/s into adaLN modulation rows.

The units replay ``BasicTransformerBlock.forward`` for the two adaLN norm types these families use
(``ada_norm_zero``: DiT, ``ada_norm_single``: PixArt) op for op, so chaining them equals the model's
forward bitwise (tests/test_transformer_families.py). A block's modulation is held as [B, 6, D]:
rows (shift, scale, gate) of the attention, then of the MLP — the layout of both norm types.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention

from dq.errors import DQError
from dq.models.attention import install_quant_attention
from dq.quant.config import QuantConfig
from dq.quant.scaling import DilationGroup

SHIFT_MSA, SCALE_MSA, GATE_MSA, SHIFT_MLP, SCALE_MLP, GATE_MLP = range(6)


@dataclass
class TokenState:
    """What flows between the units of a patch transformer (every tensor is batch-first)."""

    sample: torch.Tensor                  # x_t [B, C, H, W] before the stem, tokens [B, N, D], output after the head
    timestep: torch.Tensor                # [B] raw timesteps
    labels: torch.Tensor | None = None    # [B] class labels (DiT)
    encoder_hidden_states: torch.Tensor | None = None  # [B, L, D] text states (PixArt; projected by the stem)
    t_emb: torch.Tensor | None = None     # [B, 6D] adaLN-single timestep modulation shared by all blocks (PixArt)
    emb: torch.Tensor | None = None       # [B, D] the head's conditioning embedding
    mod: torch.Tensor | None = None       # [B, 6, D] the current block's modulation (between module units)
    new: tuple[torch.Tensor, ...] = field(default=())

    def detach(self) -> "TokenState":
        d = lambda t: None if t is None else t.detach().contiguous()  # noqa: E731
        return replace(self, sample=d(self.sample), timestep=d(self.timestep), labels=d(self.labels),
                       encoder_hidden_states=d(self.encoder_hidden_states), t_emb=d(self.t_emb), emb=d(self.emb),
                       mod=d(self.mod), new=tuple(d(n) for n in self.new))


def batch_timesteps(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    """Raw timesteps as a [B] tensor on x's device (diffusers' timestep embeddings need one per sample)."""
    t = torch.as_tensor(t, device=x.device)
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(1).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps of shape {tuple(t.shape)} for a batch of {x.shape[0]}")
    return t


def epsilon(out: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The ε part of a denoiser output: models with learned variance (out = 2 × in channels, as DiT-XL/2
    and PixArt) return [ε, v]; their pipelines keep the first half."""
    if out.shape[1] == 2 * in_channels:
        return out[:, :in_channels]
    if out.shape[1] != in_channels:
        raise DQError(f"denoiser returns {out.shape[1]} channels for {in_channels} input channels; "
                      f"expected {in_channels} (ε) or {2 * in_channels} (ε and learned variance)")
    return out


def unpatchify(h: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """[B, N, p·p·C] tokens of a square grid → [B, C, H, W] (as DiT / PixArt forward do)."""
    side = int(h.shape[1] ** 0.5)
    h = h.reshape(shape=(-1, side, side, patch, patch, channels))
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(shape=(-1, channels, side * patch, side * patch))


# ---------------------------------------------------------------------------- BasicTransformerBlock units
def attention_unit(block: nn.Module, norm: nn.Module, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """h + gate_msa · attn1(norm(h) · (1 + scale_msa) + shift_msa)."""
    shift, scale, gate = (mod[:, i:i + 1] for i in (SHIFT_MSA, SCALE_MSA, GATE_MSA))
    out = block.attn1(norm(h) * (1 + scale) + shift, encoder_hidden_states=None, attention_mask=None)
    return gate * out + h


def cross_attention_unit(block: nn.Module, h: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
    """h + attn2(h, ehs) (adaLN-single applies no norm before cross-attention)."""
    return block.attn2(h, encoder_hidden_states=ehs, attention_mask=None) + h


def mlp_unit(block: nn.Module, norm: nn.Module, h: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """h + gate_mlp · ff(norm(h) · (1 + scale_mlp) + shift_mlp)."""
    if block._chunk_size is not None:
        raise DQError("chunked feed-forward (set_chunk_feed_forward) is not supported; disable it before dq")
    shift, scale, gate = (mod[:, i:i + 1] for i in (SHIFT_MLP, SCALE_MLP, GATE_MLP))
    return gate * block.ff(norm(h) * (1 + scale) + shift) + h


def check_block(block: nn.Module, norm_type: str) -> None:
    if block.norm_type != norm_type or block.pos_embed is not None or block.only_cross_attention:
        raise DQError(f"transformer block with norm_type={block.norm_type!r}, pos_embed or only_cross_attention "
                      f"is not supported (expected {norm_type!r})")


# ---------------------------------------------------------------------------- quantization
def _skipped(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_bits(name: str, qcfg: QuantConfig, first_last: tuple[str, ...],
               embedding: bool) -> tuple[int, int | None] | None:
    """Bits of a layer: None when skipped (or a conditioning embedding and quantize_time_embedding is off),
    first_last_bits for the patch embedding and the output projection."""
    if _skipped(name, qcfg.skip) or (embedding and not qcfg.quantize_time_embedding):
        return None
    if name in first_last and qcfg.first_last_bits is not None:
        return qcfg.first_last_bits, None if qcfg.a_bits is None else qcfg.first_last_bits
    return qcfg.w_bits, qcfg.a_bits


def quantize_attention(model: nn.Module, qcfg: QuantConfig) -> None:
    if not qcfg.quantize_attention or qcfg.a_bits is None:
        return
    for name, attn in model.named_modules():
        if isinstance(attn, Attention) and not _skipped(name, qcfg.skip):
            install_quant_attention(name, attn, qcfg.a_bits, qcfg.prob_bits, qcfg.num_steps)


@dataclass(frozen=True)
class AdaFold:
    """Layers reading ``norm(h) · (1 + scale) + shift`` where (shift, scale) are chunks ``shift`` and
    ``scale`` of ``linear``'s output split in ``chunks``: their common 1/s folds into those rows."""

    layers: tuple[str, ...]
    linear: str
    chunks: int
    shift: int
    scale: int


def groups_of(model: nn.Module, shared: list[tuple[str, ...]]) -> list[DilationGroup]:
    """One DilationGroup per tuple of ``shared`` (the quantized layers among them), every other quantized
    layer alone; no producer (what folds is folded by :func:`fold_modulation`)."""
    from dq.quant.layers import iter_quant_layers

    layers = [n for n, m in iter_quant_layers(model) if m.act_quant is not None]
    groups, claimed = [], set()
    for names in shared:
        present = tuple(n for n in names if n in layers and n not in claimed)
        if present:
            claimed.update(present)
            groups.append(DilationGroup(present, None))
    return groups + [DilationGroup((n,), None) for n in layers if n not in claimed]


@torch.no_grad()
def fold_modulation(model: nn.Module, folds: list[AdaFold], report: list[dict] | None = None) -> None:
    """Move the consumers' common input_scale u = 1/s into the adaLN rows that make their input:
    shift → shift·u (rows and bias ×u); 1 + scale → (1 + scale)·u, i.e. rows ×u and bias b·u + u − 1.
    Exact in real arithmetic; the consumers' input_scale becomes 1 and the producer's weight quantizer
    is re-initialised (per output channel, so scaling a row scales its Δ_w: the same quantized function).
    Groups with a layer left in float, a bias-free producer or u = 1 keep their input_scale."""
    rows = {tuple(r["layers"]): r for r in report or []}
    for f in folds:
        mods = [model.get_submodule(n) for n in f.layers]
        lin = model.get_submodule(f.linear)
        if not all(hasattr(m, "input_scale") for m in mods) or lin.bias is None:
            continue
        u = mods[0].input_scale.detach().clone()
        if any(not torch.equal(m.input_scale, u) for m in mods[1:]):
            raise ValueError(f"{f.layers} have different input_scale; dilate them as one group")
        if bool((u == 1).all()):
            continue
        d = u.numel()
        if lin.weight.shape[0] != f.chunks * d:
            raise ValueError(f"{f.linear} has {lin.weight.shape[0]} outputs, expected {f.chunks} × {d}")
        w, b = lin.weight, lin.bias
        for j in (f.shift, f.scale):
            w[j * d:(j + 1) * d].mul_(u.to(w)[:, None])
            b[j * d:(j + 1) * d].mul_(u.to(b))
        b[f.scale * d:(f.scale + 1) * d].add_(u.to(b) - 1)
        for m in mods:
            m.input_scale.fill_(1.0)
        if hasattr(lin, "weight_quant"):
            lin.weight_quant.init_from(lin.weight)
        if f.layers in rows:
            rows[f.layers]["folded_into"] = f.linear
