"""The continuous per-step form of the activation parameters (dq.quant.knots)."""

import pytest
import torch

from dq.models.load import build_arch
from dq.models.student import calibrate, prepare
from dq.quant.act_quantizer import TemporalActQuantizer
from dq.quant.config import QuantConfig
from dq.quant.knots import KnotActQuantizer, hat_weights, knot_positions
from dq.quant.retarget import retarget

TRAINED = (900, 700, 500, 300, 100)


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 16, 16, generator=g) * (1 + i),
             torch.tensor(TRAINED)[torch.randint(0, len(TRAINED), (8,), generator=g)], None) for i in range(n)]


def student(**kw):
    m = prepare(build_arch("unet2d").denoiser, QuantConfig(w_bits=4, a_bits=4, timesteps=TRAINED, **kw))
    calibrate(m, batches(), "minmax")
    return m.eval()


def outputs(m, x, t):
    with torch.no_grad():
        return m(x, t).sample


def test_hat_weights_interpolate_and_clamp():
    knots = torch.tensor([100.0, 500.0, 900.0], dtype=torch.float64)
    w = hat_weights(knots, torch.tensor([100, 300, 900, 0, 999]))
    assert torch.equal(w.sum(1), torch.ones(5, dtype=torch.float64))
    assert w[0].tolist() == [1, 0, 0] and w[1].tolist() == [0.5, 0.5, 0] and w[2].tolist() == [0, 0, 1]
    assert w[3].tolist() == [1, 0, 0] and w[4].tolist() == [0, 0, 1]  # outside the knots: the nearest end
    assert knot_positions(torch.tensor(TRAINED), 3).tolist() == [100.0, 500.0, 900.0]


def test_k_equal_t_reproduces_the_per_step_tables():
    table, knots = student(), student(tpq_knots=len(TRAINED))
    assert any(isinstance(q, KnotActQuantizer) for q in knots.modules())
    x, t = torch.randn(5, 1, 16, 16), torch.tensor(TRAINED)
    for qt, qk in zip([q for q in table.modules() if isinstance(q, TemporalActQuantizer)],
                      [q for q in knots.modules() if isinstance(q, TemporalActQuantizer)]):
        if qt.num_steps == 1:
            continue
        dk, zk = qk._row_params(torch.arange(len(TRAINED)))
        torch.testing.assert_close(dk, qt.delta.clamp_min(1e-8), rtol=1e-5, atol=0)
        assert torch.equal(torch.round(zk), torch.round(qt.zero_point))
    torch.testing.assert_close(outputs(knots, x, t), outputs(table, x, t), rtol=1e-4, atol=1e-4)


def test_k_one_is_exactly_the_shared_table():
    shared, k1 = student(shared_tables=True), student(tpq_knots=1)
    x, t = torch.randn(5, 1, 16, 16), torch.tensor(TRAINED)
    assert torch.equal(outputs(k1, x, t), outputs(shared, x, t))


def test_knot_form_trains_reads_any_timestep_and_round_trips():
    m = student(tpq_knots=3)
    m.train().requires_grad_(True)
    m(torch.randn(4, 1, 16, 16), torch.tensor([900, 700, 300, 100])).sample.pow(2).mean().backward()
    q = next(q for q in m.modules() if isinstance(q, KnotActQuantizer))
    assert q.log_scale.grad is not None and q.log_scale.grad.abs().sum() > 0
    m.eval().requires_grad_(False)
    fresh = prepare(build_arch("unet2d", seed=1).denoiser,
                    QuantConfig(w_bits=4, a_bits=4, timesteps=TRAINED, tpq_knots=3))
    fresh.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(outputs(fresh, x, torch.tensor([500, 100])), outputs(m, x, torch.tensor([500, 100])))
    before = outputs(m, x, torch.tensor([500, 100]))
    mapping = retarget(m, (950, 500, 250, 100))
    assert mapping.continuous and mapping.exact == [500, 100]
    assert torch.equal(outputs(m, x, torch.tensor([500, 100])), before)  # same t, same parameters
    assert torch.isfinite(outputs(m, x, torch.tensor([950, 250]))).all()


@pytest.mark.parametrize("bad", [dict(tpq_knots=6), dict(tpq_knots=2, shared_tables=True)])
def test_bad_knot_counts_are_refused(bad):
    with pytest.raises(ValueError, match="tpq_knots"):
        QuantConfig(w_bits=4, a_bits=4, timesteps=TRAINED, **bad)


@pytest.mark.parametrize("form", [dict(), dict(tpq_knots=3), dict(tpq_knots=len(TRAINED))])
@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_pooled_init_starts_every_step_as_the_shared_table(form, method):
    def calibrated(**kw):
        m = prepare(build_arch("unet2d").denoiser, QuantConfig(w_bits=4, a_bits=4, timesteps=TRAINED, **kw))
        calibrate(m, batches(), method, pooled=not kw.get("shared_tables"), samples_per_row=64)
        return m.eval()

    shared, pooled = calibrated(shared_tables=True), calibrated(**form)
    per_step = [q for q in pooled.modules() if isinstance(q, TemporalActQuantizer) and q.num_steps > 1]
    assert per_step
    for q in per_step:  # the per-step form kept, every row equal
        d, z = q._row_params(torch.arange(len(TRAINED)))
        assert torch.equal(d, d[:1].expand_as(d)) and torch.equal(z, z[:1].expand_as(z))
        if isinstance(q, KnotActQuantizer):
            assert not q.log_scale.any() and not q.zp_offset.any()
    x, t = torch.randn(5, 1, 16, 16), torch.tensor(TRAINED)
    assert torch.equal(outputs(pooled, x, t), outputs(shared, x, t))
