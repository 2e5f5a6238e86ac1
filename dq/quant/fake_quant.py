"""Uniform asymmetric fake quantization primitives (method.md §1). Torch only.

    Q(x) = Δ · ( clamp( round(x/Δ) + z, 0, 2^b − 1 ) − z )

Conventions shared by every quantizer of the package:
- ``x/Δ`` is computed as ``x * (1/Δ)`` in both the autograd path (training) and the no-grad
  path (evaluation), which give bitwise identical results (also equal to PyTorch's
  ``fake_quantize_per_*_affine`` kernels, which compute it the same way).
- The zero point is rounded in the forward pass (straight-through in backward) and clamped
  to [0, 2^b − 1], so that 0 is always exactly representable (as in integer kernels).
- Δ must be positive; quantizers clamp their learnable Δ to ≥ ``DELTA_MIN`` before calling.
"""

from __future__ import annotations

import torch
from torch import Tensor

DELTA_MIN = 1e-8
VALID_BITS = range(2, 9)


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an int in 2..8, else raise ValueError naming it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"{what}={bits!r} is not supported; valid choices are the integers 2..8")
    return bits


def qmax_of(bits: int) -> int:
    """Largest integer level of an unsigned b-bit grid: 2^b − 1."""
    return 2 ** check_bits(bits) - 1


class _RoundSTE(torch.autograd.Function):
    # One kernel forward and backward, cheaper than the `x + (round(x) - x).detach()` idiom.
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even) in forward; identity gradient in backward."""
    return _RoundSTE.apply(x)


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity in forward; multiplies the gradient by ``scale`` in backward (LSQ grad scale)."""
    y = x * scale
    return (x - y).detach() + y


def fake_quant(
    x: Tensor, delta: Tensor, zero_point: Tensor, bits: int, grad_scale: float | None = None
) -> Tensor:
    """Differentiable fake quantization Q(x) (autograd path, any dtype).

    Args:
        x: any shape.
        delta: step Δ > 0, broadcastable to ``x`` (e.g. [C, 1, 1, 1] per channel, [B, 1, 1, 1] per sample).
        zero_point: z, broadcastable to ``x``; rounded (STE) and clamped to [0, 2^b − 1] in forward.
        bits: 2..8.
        grad_scale: if given, gradients reaching Δ and z are multiplied by it
            (LSQ uses 1/sqrt(numel_per_Δ · qmax)); default off.

    Returns:
        Tensor shaped like ``x`` (broadcast with Δ, z) on the grid Δ·{−z, …, 2^b−1−z}.

    Gradients: to x, 1 inside the clip range and 0 outside (straight-through); to Δ,
    round(x/Δ) − x/Δ inside and the clip level (−z or 2^b−1−z) outside (LSQ); to z, 0 inside and
    −Δ outside (LSQ+).

    A single fused autograd node computing these gradients directly was tried and measured no faster
    on CPU (a training step of every digits block, CPU time: 1.01x; docs/speed.md), so the op-by-op
    formula stays.
    """
    qmax = qmax_of(bits)
    if grad_scale is not None:
        delta = scale_grad(delta, grad_scale)
        zero_point = scale_grad(zero_point, grad_scale)
    z = round_ste(zero_point).clamp(0, qmax)
    q = torch.clamp(round_ste(x * delta.reciprocal()) + z, 0, qmax)
    return (q - z) * delta


def quant_ints(x: Tensor, delta: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """The integers k = clamp(round(x/Δ), −z, qmax − z) of the fake quantizer's grid (its output is k·Δ), in x's
    float dtype; no gradient."""
    qmax = qmax_of(bits)
    z = torch.round(zero_point).clamp(0, qmax)
    return torch.minimum(torch.maximum(torch.round(x * delta.reciprocal()), -z), qmax - z)


def fake_quant_nograd(x: Tensor, delta: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """No-grad fast path of :func:`fake_quant`, bitwise equal to it (same arguments, broadcasting).

    clamp(round(x/Δ) + z, 0, qmax) − z is computed as clamp(round(x/Δ), −z, qmax − z) with
    in-place ops on one buffer: 5 memory passes and one allocation instead of 6 allocations. The
    clamp is maximum/minimum, whose broadcasting kernels are vectorised; clamp with tensor bounds
    and torch's fused ``fake_quantize_per_channel_affine`` are not (measured on a [16, 256, 16, 16]
    float32 tensor, 1 CPU thread, torch 2.13: 0.3 ms here, 5 ms fused kernel, 8 ms autograd path).
    """
    qmax = qmax_of(bits)
    z = torch.round(zero_point).clamp(0, qmax)
    if torch.compiler.is_compiling():  # the same values, functional (a compiled graph fuses the passes)
        return quant_ints(x, delta, zero_point, bits) * delta
    if delta.numel() == 1 and z.numel() == 1:  # one row for the whole batch (sampling): 0-dim operands
        d0, z0 = delta.reshape(()), z.reshape(())  # take the scalar kernels (not clamp_ with tensor
        t = x * d0.reciprocal()                    # bounds: 10x slower than maximum/minimum here)
        t.round_()
        torch.maximum(t, -z0, out=t)
        torch.minimum(t, qmax - z0, out=t)
        return t.mul_(d0)
    t = x * delta.reciprocal()
    t.round_()
    torch.maximum(t, -z, out=t)
    torch.minimum(t, qmax - z, out=t)
    return t.mul_(delta)


def minmax_params(xmin: Tensor, xmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(Δ, z) covering [xmin, xmax] with no clipping.

    The effective range always contains 0: xmin' = min(xmin, 0), xmax' = max(xmax, 0);
    Δ = (xmax' − xmin') / (2^b − 1), clamped ≥ 1e-8; z = round(−xmin' / Δ).
    Weight Dilation (dq.quant.dilation) keeps exactly these effective bounds per output channel,
    which is why it leaves Δ_w and z_w unchanged.

    Args:
        xmin, xmax: same shape (any), floating.
    Returns:
        (delta, zero_point), shaped like ``xmin``; zero_point is a float tensor holding integers.
    """
    qmax = qmax_of(bits)
    lo = torch.clamp(xmin, max=0)
    hi = torch.clamp(xmax, min=0)
    delta = ((hi - lo) / qmax).clamp(min=DELTA_MIN)
    zero_point = torch.round(-lo / delta).clamp(0, qmax)
    return delta, zero_point
