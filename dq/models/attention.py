"""Attention processor that fake-quantizes the inputs of the two attention matmuls.

Mirrors diffusers' ``AttnProcessor2_0.__call__`` (spatial_norm, group_norm, norm_cross, norm_q/k,
masks, residual_connection, rescale_output_factor) but computes attention explicitly so the
operands can be quantized:

    S = Q_q(q) · Q_k(k)ᵀ · attn.scale (+ mask);  P = softmax(S);  O = Q_p(P) · Q_v(v)

(in blocks of query rows when the [B, H, N, S] scores would be large: under no_grad one block at a time;
in training each block checkpointed, recomputed in backward with the same TPQ rows, so a long sequence never
holds its whole scores, softmax and quantized probabilities for backward)

with per-step-per-head TemporalActQuantizers ([T, H] tables, q/k/v/P in the [B, H, N, d] layout).
The processor is an nn.Module, so ``Attention.set_processor`` registers it as the submodule
``processor`` and its tables are in the state_dict. to_q/to_k/to_v/to_out are QuantLinear layers
swapped in by ``dq.models.student.prepare`` like every other Linear. Families call
:func:`install_quant_attention` for each ``Attention`` they quantize.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import Tensor, nn

from dq.quant.fake_quant import quant_ints
from dq.quant.qattention import qattention
from dq.quant.quantizers import TemporalActQuantizer

# Attention scores are computed in blocks of query rows of at most this size: SD-1.5's first self-attention
# over 64×64 latents is 8 heads × 4096² floats = 512 MB per image, 8 GB at batch 16, and its softmax, the
# fake quantizer's intermediates and the quantized copy several times that (the SD-1.5 dry run was killed at
# 20.6 GB in distillation before this; docs/scale.md). Rows are independent (softmax and the per-head quantizer work
# row-wise), so the result is the same up to the matmul kernel's blocking (tests/test_scale.py).
SCORES_BYTES = 256 * 2**20
# A runtime that computes in bfloat16 (dq.quant.compiled) gets q, k, v and P back in bfloat16 for the two matmuls,
# which then run on bf16 kernels (AMX tiles where the CPU has them) instead of being promoted to float32 by the
# float32 tables, for heads at least this wide: for 16-wide heads (the digits UNet) inductor's bf16 score
# kernels measured slower than float32 ones (AMX Xeon, 2 threads: attention core 4.3 vs 3.7 ms; 256-wide heads
# of ddpm_cifar10: 1.6 vs 3.7 ms).
BF16_MIN_HEAD_DIM = 32


def _integers(quant: TemporalActQuantizer, x: Tensor) -> tuple[Tensor, Tensor]:
    """(k, Δ): a per-head quantizer's integers of x [B, H, n, d] (k·Δ is its output) and Δ [1, H, 1, 1] of the
    batch's one table row."""
    delta, zp = (t.reshape(1, -1, 1, 1) for t in quant._row_params(quant._rows(x)))
    return quant_ints(x, delta, zp, quant.bits), delta


def _rows(mask: Tensor | None, i: int, rows: int, n: int) -> Tensor | None:
    """The mask of query rows i..i+rows (a mask broadcast over the queries stays as it is)."""
    return mask if mask is None or mask.shape[-2] != n else mask[..., i:i + rows, :]


class QuantAttnProcessor(nn.Module):
    """Args:
        heads: attn.heads of the Attention it serves.
        a_bits: bits of q, k, v (None → matmul operands q, k, v left in float).
        prob_bits: bits of the softmax probabilities (None → left in float).
        num_steps: T of the TPQ tables (1 = shared).
    """

    def __init__(self, heads: int, a_bits: int | None, prob_bits: int | None = 8, num_steps: int = 1) -> None:
        super().__init__()
        self.heads = heads

        def make(bits: int | None) -> TemporalActQuantizer | None:
            return None if bits is None else TemporalActQuantizer(bits, num_steps, heads=heads, head_axis=1)

        self.q_quant = make(a_bits)
        self.k_quant = make(a_bits)
        self.v_quant = make(a_bits)
        self.prob_quant = make(prob_bits)
        # set by runtime=compiled: heads narrower than BF16_MIN_HEAD_DIM through the fused kernel (dq.quant.qattention),
        # and wider ones too where it runs on the AMX tiles (``wide``: its float loops do not pay for them)
        self.fused = False
        self.wide = False

    # Attention.forward filters cross-attention kwargs by the processor's __call__ signature; nn.Module's
    # generic (*args, **kwargs) would hide `temb`, so expose the same signature as AttnProcessor2_0.
    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    @staticmethod
    def _q(quant: TemporalActQuantizer | None, x: Tensor) -> Tensor:
        return x if quant is None else quant(x)

    def forward(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        """hidden_states [B, C, H, W] or [B, N, C]; encoder_hidden_states [B, S, C_cross] → same shape as input."""
        if attn.heads != self.heads:
            raise ValueError(f"processor built for {self.heads} heads serves an Attention with {attn.heads}")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # [B, N, H·d] → [B, H, N, d]
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        dtype = query.dtype
        if self._fuses(query, attention_mask):  # one kernel, its scores in cache: the same function (~1e-7 relative)
            hidden_states = self._fused(attn, query, key, value, dtype)
        else:
            query, key, value = self._q(self.q_quant, query), self._q(self.k_quant, key), self._q(self.v_quant, value)
            hidden_states = self._explicit(attn, query, key, value, attention_mask, dtype)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _explicit(self, attn: Attention, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  dtype: torch.dtype) -> Tensor:
        """Attention of quantized q, k, v [B, H, n, d] by batched matmuls, in blocks of query rows where the
        scores would exceed SCORES_BYTES."""
        if dtype == torch.bfloat16 and query.shape[-1] >= BF16_MIN_HEAD_DIM:
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        n, s = query.shape[2], key.shape[2]
        rows = max(1, SCORES_BYTES // (query.shape[0] * attn.heads * s * 4))
        if rows >= n:
            hidden_states = self._attend(attn, query, key, value, attention_mask, dtype)
        else:  # the [B, H, N, S] scores one block of query rows at a time (rows are independent)
            attend = self._attend
            if torch.is_grad_enabled():  # training: keep no block's scores for backward, recompute them there
                attend = functools.partial(checkpoint, self._attend, use_reentrant=False, context_fn=self._same_rows)
            hidden_states = torch.cat([attend(attn, query[:, :, i:i + rows], key, value,
                                              _rows(attention_mask, i, rows, n), dtype)
                                       for i in range(0, n, rows)], dim=2)
        return hidden_states

    def _fuses(self, query: Tensor, mask: Tensor | None) -> bool:
        """Whether the fused kernel computes this call: where the runtime enabled it, in inference, for heads
        narrower than BF16_MIN_HEAD_DIM (any width if ``wide``) without a mask, with q, k, v and P quantized
        (enabled, not calibrating) and one table row for the whole batch."""
        quants = (self.q_quant, self.k_quant, self.v_quant, self.prob_quant)
        narrow = query.shape[-1] < BF16_MIN_HEAD_DIM
        if not self.fused or mask is not None or torch.is_grad_enabled() or not (narrow or self.wide):
            return False
        if any(q is None or not q.enabled or q.calibrating for q in quants):
            return False
        rows = self.prob_quant._rows(query)
        return rows is None or rows.numel() == 1

    def _fused(self, attn: Attention, query: Tensor, key: Tensor, value: Tensor, dtype: torch.dtype) -> Tensor:
        """dq.quant.qattention on q, k, v's integers (bfloat16, written so by their producer) and per-head scales;
        its output in ``dtype`` where that is bfloat16 (what the explicit path's float32 output is cast to)."""
        (q, dq), (k, dk), (v, dv) = (_integers(quant, t) for quant, t in
                                     ((self.q_quant, query), (self.k_quant, key), (self.v_quant, value)))
        p = self.prob_quant
        p_delta, p_zp = p._row_params(p._rows(query))
        q, k, v = (t.to(torch.bfloat16).contiguous() for t in (q, k, v))
        h = self.heads
        return qattention(q, k, v, (dq * dk).reshape(h) * attn.scale, p_delta.reshape(h) * dv.reshape(h),
                          p_delta, p_zp, p.bits, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)

    def _same_rows(self) -> tuple[Any, Any]:
        """Checkpoint contexts: the recomputation in backward reads the TPQ rows the forward read (the
        step index is reset once the block's forward returns)."""
        si = None if self.prob_quant is None else self.prob_quant._step_index
        rows = None if si is None else si.current
        return contextlib.nullcontext(), contextlib.nullcontext() if rows is None else si.use(rows)

    def _attend(self, attn: Attention, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                dtype: torch.dtype) -> Tensor:
        """Q_p(softmax(q·kᵀ·scale + mask)) · v for quantized q, k, v: [B, H, n, d]."""
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale  # [B, H, n, S]
        if attention_mask is not None:  # additive bias, or boolean "may attend" as in SDPA
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
        if attn.upcast_softmax:
            scores = scores.float()
        probs = self._q(self.prob_quant, scores.softmax(dim=-1).to(dtype))
        return torch.matmul(probs.to(value.dtype), value)  # [B, H, n, d]

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


def install_quant_attention(name: str, attn: Attention, a_bits: int, prob_bits: int | None, num_steps: int) -> None:
    """Give ``attn`` (qualified name ``name``, for errors) a QuantAttnProcessor with T = num_steps tables."""
    if not isinstance(attn.processor, (AttnProcessor, AttnProcessor2_0)):
        raise ValueError(f"{name}: processor {type(attn.processor).__name__} is not the default one; "
                         "QuantAttnProcessor mirrors AttnProcessor2_0 only (add the module to quant.skip)")
    if attn.added_kv_proj_dim is not None:
        raise ValueError(f"{name}: added-KV attention is not supported; add it to quant.skip")
    p = next(attn.parameters())
    # Attention.set_processor registers an nn.Module processor as the submodule `processor`, so its
    # tables land in the state_dict (not every model class has set_attn_processor).
    attn.set_processor(QuantAttnProcessor(attn.heads, a_bits, prob_bits, num_steps).to(device=p.device, dtype=p.dtype))


def restore_attention(model: nn.Module) -> None:
    """Every QuantAttnProcessor of ``model`` back to diffusers' default processor."""
    for m in model.modules():
        if isinstance(m, Attention) and isinstance(m.processor, QuantAttnProcessor):
            m.set_processor(AttnProcessor2_0())
