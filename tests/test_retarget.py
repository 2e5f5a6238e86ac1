"""Moving per-step activation tables to another schedule (dq.quant.retarget)."""
import copy

import pytest
import torch

from dq.models.load import build_arch
from dq.models.student import prepare
from dq.quant.act_quantizer import TemporalActQuantizer
from dq.quant.config import QuantConfig
from dq.quant.fake_quant import qmax_of
from dq.quant.retarget import plan, retarget

TRAINED = (900, 700, 500, 300, 100)


def student():
    m = build_arch("unet2d").denoiser
    prepare(m, QuantConfig(w_bits=4, a_bits=4, timesteps=TRAINED))
    g = torch.Generator().manual_seed(0)
    for q in m.modules():  # distinct tables per row, so a wrong row or a blend shows
        if isinstance(q, TemporalActQuantizer):
            with torch.no_grad():
                q.delta.copy_(torch.rand(q.delta.shape, generator=g) * 0.1 + 0.01)
                q.zero_point.copy_(torch.randint(0, 16, q.zero_point.shape, generator=g).float())
    return m.eval()


def quantizers(m):
    return [q for q in m.modules() if isinstance(q, TemporalActQuantizer)]


def test_plan_classifies_exact_interpolated_clamped():
    lo, hi, w, m = plan(TRAINED, [950, 900, 600, 100, 20])
    assert m.exact == [900, 100] and m.interpolated == [600] and m.clamped == [950, 20]
    assert lo.tolist() == [0, 0, 2, 4, 4] and hi.tolist() == [0, 0, 1, 4, 4]  # rows in the trained order
    assert w[2].item() == pytest.approx(0.5)


def test_trained_timesteps_keep_their_rows_bit_for_bit_in_any_order():
    m = student()
    before = [(q.delta.detach().clone(), q.zero_point.detach().clone()) for q in quantizers(m)]
    mapping = retarget(m, (100, 500, 900))
    assert mapping.exact == [100, 500, 900] and not mapping.interpolated and not mapping.clamped
    assert m.dq_step_index.timesteps.tolist() == [100, 500, 900]
    for q, (d, z) in zip(quantizers(m), before):
        assert torch.equal(q.delta, d[[4, 2, 0]]) and torch.equal(q.zero_point, z[[4, 2, 0]])
        assert q.num_steps == 3


def test_interpolation_is_of_the_range_endpoints_and_stays_between_neighbours():
    m = student()
    before = [(q.delta.detach().clone(), q.zero_point.detach().clone(), q.bits) for q in quantizers(m)]
    retarget(m, (600,))
    for q, (d, z, bits) in zip(quantizers(m), before):
        qmax = qmax_of(bits)
        lo_ends, hi_ends = -z * d, (qmax - z) * d
        new_lo, new_hi = -q.zero_point * q.delta, (qmax - q.zero_point) * q.delta
        mid_lo, mid_hi = (lo_ends[1] + lo_ends[2]) / 2, (hi_ends[1] + hi_ends[2]) / 2
        # Δ exact from the interpolated width; z rounded to the grid, so the ends move by at most Δ/2
        torch.testing.assert_close(q.delta[0], (mid_hi - mid_lo) / qmax)
        assert bool(((new_lo - mid_lo).abs() <= q.delta[0] / 2 + 1e-7).all())
        assert bool(((new_hi - mid_hi).abs() <= q.delta[0] / 2 + 1e-7).all())


def test_outputs_at_trained_timesteps_unchanged_and_new_timesteps_run():
    m = student()
    ref = copy.deepcopy(m)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        want = ref(x, torch.tensor([500, 100])).sample
        retarget(m, (800, 500, 250, 100, 0))
        assert torch.equal(m(x, torch.tensor([500, 100])).sample, want)
        assert torch.isfinite(m(x, torch.tensor([250, 0])).sample).all()
        with pytest.raises(ValueError, match="not in the schedule"):
            m(x, torch.tensor([300, 300]))  # no longer a row of this schedule


def test_shared_tables_need_no_mapping_and_bad_schedules_are_refused():
    m = build_arch("unet2d").denoiser
    prepare(m, QuantConfig(w_bits=4, a_bits=4, timesteps=TRAINED, shared_tables=True))
    assert retarget(m, (10, 20)) is None
    with pytest.raises(ValueError, match="unique"):
        retarget(student(), (500, 500))
