"""Apply Weight Dilation or SmoothQuant to a prepared model, group by group (torch only).

A :class:`DilationGroup` is the set of quantized layers that read one input tensor, plus the module
producing that tensor when 1/s can be folded into it exactly. The model family finds the groups
(it knows which layers share an input); this module applies one s per group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from dq.quant.dilation import (activation_stats, apply_dilation, dilation_scales, fold_input_scale, scale_stats,
                               smoothquant_scales)
from dq.quant.layers import iter_quant_layers


@dataclass(frozen=True)
class DilationGroup:
    """Quantized layers reading one input tensor, and the module producing it if 1/s folds into it exactly."""

    layers: tuple[str, ...]
    producer: str | None = None


def init_weight_quantizers(model: nn.Module) -> None:
    """Min–max re-initialisation of every weight quantizer from its current weight."""
    for _, layer in iter_quant_layers(model):
        layer.weight_quant.init_from(layer.weight)


ScaleFn = Callable[[DilationGroup, "list[Tensor]"], "tuple[Tensor, dict[str, float]]"]


def _apply(model: nn.Module, groups: Sequence[DilationGroup], scales: ScaleFn, clamp_to_bounds: bool, fold: bool,
           act_absmax: dict[str, Tensor] | None) -> list[dict]:
    report = []
    for g in groups:
        mods = [model.get_submodule(n) for n in g.layers]
        if any(m.lowrank_rank and bool(m.lowrank_up.any()) for m in mods):
            raise ValueError(f"{g.layers[0]} already has a low-rank branch; scale (WD / SmoothQuant) before "
                             "dq.quant.lowrank.svd_init, which splits the scaled weight")
        s, stats = scales(g, [m.weight for m in mods])
        apply_dilation(mods, s, clamp_to_bounds=clamp_to_bounds)
        folded = None
        if fold and g.producer is not None:
            fold_input_scale(model.get_submodule(g.producer), mods)
            folded = g.producer
        row: dict = {"layers": list(g.layers), "c_in": s.numel(), "folded_into": folded, **stats}
        if act_absmax is not None and g.layers[0] in act_absmax:
            row.update(activation_stats(s, act_absmax[g.layers[0]]))
        report.append(row)
    init_weight_quantizers(model)
    return report


def apply_weight_dilation(model: nn.Module, groups: Sequence[DilationGroup], fold: bool = True,
                          act_absmax: dict[str, Tensor] | None = None) -> list[dict]:
    """Weight Dilation (method.md §2) on each group, after prepare and before activation calibration.
    1/s is folded into the producer where exact (``fold``), else carried in ``input_scale``. Weight
    quantizers are re-initialised (Δ_w unchanged by construction).

    Returns one dict per group: layers, c_in, folded_into, saturated_frac, s_min, s_median, s_p90,
    s_max (+ act_absmax_before/after, act_median_before/after when ``act_absmax`` is given).
    """
    def scales(g: DilationGroup, weights: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        plan = dilation_scales(weights)
        return plan.s, plan.stats

    return _apply(model, groups, scales, clamp_to_bounds=True, fold=fold, act_absmax=act_absmax)


def apply_smoothquant(model: nn.Module, groups: Sequence[DilationGroup], act_absmax: dict[str, Tensor],
                      alpha: float = 0.5, fold: bool = True) -> list[dict]:
    """SmoothQuant α-scaling (the baseline to WD) with the same groups and folding; weight quantizers
    are re-initialised since the weight ranges change. ``act_absmax``: max |x| per input channel of
    each layer on the float model (see ``dq.quant.calibration.record_input_absmax``)."""
    def scales(g: DilationGroup, weights: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        if g.layers[0] not in act_absmax:
            raise ValueError(f"act_absmax has no entry for {g.layers[0]}; record it on the prepared model")
        s = smoothquant_scales(act_absmax[g.layers[0]], weights, alpha)
        return s, scale_stats(s)

    return _apply(model, groups, scales, clamp_to_bounds=False, fold=fold, act_absmax=act_absmax)
