"""Weight Dilation plan/apply/fold and SmoothQuant scales on plain layers (UNet-level WD: test_prepare.py)."""

import pytest
import torch
from torch import nn

from dq.quant.dilation import (
    activation_stats,
    apply_dilation,
    dilation_scales,
    effective_bounds,
    fold_input_scale,
    smoothquant_scales,
)
from dq.quant import QuantConv2d, QuantLinear


# tiny ops: thread start-up costs more than the work, and 2 threads thrash on a shared 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")


def test_hand_computed_example():
    # 3 output × 6 input channels. Row 1 is all non-positive (effective max 0); input channel 3 is
    # all zero; channel 5 has a zero entry in row 0.
    w = torch.tensor([
        [4.0, -2.0, 1.0, 0.0, 0.5, 0.0],
        [-8.0, -1.0, -2.0, 0.0, -1.0, -0.5],
        [1.0, 3.0, -0.5, 0.0, -1.5, 0.25],
    ])
    plan = dilation_scales(w)
    # bounds: row0 [−2, 4], row1 [−8, 0], row2 [−1.5, 3]
    # ch0 holds row0 max and row1 min, ch1 row0 min and row2 max, ch4 row2 min → A = {0, 1, 4}
    # ch2: min(4/1, −8/−2, −1.5/−0.5) = 3 ;  ch5: min(−8/−0.5, 3/0.25) = 12 ;  ch3 all zero → 1
    assert plan.s.tolist() == [1.0, 1.0, 3.0, 1.0, 1.0, 12.0]
    assert plan.saturated.tolist() == [True, True, False, False, True, False]
    assert plan.stats["saturated_frac"] == 0.5 and plan.stats["s_max"] == 12.0
    # the all-negative row must not produce −inf/0 factors through max/W = 0/W
    assert torch.isfinite(plan.s).all()


def _hetero(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    col = [1, shape[1]] + [1] * (len(shape) - 2)
    return w * torch.exp(1.5 * torch.randn(col, generator=g))  # unequal input-channel magnitudes


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_apply_keeps_bounds_bitwise_and_function(kind):
    torch.manual_seed(0)
    for seed in range(10):
        if kind == "linear":
            layer = QuantLinear.from_float(nn.Linear(48, 40), 4, 4)
            x = torch.randn(3, 5, 48)
        else:
            layer = QuantConv2d.from_float(nn.Conv2d(24, 32, 3, padding=1), 4, 4)
            x = torch.randn(2, 24, 6, 6)
        with torch.no_grad():
            layer.weight.copy_(_hetero(layer.weight.shape, seed))
            layer.weight[3].abs_().neg_()  # an all-negative output channel
            layer.weight[:, 5] = 0.0  # an all-zero input channel
        layer.weight_quant.init_from(layer.weight)
        delta0, z0 = layer.weight_quant.delta.clone(), layer.weight_quant.zero_point.clone()
        lo0, hi0 = effective_bounds(layer.weight.detach().clone())
        layer.weight_quant.enabled = False
        layer.act_quant.enabled = False
        ref = layer(x)

        plan = dilation_scales(layer.weight)
        assert (plan.s >= 1).all() and torch.isfinite(plan.s).all()
        assert plan.s[5] == 1.0
        assert plan.s.max() > 1.5  # heterogeneous channels: WD has room
        apply_dilation([layer], plan.s)
        lo1, hi1 = effective_bounds(layer.weight.detach())
        assert torch.equal(lo0, lo1) and torch.equal(hi0, hi1)  # bitwise
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.input_scale, 1.0 / plan.s)
        layer.weight_quant.init_from(layer.weight)  # re-init gives the same Δ_w, z_w
        assert torch.equal(layer.weight_quant.delta, delta0) and torch.equal(layer.weight_quant.zero_point, z0)


def test_group_of_consumers_shares_one_s():
    q, k, v = (QuantLinear.from_float(nn.Linear(16, n), 4, 4) for n in (16, 16, 8))
    for i, m in enumerate((q, k, v)):
        with torch.no_grad():
            m.weight.copy_(_hetero(m.weight.shape, 100 + i))
    bounds = [effective_bounds(m.weight.detach().clone()) for m in (q, k, v)]
    plan = dilation_scales([q.weight, k.weight, v.weight])
    # each consumer alone would allow more; together, the tightest wins
    alone = torch.stack([dilation_scales(m.weight).s for m in (q, k, v)])
    assert torch.equal(plan.s, alone.amin(0))
    apply_dilation([q, k, v], plan.s)
    for m, (lo, hi) in zip((q, k, v), bounds):
        lo1, hi1 = effective_bounds(m.weight.detach())
        assert torch.equal(lo, lo1) and torch.equal(hi, hi1)
        assert torch.equal(m.input_scale, q.input_scale)


@pytest.mark.parametrize("producer_kind", ["groupnorm", "layernorm", "linear"])
def test_fold_input_scale_is_exact(producer_kind):
    torch.manual_seed(0)
    c = 16
    if producer_kind == "groupnorm":
        producer, x = nn.GroupNorm(4, c), torch.randn(2, c, 5, 5)
        consumers = [QuantConv2d.from_float(nn.Conv2d(c, 8, 1), 4, None)]
    elif producer_kind == "layernorm":
        producer, x = nn.LayerNorm(c), torch.randn(2, 7, c)
        consumers = [QuantLinear.from_float(nn.Linear(c, 8), 4, None) for _ in range(3)]
    else:
        producer, x = nn.Linear(12, c), torch.randn(2, 7, 12)
        consumers = [QuantLinear.from_float(nn.Linear(c, 8), 4, None) for _ in range(2)]
    with torch.no_grad():
        producer.weight.normal_()
        producer.bias.normal_()
        for m in consumers:
            m.weight.copy_(_hetero(m.weight.shape, 7))
    for m in consumers:
        m.weight_quant.enabled = False
    ref = [m(producer(x)) for m in consumers]
    plan = dilation_scales([m.weight for m in consumers])
    apply_dilation(consumers, plan.s)
    fold_input_scale(producer, consumers)
    for m, r in zip(consumers, ref):
        assert torch.equal(m.input_scale, torch.ones(c))
        torch.testing.assert_close(m(producer(x)), r, rtol=1e-5, atol=1e-5)


def test_fold_errors():
    a, b = (QuantLinear.from_float(nn.Linear(4, 4), 4, 4) for _ in range(2))
    a.input_scale.fill_(0.5)
    with pytest.raises(ValueError, match="different input_scale"):
        fold_input_scale(nn.LayerNorm(4), [a, b])
    with pytest.raises(TypeError, match="SiLU"):
        fold_input_scale(nn.SiLU(), [a])
    with pytest.raises(ValueError, match="without affine"):
        fold_input_scale(nn.LayerNorm(4, elementwise_affine=False), [a])


def test_smoothquant_scales_and_apply():
    w = torch.tensor([[1.0, -4.0, 0.0], [0.5, 2.0, 0.0]])
    act = torch.tensor([4.0, 1.0, 3.0])
    s = smoothquant_scales(act, w, alpha=0.5)
    # s_k = sqrt(max|X_k|) / sqrt(max|W_k|); all-zero weight column → 1
    torch.testing.assert_close(s, torch.tensor([2.0 / 1.0, 1.0 / 2.0, 1.0]))
    lin = QuantLinear.from_float(nn.Linear(3, 2, bias=False), 8, 8)
    with torch.no_grad():
        lin.weight.copy_(w)
    apply_dilation([lin], s, clamp_to_bounds=False)
    assert torch.equal(lin.weight, w * s)
    # SQ moves the per-output-channel weight range (what WD never does): Δ_w must be re-initialised
    lo, hi = effective_bounds(lin.weight.detach())
    assert lo.tolist() == [-2.0, 0.0] and hi.tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="alpha=1.5"):
        smoothquant_scales(act, w, alpha=1.5)


def test_activation_stats():
    st = activation_stats(torch.tensor([1.0, 4.0, 2.0]), torch.tensor([3.0, 8.0, 1.0]))
    assert st["act_absmax_before"] == 8.0 and st["act_absmax_after"] == 3.0
    assert st["act_median_before"] == 3.0 and st["act_median_after"] == 2.0


def test_apply_rejects_bad_factors():
    lin = QuantLinear.from_float(nn.Linear(3, 2), 8, 8)
    with pytest.raises(ValueError, match="finite and positive"):
        apply_dilation([lin], torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="C_in=3"):
        apply_dilation([lin], torch.ones(4))
