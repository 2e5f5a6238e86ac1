"""Fake quantization for DilateQuant (torch only: no diffusers, no Lightning).

    fake_quant    primitives: Q(x), round STE, min–max parameters
    quantizers    WeightQuantizer (per output channel), TemporalActQuantizer (TPQ tables)
    steps         StepIndex: raw timestep → table row, set per call
    layers        QuantConv2d / QuantLinear (from_float / to_float)
    config        QuantSpec (the quant config group) and QuantConfig (spec + timesteps)
    prepare       swap layers of any model, attach the step index (with removable hooks)
    calibration   calibration session and runner; per-channel input maxima
    dilation      Weight Dilation and SmoothQuant factors on plain tensors
    scaling       apply them to a prepared model, group by group
"""

from dq.quant.calibration import (CalibrationReport, act_quantizers, calibrate, finish_calibration, input_absmax,
                                  record_input_absmax, start_calibration)
from dq.quant.config import QuantConfig, QuantSpec
from dq.quant.fake_quant import check_bits, fake_quant, fake_quant_nograd, minmax_params, round_ste
from dq.quant.layers import QUANT_LAYERS, QuantConv2d, QuantLinear, iter_quant_layers
from dq.quant.quantizers import TemporalActQuantizer, WeightQuantizer, set_quant_state
from dq.quant.steps import StepIndex

__all__ = [
    "CalibrationReport", "QUANT_LAYERS", "QuantConfig", "QuantConv2d", "QuantLinear", "QuantSpec", "StepIndex",
    "TemporalActQuantizer", "WeightQuantizer", "act_quantizers", "calibrate", "check_bits", "fake_quant",
    "fake_quant_nograd", "finish_calibration", "input_absmax", "iter_quant_layers", "minmax_params",
    "record_input_absmax", "round_ste", "set_quant_state", "start_calibration",
]
