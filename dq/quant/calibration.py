"""Model-agnostic calibration session: put every activation quantizer of a model in recording mode,
let the caller run its data through the model, then set all tables. Also records per-input-channel
activation maxima of the quantized layers (for SmoothQuant and the WD report).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dq.quant.layers import QuantConv2d, iter_quant_layers
from dq.quant.quantizers import TemporalActQuantizer


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


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, TemporalActQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, TemporalActQuantizer):
            yield name, m


def start_calibration(model: nn.Module, samples_per_row: int = 0, seed: int = 0) -> None:
    """Every TemporalActQuantizer of ``model`` records statistics and passes its input through unchanged."""
    for _, q in act_quantizers(model):
        q.start_calibration(samples_per_row=samples_per_row, seed=seed)


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
