"""Model-agnostic calibration session: put every activation quantizer of a model in recording mode,
let the caller run its data through the model, then set all tables. Also records per-input-channel
activation maxima of the quantized layers (for SmoothQuant and the WD report).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dq.quant.layers import QuantConv2d, iter_quant_layers
from dq.quant.quantizers import CALIBRATION_METHODS, TemporalActQuantizer, WeightQuantizer, set_quant_state

log = logging.getLogger(__name__)


@dataclass
class CalibrationReport:
    """What :func:`finish_calibration` did.

    Attributes:
        calibrated: number of activation quantizers whose tables were set.
        unobserved: names of quantizers that saw no data (tables left unchanged).
        missing_rows: sorted table rows (steps) that some quantizer never saw; filled from the
            nearest observed row.
    """

    calibrated: int = 0
    unobserved: list[str] = field(default_factory=list)
    missing_rows: list[int] = field(default_factory=list)
    missing_timesteps: list[int] = field(default_factory=list)

    def notes(self) -> list[str]:
        """What calibration had to fill in by rule, for results.json (empty when nothing was)."""
        out = []
        if self.unobserved:
            out.append(f"calibration: {len(self.unobserved)} activation quantizers saw no data and keep their "
                       f"initial tables: {self.unobserved}")
        if self.missing_rows:
            out.append(f"calibration: raw timesteps {self.missing_timesteps or self.missing_rows} were never seen; "
                       f"their tables were copied from the nearest seen step")
        return out


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, TemporalActQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, TemporalActQuantizer):
            yield name, m


def start_calibration(model: nn.Module, samples_per_row: int = 0, seed: int = 0, pooled: bool = False) -> None:
    """Every TemporalActQuantizer of ``model`` records statistics and passes its input through unchanged
    (``pooled``: one set of statistics over all steps, given to every step's row)."""
    for _, q in act_quantizers(model):
        q.start_calibration(samples_per_row=samples_per_row, seed=seed, pooled=pooled)


def finish_calibration(
    model: nn.Module, method: str = "minmax", percentile: float = 99.99, mse_grid: int = 81
) -> CalibrationReport:
    """Set the tables of every calibrating quantizer (see TemporalActQuantizer.finish_calibration)."""
    report = CalibrationReport()
    missing: set[int] = set()
    for name, q in act_quantizers(model):
        if not q.calibrating:
            continue
        if not q.has_observations:
            q.cancel_calibration()
            report.unobserved.append(name)
            continue
        missing.update(q.finish_calibration(method, percentile=percentile, mse_grid=mse_grid).tolist())
        report.calibrated += 1
    report.missing_rows = sorted(missing)
    return report


@contextmanager
def record_input_absmax(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Within the context, record max |x_k| per input channel of every QuantConv2d/QuantLinear input.

    Yields a dict name → [C_in] float32 tensor, filled while the model runs. The recorded input is
    the layer's raw input, before ``input_scale`` (record on the undilated model).
    """
    stats: dict[str, Tensor] = {}
    handles = []

    def make_hook(name: str, channel_axis: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            dims = [d for d in range(x.ndim) if d != channel_axis % x.ndim]
            m = x.abs().amax(dim=dims).float()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)

        return hook

    for name, layer in iter_quant_layers(model):
        axis = 1 if isinstance(layer, QuantConv2d) else -1
        handles.append(layer.register_forward_pre_hook(make_hook(name, axis)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, run: Callable[[object], object], method: str = "minmax",
              percentile: float = 99.99, samples_per_row: int = 512, mse_grid: int = 81,
              pooled: bool = False) -> CalibrationReport:
    """Initialise every activation table of ``model`` from data (per step: TPQ; ``pooled``: every step's
    row from the statistics of all steps, i.e. per-step parameters that start as the shared table).

    ``run(batch)`` runs the model on one batch (the model family knows how). Weight quantizers keep
    their state, so activations are those of the weight-quantized network. Steps never seen are
    filled from the nearest seen step; both that and quantizers that saw nothing are logged.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method={method!r}; valid choices are {CALIBRATION_METHODS}")
    start_calibration(model, samples_per_row=0 if method == "minmax" else samples_per_row, pooled=pooled)
    try:
        for batch in batches:
            run(batch)
    except BaseException:
        for _, q in act_quantizers(model):
            q.cancel_calibration()
        raise
    report = finish_calibration(model, method, percentile=percentile, mse_grid=mse_grid)
    ts = getattr(model, "dq_step_index", None)
    if report.missing_rows and ts is not None and len(ts):
        report.missing_timesteps = ts.timesteps[report.missing_rows].tolist()
    for note in report.notes():
        log.warning(note)
    return report


@torch.no_grad()
def input_absmax(model: nn.Module, batches: Iterable, run: Callable[[object], object]) -> dict[str, Tensor]:
    """max |x_k| per input channel of every quantized layer's raw input, with all quantizers off (the
    float network). Name → [C_in] float32. Run it before WD / SmoothQuant."""
    quantizers = [m for m in model.modules() if isinstance(m, (WeightQuantizer, TemporalActQuantizer))]
    saved = [q.enabled for q in quantizers]
    set_quant_state(model, weight=False, act=False)
    try:
        with record_input_absmax(model) as stats:
            for batch in batches:
                run(batch)
    finally:
        for q, e in zip(quantizers, saved):
            q.enabled = e
    return stats
