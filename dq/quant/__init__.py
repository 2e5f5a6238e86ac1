"""Fake quantization for DilateQuant (torch only: no diffusers, no Lightning)."""

from dq.quant.calibration import (
    CalibrationReport,
    act_quantizers,
    finish_calibration,
    record_input_absmax,
    start_calibration,
)
from dq.quant.fake_quant import check_bits, fake_quant, fake_quant_nograd, minmax_params, round_ste
from dq.quant.layers import QUANT_LAYERS, QuantConv2d, QuantLinear, iter_quant_layers
from dq.quant.quantizers import TemporalActQuantizer, WeightQuantizer, set_quant_state
from dq.quant.steps import StepIndex

__all__ = [
    "CalibrationReport",
    "QUANT_LAYERS",
    "QuantConv2d",
    "QuantLinear",
    "StepIndex",
    "TemporalActQuantizer",
    "WeightQuantizer",
    "act_quantizers",
    "check_bits",
    "fake_quant",
    "fake_quant_nograd",
    "finish_calibration",
    "iter_quant_layers",
    "minmax_params",
    "record_input_absmax",
    "round_ste",
    "set_quant_state",
    "start_calibration",
]
