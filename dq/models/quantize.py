"""Prepare a diffusers UNet (UNet2DModel / UNet2DConditionModel) for DilateQuant fake quantization.

Order of use (each step assumes the previous one):

    1. ``prepare(unet, qcfg)``          swap Conv2d/Linear → QuantConv2d/QuantLinear, install
                                        QuantAttnProcessor, attach ``unet.dq_step_index`` + hooks.
    2. ``apply_weight_dilation(unet)``  WD (or ``apply_smoothquant(unet, act_absmax)``); both
       re-initialise the weight quantizers from the new weights (WD gives identical Δ_w).
    3. ``calibrate(unet, batches)``     per-step activation tables from calibration data.

``build_student`` runs the three in that order. Step rows: calling the UNet maps its ``timestep``
argument to table rows (pre-forward hook); calling blocks directly needs
``with unet.dq_step_index.use(rows):``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import Tensor, nn

from dq.dilation import (
    activation_stats,
    apply_dilation,
    dilation_scales,
    fold_input_scale,
    scale_stats,
    smoothquant_scales,
)
from dq.models.attention import QuantAttnProcessor
from dq.quant.calibration import (
    CalibrationReport,
    finish_calibration,
    record_input_absmax,
    start_calibration,
)
from dq.quant.fake_quant import check_bits
from dq.quant.layers import QUANT_LAYERS, QuantConv2d, QuantLinear, iter_quant_layers
from dq.quant.quantizers import CALIBRATION_METHODS, TemporalActQuantizer, WeightQuantizer, set_quant_state
from dq.quant.steps import StepIndex

logger = logging.getLogger(__name__)

UNets = (UNet2DModel, UNet2DConditionModel)
FIRST_LAST = ("conv_in", "conv_out")
EMBEDDINGS = ("time_embedding", "class_embedding", "add_embedding")
SCALINGS = ("wd", "sq", None)

__all__ = [
    "QuantConfig", "prepare", "unprepare", "iter_quant_layers", "set_quant_state", "unet_forward",
    "calibrate", "input_absmax", "dilation_groups", "apply_weight_dilation", "apply_smoothquant",
    "init_weight_quantizers", "build_student",
]


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        w_bits: weight bits, 2..8.
        a_bits: activation bits, 2..8, or None (weights only: no activation quantizer at all).
        timesteps: raw timesteps of the sampler schedule, one table row each (T = len); unique.
        shared_tables: one table shared by all steps (T = 1); ``timesteps`` may then be empty, and
            calls are not checked against them (``dq_step_index`` still maps them for data pipelines).
        prob_bits: bits of the attention probabilities (None → float).
        first_last_bits: bits of conv_in and conv_out (weights and input); None → w_bits / a_bits.
        quantize_attention: quantize the inputs of the two attention matmuls (q, k, v, P).
        skip: qualified module-name prefixes left in float (e.g. "mid_block", "up_blocks.3").
        quantize_time_embedding: quantize the embedding MLPs (time_embedding, class_embedding,
            add_embedding); False leaves them in float.
    """

    w_bits: int = 4
    a_bits: int | None = 4
    timesteps: tuple[int, ...] = ()
    shared_tables: bool = False
    prob_bits: int | None = 8
    first_last_bits: int | None = 8
    quantize_attention: bool = True
    skip: tuple[str, ...] = ()
    quantize_time_embedding: bool = True

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        for name in ("a_bits", "prob_bits", "first_last_bits"):
            v = getattr(self, name)
            if v is not None:
                check_bits(v, name)
        try:
            ts = tuple(int(t) for t in self.timesteps)
        except (TypeError, ValueError) as e:
            raise ValueError(f"timesteps={self.timesteps!r} must be a sequence of integers") from e
        if not ts and not self.shared_tables:
            raise ValueError("timesteps is empty; give the sampler's raw timesteps, or set shared_tables=True")
        if len(set(ts)) != len(ts):
            raise ValueError(f"timesteps contain duplicates: {sorted({t for t in ts if ts.count(t) > 1})}")
        object.__setattr__(self, "timesteps", ts)
        object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))

    @property
    def num_steps(self) -> int:
        return 1 if self.shared_tables else len(self.timesteps)


# ------------------------------------------------------------------------------------------ prepare
def _skipped(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _dq_pre_hook(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """Map the call's `timestep` to table rows and make them `dq_step_index.current` for this call.

    The previous value is pushed first, so the always-called forward hook restores it whether the
    forward (or this hook) succeeds or raises. (Under torch.compile, torch skips always-called hooks
    on exceptions: after a failed compiled call ``current`` stays set until the next call.)
    A scalar or one-element timestep gives rows [1], broadcast over the batch.
    """
    si: StepIndex = unet.dq_step_index
    si.push(si.current)
    if not si.map_calls:  # shared tables: rows are not used, any timestep is fine
        return None
    sample = kwargs["sample"] if "sample" in kwargs else args[0]
    t = kwargs["timestep"] if "timestep" in kwargs else args[1]
    rows = si.rows(t.to(si.timesteps.device) if isinstance(t, Tensor) else t).reshape(-1)
    if rows.numel() not in (1, sample.shape[0]):
        raise ValueError(f"timestep has {rows.numel()} entries for a batch of {sample.shape[0]} samples")
    si.current = rows
    return None


def _dq_post_hook(unet: nn.Module, args: tuple, output: object) -> None:
    unet.dq_step_index.pop()
    return None


def prepare(unet: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Make ``unet`` (in place) a fake-quantized student; returns it.

    - every nn.Conv2d / nn.Linear not under ``qcfg.skip`` → QuantConv2d / QuantLinear with min–max
      weight init and an input activation quantizer with T tables (conv_in/conv_out at
      ``first_last_bits``); the network output is not quantized;
    - every Attention gets a QuantAttnProcessor (q, k, v at a_bits, P at prob_bits, [T, H] tables);
    - ``unet.dq_step_index`` (StepIndex, in the state_dict) and a pre-forward hook mapping the
      ``timestep`` argument to rows for the duration of the call (restored by an always-called
      forward hook, also when the call raises).

    All parameters/buffers exist afterwards: a checkpoint of a trained student loads with
    ``strict=True`` into ``prepare(fresh_unet, same_qcfg)``.

    Rows exist only during a UNet call or inside ``with unet.dq_step_index.use(rows):``; code that
    re-runs quantizers later (activation checkpointing recomputing in backward) must run the
    backward inside ``use(rows)`` too.
    """
    if not isinstance(unet, UNets):
        raise TypeError(f"prepare expects UNet2DModel or UNet2DConditionModel, got {type(unet).__name__}")
    if hasattr(unet, "dq_step_index"):
        raise ValueError("this UNet is already prepared")
    device, dtype = unet.device, unet.dtype
    t = qcfg.num_steps
    skip = qcfg.skip + (() if qcfg.quantize_time_embedding else EMBEDDINGS)

    for parent_name, parent in list(unet.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, (nn.Conv2d, nn.Linear)) or isinstance(child, QUANT_LAYERS):
                continue
            if _skipped(name, skip):
                continue
            w_bits, a_bits = qcfg.w_bits, qcfg.a_bits
            if name in FIRST_LAST and qcfg.first_last_bits is not None:
                w_bits = qcfg.first_last_bits
                a_bits = None if qcfg.a_bits is None else qcfg.first_last_bits
            cls = QuantConv2d if isinstance(child, nn.Conv2d) else QuantLinear
            if cls is QuantConv2d and child.groups != 1:
                raise ValueError(f"{name}: grouped conv (groups={child.groups}) is not supported; add it to skip")
            setattr(parent, child_name, cls.from_float(child, w_bits, a_bits, t))

    if qcfg.quantize_attention and qcfg.a_bits is not None:
        for name, attn in unet.named_modules():
            if not isinstance(attn, Attention) or _skipped(name, qcfg.skip):
                continue
            if not isinstance(attn.processor, (AttnProcessor, AttnProcessor2_0)):
                raise ValueError(
                    f"{name}: processor {type(attn.processor).__name__} is not the default one; "
                    "QuantAttnProcessor mirrors AttnProcessor2_0 only (add the module to skip)"
                )
            if attn.added_kv_proj_dim is not None:
                raise ValueError(f"{name}: added-KV attention is not supported; add it to skip")
            # UNet2DModel has no set_attn_processor; Attention.set_processor registers an nn.Module
            # processor as the submodule `processor`, so its tables land in the state_dict.
            proc = QuantAttnProcessor(attn.heads, qcfg.a_bits, qcfg.prob_bits, t).to(device=device, dtype=dtype)
            attn.set_processor(proc)

    step_index = StepIndex(qcfg.timesteps, map_calls=not qcfg.shared_tables).to(device)
    unet.dq_step_index = step_index
    for m in unet.modules():
        if isinstance(m, TemporalActQuantizer):
            m.set_step_index(step_index)
    unet.register_forward_pre_hook(_dq_pre_hook, with_kwargs=True)
    unet.register_forward_hook(_dq_post_hook, always_call=True)
    return unet


def unprepare(unet: nn.Module) -> nn.Module:
    """Inverse of :func:`prepare` (in place): float layers (input_scale folded into weights),
    default attention processors, no hooks, no step index. Folded WD norms stay (exact in float)."""
    for parent_name, parent in list(unet.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, QUANT_LAYERS):
                setattr(parent, child_name, child.to_float())
    for m in unet.modules():
        if isinstance(m, Attention) and isinstance(m.processor, QuantAttnProcessor):
            m.set_processor(AttnProcessor2_0())
    for hooks in (unet._forward_pre_hooks, unet._forward_hooks):
        for hook_id in [k for k, h in hooks.items() if h in (_dq_pre_hook, _dq_post_hook)]:
            del hooks[hook_id]
            unet._forward_pre_hooks_with_kwargs.pop(hook_id, None)
            unet._forward_hooks_always_called.pop(hook_id, None)
    del unet.dq_step_index
    return unet


# ------------------------------------------------------------------------------------------ running
def unet_forward(unet: nn.Module, x_t: Tensor, raw_t: Tensor | int, cond: object = None) -> Tensor:
    """ε-prediction for one batch. ``cond``: None, a Tensor (encoder_hidden_states for
    UNet2DConditionModel, class_labels for UNet2DModel) or a dict of extra UNet kwargs."""
    if cond is None:
        return unet(x_t, raw_t).sample
    if isinstance(cond, dict):
        return unet(x_t, raw_t, **cond).sample
    if isinstance(unet, UNet2DConditionModel):
        return unet(x_t, raw_t, encoder_hidden_states=cond).sample
    return unet(x_t, raw_t, class_labels=cond).sample


def _unpack(batch: Sequence) -> tuple[Tensor, Tensor, object]:
    if len(batch) == 2:
        return batch[0], batch[1], None
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    raise ValueError(f"a batch is (x_t, raw_t) or (x_t, raw_t, cond), got {len(batch)} items")


@torch.no_grad()
def calibrate(
    unet: nn.Module,
    batches: Iterable[Sequence],
    method: str = "minmax",
    percentile: float = 99.99,
    samples_per_row: int = 512,
    mse_grid: int = 81,
) -> CalibrationReport:
    """Initialise every activation table from calibration data (per step: TPQ).

    Args:
        batches: yields (x_t [B, C, H, W], raw_t [B] or scalar, cond or None), see :func:`unet_forward`.
        method: "minmax" | "percentile" | "mse" (see TemporalActQuantizer.finish_calibration).
        samples_per_row: values kept per (step, head) row for percentile/mse (unused by minmax).

    Weight quantizers keep their state (normally on), so activations are those of the
    weight-quantized network. Steps never seen are filled from the nearest seen step (warned).
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method={method!r}; valid choices are {CALIBRATION_METHODS}")
    start_calibration(unet, samples_per_row=0 if method == "minmax" else samples_per_row)
    try:
        for batch in batches:
            x_t, raw_t, cond = _unpack(batch)
            unet_forward(unet, x_t, raw_t, cond)
    except BaseException:
        for m in unet.modules():
            if isinstance(m, TemporalActQuantizer):
                m.cancel_calibration()
        raise
    report = finish_calibration(unet, method, percentile=percentile, mse_grid=mse_grid)
    if report.unobserved:
        logger.warning("calibration: %d activation quantizers saw no data and keep their tables: %s",
                       len(report.unobserved), report.unobserved)
    if report.missing_rows:
        ts = unet.dq_step_index.timesteps
        raw = ts[report.missing_rows].tolist() if len(ts) else report.missing_rows
        logger.warning("calibration: raw timesteps %s were never seen; their tables were copied from "
                       "the nearest seen step", raw)
    return report


def _all_quantizers(unet: nn.Module) -> list[nn.Module]:
    return [m for m in unet.modules() if isinstance(m, (WeightQuantizer, TemporalActQuantizer))]


@torch.no_grad()
def input_absmax(unet: nn.Module, batches: Iterable[Sequence]) -> dict[str, Tensor]:
    """max |x_k| per input channel of every quantized layer's raw input, with all quantizers off
    (the float network). Name → [C_in] float32. Run it before WD/SQ."""
    quantizers = _all_quantizers(unet)
    saved = [q.enabled for q in quantizers]
    set_quant_state(unet, weight=False, act=False)
    try:
        with record_input_absmax(unet) as stats:
            for batch in batches:
                x_t, raw_t, cond = _unpack(batch)
                unet_forward(unet, x_t, raw_t, cond)
    finally:
        for q, e in zip(quantizers, saved):
            q.enabled = e
    return stats


# ------------------------------------------------------------------------------------------ WD / SQ
@dataclass(frozen=True)
class DilationGroup:
    """Quantized layers reading one input tensor, and the module producing it if 1/s folds into it exactly."""

    layers: tuple[str, ...]
    producer: str | None = None


def _affine_norm(m: nn.Module | None) -> bool:
    return isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None


def dilation_groups(unet: nn.Module) -> list[DilationGroup]:
    """Group the quantized layers that have an input activation quantizer by the input they read.

    Known shared inputs (diffusers structure):
      - Attention: to_q, to_k, to_v read the same hidden states in self-attention; in
        cross-attention to_k, to_v read encoder_hidden_states, to_q the hidden states.
        Producer: Attention.group_norm (UNet2DModel), or in a BasicTransformerBlock (layer_norm,
        no pos_embed) norm1 → attn1, norm2 → attn2.
      - BasicTransformerBlock: norm3 → ff.net[0].proj.
      - Transformer2DModel (continuous input): norm → proj_in.
    A producer is kept only when every consumer of its output is in the group (a float consumer
    would see the folded scale). Every other layer is its own group with no producer.
    """
    layers = {n: m for n, m in iter_quant_layers(unet) if m.act_quant is not None}
    groups: list[DilationGroup] = []
    claimed: set[str] = set()

    def add(names: list[str], producer: str | None) -> None:
        present = [n for n in names if n in layers and n not in claimed]
        if not present:
            return
        if len(present) != len(names):
            producer = None
        claimed.update(present)
        groups.append(DilationGroup(tuple(present), producer))

    def attention(path: str, attn: Attention, producer: str | None) -> None:
        p = f"{path}." if path else ""
        if attn.spatial_norm is not None:
            producer = None
        elif attn.group_norm is not None:
            producer = f"{p}group_norm" if _affine_norm(attn.group_norm) else None
        if attn.is_cross_attention:
            add([f"{p}to_q"], producer)
            add([f"{p}to_k", f"{p}to_v"], None)
        else:
            add([f"{p}to_q", f"{p}to_k", f"{p}to_v"], producer)

    for name, m in unet.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, BasicTransformerBlock):
            plain = m.norm_type == "layer_norm" and m.pos_embed is None
            attention(f"{p}attn1", m.attn1, f"{p}norm1" if plain and _affine_norm(m.norm1) else None)
            if m.attn2 is not None:
                attention(f"{p}attn2", m.attn2, f"{p}norm2" if plain and _affine_norm(m.norm2) else None)
            if hasattr(m.ff.net[0], "proj"):
                add([f"{p}ff.net.0.proj"], f"{p}norm3" if plain and _affine_norm(m.norm3) else None)
        elif isinstance(m, Attention):
            attention(name, m, None)  # not inside a transformer block (UNet2DModel)
        elif isinstance(m, Transformer2DModel) and m.is_input_continuous:
            add([f"{p}proj_in"], f"{p}norm" if isinstance(m.norm, nn.GroupNorm) and m.norm.affine else None)
    for n in layers:
        if n not in claimed:
            groups.append(DilationGroup((n,), None))
    return groups


def init_weight_quantizers(unet: nn.Module) -> None:
    """Min–max re-initialisation of every weight quantizer from its current weight."""
    for _, layer in iter_quant_layers(unet):
        layer.weight_quant.init_from(layer.weight)


def _apply_scaling(
    unet: nn.Module,
    scales: Callable[[DilationGroup, list[Tensor]], tuple[Tensor, dict[str, float]]],
    clamp_to_bounds: bool,
    fold: bool,
    act_absmax: dict[str, Tensor] | None,
) -> list[dict]:
    report = []
    for g in dilation_groups(unet):
        mods = [unet.get_submodule(n) for n in g.layers]
        s, stats = scales(g, [m.weight for m in mods])
        apply_dilation(mods, s, clamp_to_bounds=clamp_to_bounds)
        folded = None
        if fold and g.producer is not None:
            fold_input_scale(unet.get_submodule(g.producer), mods)
            folded = g.producer
        row: dict = {"layers": list(g.layers), "c_in": s.numel(), "folded_into": folded, **stats}
        if act_absmax is not None and g.layers[0] in act_absmax:
            row.update(activation_stats(s, act_absmax[g.layers[0]]))
        report.append(row)
    init_weight_quantizers(unet)
    return report


def apply_weight_dilation(
    unet: nn.Module, fold: bool = True, act_absmax: dict[str, Tensor] | None = None
) -> list[dict]:
    """Weight Dilation on every quantized layer with an input activation quantizer (after prepare,
    before calibrate). One s per group of layers sharing an input; 1/s folded into the producer where
    exact (``fold``), else carried in ``input_scale``. Weight quantizers are re-initialised (Δ_w
    unchanged by construction).

    Args:
        act_absmax: optional output of :func:`input_absmax` (recorded before WD) for the report.

    Returns:
        one dict per group: layers, c_in, folded_into, saturated_frac, s_min, s_median, s_p90,
        s_max (+ act_absmax_before/after, act_median_before/after when ``act_absmax`` is given).
    """
    def scales(g: DilationGroup, weights: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        plan = dilation_scales(weights)
        return plan.s, plan.stats

    return _apply_scaling(unet, scales, clamp_to_bounds=True, fold=fold, act_absmax=act_absmax)


def apply_smoothquant(
    unet: nn.Module, act_absmax: dict[str, Tensor], alpha: float = 0.5, fold: bool = True
) -> list[dict]:
    """SmoothQuant scaling (baseline to WD) with the same groups/folding; weight quantizers are
    re-initialised since the weight ranges change. ``act_absmax`` from :func:`input_absmax`."""
    def scales(g: DilationGroup, weights: list[Tensor]) -> tuple[Tensor, dict[str, float]]:
        if g.layers[0] not in act_absmax:
            raise ValueError(f"act_absmax has no entry for {g.layers[0]}; run input_absmax on the prepared UNet")
        s = smoothquant_scales(act_absmax[g.layers[0]], weights, alpha)
        return s, scale_stats(s)

    return _apply_scaling(unet, scales, clamp_to_bounds=False, fold=fold, act_absmax=act_absmax)


@dataclass
class StudentReport:
    scaling: list[dict] = field(default_factory=list)
    calibration: CalibrationReport | None = None


def build_student(
    unet: nn.Module,
    qcfg: QuantConfig,
    batches: Sequence[Sequence],
    scaling: str | None = "wd",
    calib_method: str = "minmax",
    sq_alpha: float = 0.5,
    record_activations: bool = True,
) -> tuple[nn.Module, StudentReport]:
    """prepare → WD / SmoothQuant / nothing → calibrate, in place.

    Args:
        batches: a re-iterable (list) of calibration batches; iterated twice when an activation
            pass is needed (SQ always, WD when ``record_activations`` for the report).
        scaling: "wd", "sq" or None.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r}; valid choices are {SCALINGS}")
    prepare(unet, qcfg)
    report = StudentReport()
    absmax = input_absmax(unet, batches) if scaling == "sq" or (scaling and record_activations) else None
    if scaling == "wd":
        report.scaling = apply_weight_dilation(unet, act_absmax=absmax)
    elif scaling == "sq":
        report.scaling = apply_smoothquant(unet, absmax, alpha=sq_alpha)
    report.calibration = calibrate(unet, batches, method=calib_method)
    return unet, report
