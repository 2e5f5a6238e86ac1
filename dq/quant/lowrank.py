"""SVDQuant's low-rank branch (Li et al., ICLR 2025) on fake-quantized layers. Torch only.

A layer's weight W (after any smoothing / Weight Dilation: the weight the layer really multiplies) is
split by its SVD into a rank-r part B·A, kept in float and run as a branch on the unquantized input, and
the residual R = W − B·A, which is what the weight quantizer sees. The branch absorbs the weight's
dominant directions (where its outliers live), so R has a smaller range and a finer 4-bit grid:

    y = layer(Q_a(x), Q_w(R)) + B·(A·x)

Two steps, so that a checkpoint or export of a branched student loads into a freshly prepared model:
:func:`add_lowrank` (in ``prepare``, from ``QuantConfig.lowrank_rank``) gives the layers zero branches;
:func:`svd_init` (a method's step, after scaling and before calibration) fills them from the SVD.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dq.quant.layers import QuantConv2d, QuantLinear, iter_quant_layers, max_rank


def eligible(layer: QuantConv2d | QuantLinear, rank: int) -> bool:
    """A branch of ``rank`` fits the layer: it reads quantized activations and ``rank`` ≤ its max_rank."""
    return layer.act_quant is not None and rank <= max_rank(layer.weight)


def add_lowrank(model: nn.Module, rank: int, prefixes: tuple[str, ...] = (),
                among: frozenset[str] | None = None) -> list[str]:
    """Zero low-rank branches of ``rank`` on every eligible quantized layer (in place), or on those
    ``among`` the given names and under ``prefixes`` (qualified module-name prefixes); their names."""
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"lowrank_rank={rank!r} must be a non-negative int (0: no branch)")
    names = []
    if rank:
        for name, layer in iter_quant_layers(model):
            chosen = ((among is None or name in among)
                      and (not prefixes or any(name == p or name.startswith(p + ".") for p in prefixes)))
            if chosen and eligible(layer, rank):
                layer.set_lowrank(rank)
                names.append(name)
    return names


def branch_macs(layer: QuantConv2d | QuantLinear) -> float:
    """The branch's multiply-accumulates per output position over the layer's own (:func:`branch_share`)."""
    return branch_share(layer.weight, layer.lowrank_rank)


def branch_share(weight: torch.Tensor, rank: int) -> float:
    """A rank-``rank`` branch's MACs over its layer's: r(C_in·k² + C_out) / (C_out·C_in·k²)."""
    c_out, fan_in = weight.shape[0], weight[0].numel()
    return rank * (fan_in + c_out) / (c_out * fan_in)


@torch.no_grad()
def svd_init(model: nn.Module) -> list[dict]:
    """Split every branched layer whose branch is still zero by its weight's SVD: B·A = the top ``rank`` singular directions
    (√σ on each side), ``weight`` = the residual, its quantizer re-initialised (min–max per channel).
    Returns per layer: name, rank, the residual's range over the weight's (max |·| per output channel,
    mean over channels) and the branch's MACs over the layer's."""
    report = []
    for name, layer in iter_quant_layers(model):
        if not layer.lowrank_rank or bool(layer.lowrank_up.any()):  # no branch, or already split
            continue
        r = layer.lowrank_rank
        w = layer.weight
        u, s, vh = torch.linalg.svd(w.detach().flatten(1).double(), full_matrices=False)
        root = s[:r].sqrt()
        up, down = u[:, :r] * root, root[:, None] * vh[:r]
        layer.lowrank_up.copy_(up.to(w.dtype))
        layer.lowrank_down.copy_(down.view_as(layer.lowrank_down).to(w.dtype))
        before = w.detach().flatten(1).abs().amax(1)
        w.sub_(layer.lowrank_weight())
        after = w.detach().flatten(1).abs().amax(1)
        layer.weight_quant.init_from(w)
        report.append({"layer": name, "rank": r, "range_ratio": float((after / before.clamp_min(1e-12)).mean()),
                       "branch_macs": branch_macs(layer)})
    return report


def lowrank_summary(model: nn.Module) -> dict:
    """Layers with a branch, their rank, and the branch's MACs over the quantized layers' for one call of
    equal output size everywhere (the per-layer ratios averaged weighted by each layer's MACs)."""
    layers = [(n, m) for n, m in iter_quant_layers(model) if m.lowrank_rank]
    if not layers:
        return {"layers": 0}
    own = [m.weight.shape[0] * m.weight[0].numel() for _, m in layers]
    share = sum(branch_macs(m) * o for (_, m), o in zip(layers, own)) / sum(own)
    return {"layers": len(layers), "rank": layers[0][1].lowrank_rank, "branch_macs_share": share,
            "branch_params": sum(m.lowrank_up.numel() + m.lowrank_down.numel() for _, m in layers),
            "weight_params": sum(math.prod(m.weight.shape) for _, m in layers)}
