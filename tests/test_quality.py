"""Quantization quality on the embedded teacher, no training: W8A8 ≈ FP, W4A4 clearly worse, and
Weight Dilation shrinks the weight-quantization error of a W4 student (its claim) — measured as the
relative MSE of ε against the FP teacher on calibration inputs not used for initialisation."""
import copy

import pytest
import torch

from dq.data.calibration import CalibConfig, load_or_generate
from dq.models.load import ModelConfig, load_model
from dq.models.sampling import SamplerConfig, sampler_timesteps
from dq.models.student import calibrate, prepare, weight_dilation
from dq.quant.config import QuantConfig
from dq.quant.quantizers import set_quant_state


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher = load_model(ModelConfig(source="embedded"))
    sampler = SamplerConfig(name="ddim", steps=50, eta=0.0)
    calib_cfg = CalibConfig(n_samples=800, n_trajectories=64, batch_size=64, seed=0)
    calib = load_or_generate(teacher, sampler, calib_cfg, tmp_path_factory.mktemp("cache"))
    init = [(calib.x[:400], calib.t[:400], None)]
    held = (calib.x[400:], calib.t[400:])
    return teacher, tuple(sampler_timesteps(teacher, sampler)), init, held


def rel_mse(setup, bits, scaling, w_only: bool = False):
    teacher, timesteps, init, (x, t) = setup
    qcfg = QuantConfig(w_bits=bits[0], a_bits=bits[1], timesteps=timesteps)
    student = prepare(copy.deepcopy(teacher.denoiser), qcfg)
    if scaling == "wd":
        weight_dilation(student)
    calibrate(student, init, "minmax")
    if w_only:
        set_quant_state(student, weight=True, act=False)
    with torch.no_grad():
        ref = teacher.denoiser(x, t).sample
        return float((student.eval()(x, t).sample - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.e2e
def test_w8a8_close_and_w4a4_clearly_worse(setup):
    w8 = rel_mse(setup, (8, 8), None)
    w4 = rel_mse(setup, (4, 4), None)
    # 8-bit min–max fake quant of a well-conditioned net: ε error of a few percent of its energy at most.
    assert w8 < 0.02, w8
    assert w4 > 5 * w8, (w4, w8)


@pytest.mark.e2e
def test_weight_dilation_shrinks_weight_quantization_error(setup):
    plain = rel_mse(setup, (4, 4), None, w_only=True)
    dilated = rel_mse(setup, (4, 4), "wd", w_only=True)
    assert dilated < plain, (dilated, plain)
