"""Training switches for per-step activation parameters: step-stratified batches, the smoothness penalty."""

import math

import pytest
import torch

from dq.data.calibration import StepSeededBatches
from dq.distill.bkd import DistillConfig
from dq.errors import DQError
from dq.quant.act_quantizer import TemporalActQuantizer
from dq.quant.knots import KnotActQuantizer

ROWS = torch.arange(50).repeat_interleave(10)[torch.randperm(500, generator=torch.Generator().manual_seed(0))]


def batch(bs, step=0, rank=0, world=1, rows=ROWS):
    return next(iter(StepSeededBatches(len(ROWS), bs, seed=3, start=step, stop=step + 1, rank=rank, world=world,
                                       rows=rows)))


def test_small_batches_take_distinct_evenly_spaced_steps():
    for step in range(20):
        steps = sorted(ROWS[batch(32, step)].tolist())
        assert len(set(steps)) == 32
        gaps = [b - a for a, b in zip(steps, steps[1:])] + [steps[0] + 50 - steps[-1]]
        assert set(gaps) <= {1, 2}  # 50 steps / 32 samples: every gap 1 or 2 (around the circle)


def test_large_batches_cover_every_step_evenly_and_are_reproducible():
    counts = torch.bincount(ROWS[batch(120, 7)], minlength=50)
    assert counts.min() == 2 and counts.max() == 3 and counts.sum() == 120
    assert batch(120, 7) == batch(120, 7) and batch(120, 7) != batch(120, 8)
    ranks = [batch(60, 5, r, 2) for r in range(2)]  # DDP: the ranks split the one stratified batch of 120
    assert sorted(ranks[0] + ranks[1]) == sorted(batch(120, 5)) and len(ranks[0]) == len(ranks[1]) == 60


def test_uniform_draws_unchanged_without_rows():
    g = torch.Generator().manual_seed(3 * 1_000_003 + 4)
    assert batch(32, 4, rows=None) == torch.randperm(500, generator=g)[:32].tolist()


def test_roughness_is_zero_on_lines_and_the_squared_second_difference_otherwise():
    q = TemporalActQuantizer(4, num_steps=5)
    with torch.no_grad():
        q.delta.copy_(torch.exp(torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])))
        q.zero_point.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert q.roughness().item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        q.zero_point[2] += 1.0  # second differences +1, −2, +1 around row 2
    assert q.roughness().item() == pytest.approx(6.0, rel=1e-6)
    q.roughness().backward()
    assert q.zero_point.grad[2].item() == pytest.approx(2 * (1 * 1 + (-2) * (-2) + 1 * 1), rel=1e-6)
    assert TemporalActQuantizer(4, num_steps=1).roughness().item() == 0.0


def test_knot_roughness_is_along_the_knots():
    q = KnotActQuantizer(4, num_steps=50, knots=torch.linspace(1, 981, 4))
    with torch.no_grad():
        q.log_scale.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
    assert q.roughness().item() == pytest.approx((-1.0) ** 2 + 0.5 ** 2, rel=1e-5)


def test_negative_smoothness_is_refused():
    with pytest.raises(DQError, match=r"distill.tpq_smooth=-1.0 must be >= 0"):
        DistillConfig(tpq_smooth=-1.0)
    assert math.isfinite(DistillConfig(tpq_smooth=0.1).tpq_smooth)


def test_knot_deviations_get_their_own_learning_rate():
    from dq.distill.bkd import param_groups
    from dq.models.load import build_arch
    from dq.models.student import prepare
    from dq.quant.config import QuantConfig

    m = prepare(build_arch("unet2d").denoiser, QuantConfig(w_bits=4, a_bits=8, timesteps=(900, 500, 100), tpq_knots=2))
    knot_ids = {id(p) for q in m.modules() if isinstance(q, KnotActQuantizer) for p in (q.log_scale, q.zp_offset)}
    groups = {g["name"]: g for g in param_groups(m, DistillConfig(lr_act=1e-3, lr_act_knots=5e-2))}
    assert {id(p) for g in groups.values() if g["name"].startswith("act_knots") for p in g["params"]} == knot_ids
    assert groups["act_knots_8bit"]["lr"] == pytest.approx(5e-2 * 15 / 255)  # the same bit rule as Δ_x
    assert not knot_ids & {id(p) for p in groups["act_8bit"]["params"]}
    default = param_groups(m, DistillConfig(lr_act=1e-3))
    assert not any(g["name"].startswith("act_knots") for g in default)  # None: they train with lr_act


def test_more_knots_than_steps_become_one_per_step_and_are_recorded():
    from dq.methods.base import Job
    from dq.quant.config import QuantSpec

    job = Job(teacher=None, quant=QuantSpec(), distill=DistillConfig(), timesteps=[900, 500, 100],
              calibration=lambda: None, fit=lambda *a: {})
    assert job.quant_config(False, 10).tpq_knots == 3 and job.quant_config(False, 2).tpq_knots == 2
    assert job.notes == ["method.tpq_knots=10 > the sampler's 3 steps: one knot per step (K=3), the per-step "
                         "table's expressiveness in the knot form"]
    assert job.quant_config(True, 0).shared_tables
