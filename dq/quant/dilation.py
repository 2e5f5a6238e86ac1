"""Weight Dilation (method.md §2) and SmoothQuant scaling, on plain tensors/modules. Torch only.

Equivalent per-input-channel scaling  Y = (X / s) · (s W):  weight[:, k] *= s_k,  input channel k /= s_k.
WD picks the largest s_k ≥ 1 that keeps every output channel's quantization range — its effective
bounds [min(min_k W[j,k], 0), max(max_k W[j,k], 0)], the ones of ``dq.quant.fake_quant.minmax_params``
— bitwise unchanged, so Δ_w and z_w do not change while the activations shrink.

Who carries 1/s: a layer's ``input_scale`` buffer (any module with ``weight`` [C_out, C_in, ...] and
``input_scale`` [C_in]), or, where exact, the producer of the input (:func:`fold_input_scale`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# Numerical cap on s: a channel whose weights are all (near-)subnormal would otherwise get s = inf.
# Such channels contribute nothing measurable, so the cap never limits a meaningful factor.
MAX_FACTOR = 1e6


@dataclass(frozen=True)
class DilationPlan:
    """Result of :func:`dilation_scales`.

    Attributes:
        s: [C_in] float32 factors, 1 ≤ s ≤ MAX_FACTOR.
        saturated: [C_in] bool, the set A (channels holding some output channel's nonzero max or min).
        stats: summary numbers (see :func:`scale_stats`).
    """

    s: Tensor
    saturated: Tensor
    stats: dict[str, float] = field(default_factory=dict)


def _as_matrix(weights: Tensor | Sequence[Tensor]) -> Tensor:
    """Consumers' weights → W [ΣC_out, C_in, taps] float32 (several consumers of one input stacked on dim 0)."""
    ws = [weights] if isinstance(weights, Tensor) else list(weights)
    if not ws:
        raise ValueError("no weights given")
    c_in = {w.shape[1] for w in ws}
    if len(c_in) != 1:
        raise ValueError(f"consumers of one input must share C_in, got {sorted(c_in)}")
    return torch.cat([w.detach().float().reshape(w.shape[0], w.shape[1], -1) for w in ws], dim=0)


def effective_bounds(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel quantizer bounds (min(min,0), max(max,0)) of w [C_out, ...] → ([C_out], [C_out])."""
    lo, hi = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
    return lo.clamp(max=0), hi.clamp(min=0)


def dilation_scales(weights: Tensor | Sequence[Tensor]) -> DilationPlan:
    """WD factors s [C_in] for one input read by the given consumer weight(s).

    Args:
        weights: [C_out, C_in] (Linear) or [C_out, C_in, kh, kw] (Conv2d), or a list of such for
            several consumers of the same input (e.g. to_q, to_k, to_v); one s then serves all.

    For output channel j with effective bounds W_min[j] ≤ 0 ≤ W_max[j], and input channel k:
        s_k = min( min_{W[j,k]>0} W_max[j] / W[j,k],  min_{W[j,k]<0} W_min[j] / W[j,k] )
    over all (j, taps). Entries of the wrong sign and zeros are masked (no division by 0, no −inf
    for an all-negative output channel). Channels in A and all-zero channels get s = 1.
    """
    w = _as_matrix(weights)  # [J, K, taps]
    lo, hi = effective_bounds(w)
    lo, hi = lo[:, None, None], hi[:, None, None]
    pos, neg = w > 0, w < 0
    r_pos = torch.where(pos, hi / torch.where(pos, w, 1.0), torch.inf)
    r_neg = torch.where(neg, lo / torch.where(neg, w, -1.0), torch.inf)
    s = torch.minimum(r_pos, r_neg).amin(dim=(0, 2))  # [K]; inf where the channel is all zero
    saturated = ((pos & (w == hi)) | (neg & (w == lo))).any(dim=2).any(dim=0)
    s = torch.where(saturated | torch.isinf(s), 1.0, s).clamp(1.0, MAX_FACTOR)
    return DilationPlan(s=s, saturated=saturated, stats=scale_stats(s, saturated))


def scale_stats(s: Tensor, saturated: Tensor | None = None) -> dict[str, float]:
    """|A|/C_in (if given) and the quantiles of s: min, median, p90, max."""
    s = s.detach().float()
    q = torch.quantile(s, torch.tensor([0.0, 0.5, 0.9, 1.0]))
    out = {"s_min": float(q[0]), "s_median": float(q[1]), "s_p90": float(q[2]), "s_max": float(q[3])}
    if saturated is not None:
        out = {"saturated_frac": float(saturated.float().mean()), **out}
    return out


def activation_stats(s: Tensor, act_absmax: Tensor) -> dict[str, float]:
    """Per-tensor activation range before/after dividing channel k by s_k.

    Args:
        s: [C_in]; act_absmax: [C_in] max |X_k| recorded on the unscaled model.
    """
    a = act_absmax.detach().float().to(s.device)
    after = a / s
    return {
        "act_absmax_before": float(a.max()),
        "act_absmax_after": float(after.max()),
        "act_median_before": float(a.median()),
        "act_median_after": float(after.median()),
    }


def _channel_view(s: Tensor, ndim: int) -> list[int]:
    return [1, s.numel()] + [1] * (ndim - 2)


@torch.no_grad()
def apply_dilation(layers: Sequence[nn.Module], s: Tensor, clamp_to_bounds: bool = True) -> None:
    """weight[:, k] *= s_k and input_scale /= s for each layer (exact in real arithmetic).

    Args:
        layers: modules with ``weight`` [C_out, C_in, ...] and ``input_scale`` [C_in] that read
            the same input.
        s: [C_in] positive factors.
        clamp_to_bounds: clamp every output channel to its effective bounds from before the
            scaling (WD). W[j,k]·(W_max[j]/W[j,k]) can round one ulp above W_max[j]; the clamp
            undoes exactly that, so min and max stay bitwise unchanged (the channel attaining them
            is in A and is not scaled). Use False for SmoothQuant, which moves the bounds on purpose.
    """
    s = s.detach().float()
    if (s <= 0).any() or not torch.isfinite(s).all():
        raise ValueError("scaling factors must be finite and positive")
    for layer in layers:
        w = layer.weight
        if w.shape[1] != s.numel():
            raise ValueError(f"weight {tuple(w.shape)} has C_in={w.shape[1]}, s has {s.numel()} entries")
        w32 = w.detach().float()
        new = w32 * s.to(w.device).view(_channel_view(s, w.ndim))
        if clamp_to_bounds:
            lo, hi = effective_bounds(w32)
            b = [-1] + [1] * (w.ndim - 1)
            new = torch.maximum(torch.minimum(new, hi.view(b)), lo.view(b))
        w.copy_(new.to(w.dtype))
        layer.input_scale.div_(s.to(layer.input_scale))


@torch.no_grad()
def fold_input_scale(producer: nn.Module, consumers: Sequence[nn.Module]) -> None:
    """Move the consumers' common ``input_scale`` u into the per-channel affine of their producer.

    Exact when the producer's output feeds only these consumers: GroupNorm/LayerNorm (affine
    weight and bias times u), or Linear/Conv2d (output channel j times u_j, bias too; re-initialise
    its weight quantizer afterwards). The consumers' input_scale is reset to 1.
    """
    if not consumers:
        raise ValueError("no consumers to fold")
    u = consumers[0].input_scale
    for c in consumers[1:]:
        if not torch.equal(c.input_scale, u):
            raise ValueError("consumers of one producer have different input_scale; dilate them as one group")
    u = u.detach().clone()
    if isinstance(producer, (nn.GroupNorm, nn.LayerNorm)):
        if producer.weight is None:
            raise ValueError(f"{type(producer).__name__} without affine weight cannot absorb a scale")
        channels = producer.weight.shape[0] if isinstance(producer, nn.GroupNorm) else producer.weight.numel()
        if isinstance(producer, nn.LayerNorm) and len(producer.normalized_shape) != 1:
            raise ValueError(f"LayerNorm over {tuple(producer.normalized_shape)} is not per channel")
        if channels != u.numel():
            raise ValueError(f"producer has {channels} channels, consumers read {u.numel()}")
        producer.weight.mul_(u.to(producer.weight))
        if producer.bias is not None:
            producer.bias.mul_(u.to(producer.bias))
    elif isinstance(producer, (nn.Linear, nn.Conv2d)):
        if producer.weight.shape[0] != u.numel():
            raise ValueError(f"producer has {producer.weight.shape[0]} outputs, consumers read {u.numel()}")
        producer.weight.mul_(u.to(producer.weight).view([-1] + [1] * (producer.weight.ndim - 1)))
        if producer.bias is not None:
            producer.bias.mul_(u.to(producer.bias))
    else:
        raise TypeError(
            f"cannot fold a per-channel scale into {type(producer).__name__}; "
            "valid producers: GroupNorm, LayerNorm (affine), Linear, Conv2d"
        )
    for c in consumers:
        c.input_scale.fill_(1.0)


def smoothquant_scales(
    act_absmax: Tensor, weights: Tensor | Sequence[Tensor], alpha: float = 0.5,
    min_scale: float = 1e-5, max_scale: float = 1e5,
) -> Tensor:
    """SmoothQuant factors s_k = max|X_k|^α / max|W_k|^(1−α), clamped to [min_scale, max_scale].

    Same convention as WD (weight[:, k] *= s_k, input /= s_k). Channels with a zero activation or
    an all-zero weight column get s = 1. Unlike WD this moves the weight range: re-initialise the
    weight quantizers afterwards.

    Args:
        act_absmax: [C_in]; weights: as for :func:`dilation_scales`; alpha in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    w = _as_matrix(weights)
    w_absmax = w.abs().amax(dim=(0, 2))
    a = act_absmax.detach().float().to(w.device)
    if a.shape != w_absmax.shape:
        raise ValueError(f"act_absmax has shape {tuple(a.shape)}, weights have C_in={w_absmax.numel()}")
    s = a.pow(alpha) / w_absmax.pow(1.0 - alpha)
    ok = (a > 0) & (w_absmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, 1.0).clamp(min_scale, max_scale)
