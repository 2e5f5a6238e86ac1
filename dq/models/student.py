"""Make a fake-quantized student from a diffusers denoiser, through its model family.

Order of use (each step assumes the previous one):

    1. ``prepare(model, qcfg)``            Conv2d/Linear → QuantConv2d/QuantLinear, quantized attention,
                                           ``model.dq_step_index`` + the hooks that map timesteps to rows.
    2. ``weight_dilation(model, batches)`` WD (or ``smoothquant(model, batches, alpha)``); both
                                           re-initialise the weight quantizers (WD gives identical Δ_w).
    3. ``calibrate(model, batches)``       per-step activation tables from calibration data.

A batch is (x_t [B, C, H, W], raw_t [B] or scalar, cond or None). Calling the model maps its timestep
to table rows; calling blocks directly needs ``with model.dq_step_index.use(rows_of(model, t)):``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from dq.errors import name_error
from dq.models.attention import restore_attention
from dq.models.families import family_of
from dq.quant import calibration
from dq.quant.calibration import CalibrationReport
from dq.quant.config import LowRank, QuantConfig
from dq.quant.knots import use_knots
from dq.quant.layers import QUANT_LAYERS, iter_quant_layers
from dq.quant.lowrank import add_lowrank, eligible, max_rank
from dq.quant.prepare import attach_step_index, dequantize_layers, detach_step_index, quantize_layers
from dq.quant.scaling import apply_smoothquant, apply_weight_dilation
from dq.quant.split import split_inputs


def layer_bits_of(model: nn.Module, family, qcfg: QuantConfig):
    """The family's (w_bits, a_bits) per layer, with ``qcfg.a8_layers`` raising those layers' input
    activations to 8 bits and ``qcfg.quantize_embedding_acts=False`` leaving the conditioning branch's
    inputs in float. An a8_layers entry that names no quantized layer is an error, not a no-op."""
    def covered(name: str, p: str) -> bool:
        return name == p or name.startswith(p + ".")

    if qcfg.a8_layers:
        quantized = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                     and (b := family.layer_bits(n, m, qcfg)) is not None and b[1] is not None]
        for p in qcfg.a8_layers:
            if not any(covered(n, p) for n in quantized):
                raise name_error("quant.a8_layers entry", p, "layer with quantized activations", quantized)

    def bits(name: str, layer: nn.Module):
        b = family.layer_bits(name, layer, qcfg)
        if b is None or b[1] is None:
            return b
        if not qcfg.quantize_embedding_acts and family.embedding_branch(name):
            return b[0], None
        if any(covered(name, p) for p in qcfg.a8_layers):
            return b[0], max(b[1], 8)
        return b
    return bits


def prepare(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Make ``model`` (in place) a fake-quantized student; returns it. Layers get min–max Δ_w and
    T = qcfg.num_steps activation tables; the network output is not quantized. Every parameter and
    buffer exists afterwards, so a trained student's state_dict loads with ``strict=True`` into
    ``prepare(fresh_model, same_qcfg)``."""
    family = family_of(model)
    if hasattr(model, "dq_step_index"):
        raise ValueError("this model is already prepared")
    quantize_layers(model, layer_bits_of(model, family, qcfg), qcfg.num_steps)
    family.quantize_attention(model, qcfg)
    if qcfg.split_concat:
        splits = family.concat_splits(model)
        if not splits:
            raise ValueError(f"quant.split_concat=true, but no layer of this {type(model).__name__} reads a skip "
                             "concatenation; set quant.split_concat=false")
        split_inputs(model, {n: s for n, s in splits.items()
                             if isinstance(m := model.get_submodule(n), QUANT_LAYERS) and m.act_quant is not None})
    names = None
    if qcfg.lowrank_rank and qcfg.lowrank_scope == "skip_shortcuts":
        names = frozenset(family.skip_shortcuts(model))
        if not names:
            raise ValueError(f"quant.lowrank_scope=skip_shortcuts, but no layer of this {type(model).__name__} reads a "
                             "raw skip concatenation; use quant.lowrank_scope=all")
    branched = add_lowrank(model, qcfg.lowrank_rank, qcfg.lowrank_layers, names)
    if names and not branched and not qcfg.lowrank_layers:
        raise ValueError(f"quant.lowrank_rank={qcfg.lowrank_rank} fits none of the skip shortcuts (largest rank that "
                         f"fits: {max(max_rank(model.get_submodule(n).weight) for n in names)}); give a smaller rank")
    for p in qcfg.lowrank_layers if qcfg.lowrank_rank else ():
        if not any(n == p or n.startswith(p + ".") for n in branched):
            fits = [n for n, m in iter_quant_layers(model) if eligible(m, qcfg.lowrank_rank)
                    and (names is None or n in names)]
            raise name_error("quant.lowrank_layers entry", p, f"layer a rank-{qcfg.lowrank_rank} branch fits", fits)
    attach_step_index(model, qcfg.timesteps, not qcfg.shared_tables, family.timestep_of)
    if qcfg.tpq_knots:
        use_knots(model, qcfg.tpq_knots)
    return model


def shortcut_branch(model: nn.Module, branch: LowRank) -> LowRank | None:
    """``branch`` where its scope is skip_shortcuts and some shortcut of ``model`` (a float model, its family's
    ``skip_shortcuts``) takes its rank, ``None`` where none does (no skip concatenation, or too narrow); any
    other ``branch`` as it is."""
    if not branch.rank or branch.scope != "skip_shortcuts":
        return branch
    names = family_of(model).skip_shortcuts(model)
    return branch if any(branch.rank <= max_rank(model.get_submodule(n).weight) for n in names) else None


def unprepare(model: nn.Module) -> nn.Module:
    """Inverse of :func:`prepare` (in place): float layers (input_scale folded into the weights),
    default attention processors, no hooks, no step index. Folded WD norms stay (exact in float)."""
    dequantize_layers(model)
    restore_attention(model)
    detach_step_index(model)
    return model


def _runner(model: nn.Module):
    family = family_of(model)

    def run(batch: Sequence) -> Tensor:
        if len(batch) not in (2, 3):
            raise ValueError(f"a batch is (x_t, raw_t) or (x_t, raw_t, cond), got {len(batch)} items")
        return family.forward(model, batch[0], batch[1], batch[2] if len(batch) == 3 else None)
    return run


def calibrate(model: nn.Module, batches: Iterable[Sequence], method: str = "minmax", **kwargs) -> CalibrationReport:
    """Per-step activation tables from data (see ``dq.quant.calibration.calibrate``)."""
    return calibration.calibrate(model, batches, _runner(model), method, **kwargs)


def input_absmax(model: nn.Module, batches: Iterable[Sequence]) -> dict[str, Tensor]:
    """max |x_k| per input channel of every quantized layer on the float network (before WD / SQ)."""
    return calibration.input_absmax(model, batches, _runner(model))


def weight_dilation(model: nn.Module, batches: Sequence[Sequence] | None = None) -> list[dict]:
    """Weight Dilation on the family's groups. With ``batches``, the report also says what it did to
    the activations (one extra float pass)."""
    absmax = input_absmax(model, batches) if batches is not None else None
    family = family_of(model)
    report = apply_weight_dilation(model, family.dilation_groups(model), act_absmax=absmax)
    family.fold_scales(model, report)
    return report


def smoothquant(model: nn.Module, batches: Sequence[Sequence], alpha: float = 0.5) -> list[dict]:
    """SmoothQuant α-scaling on the family's groups (needs the activation maxima: one float pass)."""
    family = family_of(model)
    report = apply_smoothquant(model, family.dilation_groups(model), input_absmax(model, batches), alpha)
    family.fold_scales(model, report)
    return report
