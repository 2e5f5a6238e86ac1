"""WeightQuantizer, TemporalActQuantizer (TPQ), StepIndex, QuantConv2d/QuantLinear."""

import copy
import logging

import pytest
import torch
from torch import nn

from dq.quant import (
    QuantConv2d,
    QuantLinear,
    StepIndex,
    TemporalActQuantizer,
    WeightQuantizer,
    fake_quant,
    finish_calibration,
    minmax_params,
    record_input_absmax,
    start_calibration,
)


# tiny ops: thread start-up costs more than the work, and 2 threads thrash on a shared 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")


def act_quant(bits=4, steps=5, heads=None, timesteps=None):
    si = StepIndex(timesteps if timesteps is not None else list(range(steps * 100 - 1, 0, -100)))
    q = TemporalActQuantizer(bits, steps, heads=heads)
    q.set_step_index(si)
    return q, si


# ------------------------------------------------------------------------------ StepIndex
def test_step_index_lookup_and_errors():
    si = StepIndex([999, 899, 799, 699])
    assert si.rows(torch.tensor([699, 999, 899])).tolist() == [3, 0, 1]
    assert si.rows(799).item() == 2
    assert si.rows(torch.tensor([899.0])).tolist() == [1]
    with pytest.raises(ValueError, match=r"\[500\].*699\.\.999"):
        si.rows(torch.tensor([999, 500]))
    with pytest.raises(ValueError, match="integers"):
        si.rows(torch.tensor([899.5]))
    with pytest.raises(ValueError, match="duplicates"):
        StepIndex([10, 5, 5])


def test_step_index_use_restores_on_exception():
    si = StepIndex([3, 2, 1])
    assert si.current is None
    with si.use(torch.tensor([0, 1])):
        with pytest.raises(KeyError):
            with si.use(torch.tensor([2])):
                raise KeyError
        assert si.current.tolist() == [0, 1]
    assert si.current is None
    assert "timesteps" in si.state_dict()


# ------------------------------------------------------------------------------ WeightQuantizer
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weight_quantizer_error_bound(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) * 4
    wq = WeightQuantizer(16, bits)
    wq.init_from(w)
    q = wq(w)
    half = (wq.delta / 2).view(-1, 1, 1, 1)
    assert ((q - w).abs() <= half * (1 + 1e-6)).all()  # min–max: no clipping anywhere
    assert (q - w).abs().amax() > 0


def test_weight_quantizer_state_and_cache():
    wq = WeightQuantizer(4, 8, learn_zero_point=True)
    assert set(wq.state_dict()) == {"delta", "zero_point"}
    wq2 = WeightQuantizer(4, 8)
    assert set(wq2.state_dict()) == {"delta", "zero_point"} and not wq2.zero_point.requires_grad
    w = nn.Parameter(torch.randn(4, 6))
    wq.init_from(w)
    with torch.no_grad():
        a = wq(w)
        assert wq(w) is a  # cached
        w.mul_(2)  # in-place update bumps the version: cache invalid
        b = wq(w)
        assert b is not a and torch.equal(b, wq._quantize(w))
        wq.delta.mul_(1.5)
        assert wq(w) is not b
    out = wq(w)
    assert out.requires_grad and wq._cache is None  # grad mode never uses the cache
    wq.enabled = False
    assert wq(w) is w


def test_weight_quantizer_bits_error():
    with pytest.raises(ValueError, match="weight bits=9"):
        WeightQuantizer(3, 9)


# ------------------------------------------------------------------------------ TPQ
def _random_tables(q, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q.delta.copy_(torch.rand(q.delta.shape, generator=g) * 0.3 + 0.05)
        q.zero_point.copy_(torch.randint(0, 2**q.bits, q.delta.shape, generator=g).float())


def test_tpq_each_sample_uses_its_own_row():
    q, si = act_quant(steps=5)
    _random_tables(q)
    x = torch.randn(6, 3, 4, 4) * 2
    rows = torch.tensor([4, 0, 2, 2, 1, 4])
    with torch.no_grad(), si.use(rows):
        out = q(x)
    for i, r in enumerate(rows.tolist()):
        ref = fake_quant(x[i], q.delta[r].detach(), q.zero_point[r].detach(), 4)
        assert torch.equal(out[i], ref)
    # the autograd path gives the same numbers
    with si.use(rows):
        assert torch.equal(q(x.requires_grad_(True)), out)


def test_tpq_heads():
    q, si = act_quant(steps=3, heads=2)
    _random_tables(q, 1)
    x = torch.randn(4, 2, 5, 3)
    rows = torch.tensor([2, 0, 1, 2])
    with torch.no_grad(), si.use(rows):
        out = q(x)
    for i, r in enumerate(rows.tolist()):
        for h in range(2):
            ref = fake_quant(x[i, h], q.delta[r, h].detach(), q.zero_point[r, h].detach(), 4)
            assert torch.equal(out[i, h], ref)
    with pytest.raises(ValueError, match="expected 2 heads"):
        with si.use(rows):
            q(torch.randn(4, 3, 5, 3))


def test_tpq_broadcast_row_and_errors():
    q, si = act_quant(steps=5)
    _random_tables(q)
    x = torch.randn(3, 7)
    with torch.no_grad():
        with si.use(torch.tensor([3])):
            a = q(x)
        with si.use(torch.tensor([3, 3, 3])):
            assert torch.equal(a, q(x))
        with pytest.raises(RuntimeError, match="dq_step_index.use"):
            q(x)
        with si.use(torch.tensor([1, 2])), pytest.raises(ValueError, match="batch of 3 samples but 2"):
            q(x)
        q.enabled = False
        assert q(x) is x  # disabled: identity, rows not needed


def test_tpq_shared_mode_ignores_rows():
    q = TemporalActQuantizer(4, 1)
    assert q.delta.shape == (1,)
    x = torch.randn(2, 5)
    assert torch.equal(q(x), fake_quant(x, torch.ones(()), torch.zeros(()), 4))


def test_tpq_gradients_reach_only_used_rows():
    q, si = act_quant(steps=6, heads=2)
    _random_tables(q, 2)
    x = torch.randn(4, 2, 8, 3, requires_grad=True)
    with si.use(torch.tensor([1, 4, 4, 1])):
        q(x).pow(2).sum().backward()
    used = torch.zeros(6, dtype=torch.bool)
    used[[1, 4]] = True
    assert (q.delta.grad[~used] == 0).all() and (q.zero_point.grad[~used] == 0).all()
    assert (q.delta.grad[used] != 0).all()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tpq_state_dict_has_tables_only():
    q, _ = act_quant(steps=7, heads=3)
    assert {k: tuple(v.shape) for k, v in q.state_dict().items()} == {"delta": (7, 3), "zero_point": (7, 3)}


# ------------------------------------------------------------------------------ calibration
def test_calibration_minmax_per_row_and_fill():
    q, si = act_quant(bits=8, steps=5)
    q.start_calibration()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 5, generator=g) * (1 + i) + i for i in range(3)]
    rows = [torch.tensor([0, 1, 0, 3]), torch.tensor([3, 3, 1, 0]), torch.tensor([1])]
    for x, r in zip(xs, rows):
        with si.use(r):
            assert q(x) is x  # calibration returns the input unchanged
    lo, hi = torch.full((5,), float("inf")), torch.full((5,), float("-inf"))
    for x, r in zip(xs, rows):
        for i in range(x.shape[0]):
            t = int(r.expand(x.shape[0])[i])
            lo[t] = min(lo[t], x[i].min())
            hi[t] = max(hi[t], x[i].max())
    missing = q.finish_calibration("minmax")
    assert missing.tolist() == [2, 4]
    d, z = minmax_params(lo, hi, 8)
    for t, src in enumerate([0, 1, 1, 3, 3]):  # 2 → nearest 1 (tie 1/3 → lower), 4 → 3
        assert q.delta[t].item() == d[src].item() and q.zero_point[t].item() == z[src].item()
    assert not q.calibrating


def test_calibration_subsample_percentile_and_mse():
    q, si = act_quant(bits=4, steps=2, heads=2)
    q.start_calibration(samples_per_row=256)
    torch.manual_seed(1)
    laplace = torch.distributions.Laplace(0.0, 1.0)  # heavy tails: clipping pays off at 4 bits
    data = []
    for _ in range(5):
        x = laplace.sample((3, 2, 500))
        data.append(x)
        with si.use(torch.tensor([0, 1, 0])):
            q(x)
    vals = q._subsample(q._calib, 4).view(2, 2, 256)
    # every kept value is a value of its row and head (row 0: samples 0 and 2 of each batch), and the
    # subsample is spread over all batches (uniform: about 1/5 from the first of five, not all of it)
    row0_h1 = torch.cat([x[[0, 2], 1].flatten() for x in data])
    assert torch.isin(vals[0, 1], row0_h1).all()
    first = torch.isin(vals[0, 1], data[0][[0, 2], 1].flatten()).float().mean().item()
    assert 0.05 < first < 0.4
    qp, qm = copy.deepcopy(q), copy.deepcopy(q)
    qm.set_step_index(si)  # a deepcopy carries its own copy of the StepIndex reference
    q.finish_calibration("minmax")
    qp.finish_calibration("percentile", percentile=99.0)
    qm.finish_calibration("mse")
    assert (qp.delta < q.delta).all()  # the tails are clipped
    assert (qm.delta < q.delta).all()
    x = data[0]
    with torch.no_grad(), si.use(torch.tensor([0, 1, 0])):
        err = {n: (m(x) - x).pow(2).mean().item() for n, m in (("minmax", q), ("mse", qm))}
    assert err["mse"] < err["minmax"]


def test_calibration_errors():
    q, si = act_quant(steps=3)
    with pytest.raises(RuntimeError, match="without start_calibration"):
        q.finish_calibration()
    q.start_calibration()
    with pytest.raises(RuntimeError, match="observed no data"):
        q.finish_calibration()
    with si.use(torch.tensor([0])):
        q(torch.randn(1, 4))
    with pytest.raises(ValueError, match="samples_per_row"):
        q.finish_calibration("mse")
    with pytest.raises(ValueError, match="method='max'"):
        q.finish_calibration("max")


# ------------------------------------------------------------------------------ layers
def _hetero(w: torch.Tensor, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = [1, w.shape[1]] + [1] * (w.ndim - 2)
    return w * torch.exp(torch.randn(shape, generator=g))


def test_quant_layers_from_float_to_float():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    lin = nn.Linear(6, 4)
    x_c, x_l = torch.randn(2, 6, 7, 7), torch.randn(2, 3, 6)
    for fl, x in ((conv, x_c), (lin, x_l)):
        ref = fl(x)
        cls = QuantConv2d if isinstance(fl, nn.Conv2d) else QuantLinear
        q = cls.from_float(fl, w_bits=4, a_bits=4, num_steps=1)
        assert q.weight is fl.weight and isinstance(q, type(fl))
        assert set(q.state_dict()) == {
            "weight", "bias", "input_scale", "weight_quant.delta", "weight_quant.zero_point",
            "act_quant.delta", "act_quant.zero_point",
        }
        q.weight_quant.enabled = False
        q.act_quant.enabled = False
        assert torch.equal(q(x), ref)
        with torch.no_grad():
            q.input_scale.copy_(torch.rand(6) + 0.5)
            q.weight.div_(q.input_scale.view([1, -1] + [1] * (q.weight.ndim - 2)))
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-6)
        f = q.to_float()
        assert type(f) is type(fl)
        torch.testing.assert_close(f(x), ref, rtol=1e-5, atol=1e-6)
        q.weight_quant.enabled = True
        q.act_quant.enabled = True
        assert not torch.equal(q(x), q.to_float()(x))  # quantization does something


def test_quant_layer_rejects_grouped_conv_and_bad_bits():
    with pytest.raises(ValueError, match="groups=2"):
        QuantConv2d.from_float(nn.Conv2d(4, 4, 3, groups=2), 4, 4)
    with pytest.raises(ValueError, match="activation bits=1"):
        QuantLinear.from_float(nn.Linear(3, 3), 4, 1)


def test_record_input_absmax_and_model_calibration():
    model = nn.Sequential(QuantLinear.from_float(nn.Linear(5, 4), 8, 8), nn.ReLU(),
                          QuantLinear.from_float(nn.Linear(4, 2), 8, None))
    x = torch.randn(3, 5) * torch.arange(1.0, 6.0)
    with record_input_absmax(model) as stats:
        model(x)
    assert torch.equal(stats["0"], x.abs().amax(0))
    assert set(stats) == {"0", "2"}
    assert not model[0]._forward_pre_hooks  # hooks removed
    start_calibration(model)
    model(x)
    rep = finish_calibration(model)
    assert rep.calibrated == 1 and rep.unobserved == []
    d, _ = minmax_params(x.min(), x.max(), 8)
    assert model[0].act_quant.delta.item() == pytest.approx(d.item())


def test_logger_is_quiet_by_default(caplog):
    # finish_calibration itself does not log; dq.quant.calibration.calibrate reports once per model
    q, si = act_quant(steps=3)
    q.start_calibration()
    with si.use(torch.tensor([0])):
        q(torch.randn(1, 3))
    with caplog.at_level(logging.WARNING):
        assert q.finish_calibration().tolist() == [1, 2]
    assert not caplog.records
