"""Fake-quantization primitives: float64 reference, no-grad fast path, STE/LSQ gradients."""

import numpy as np
import pytest
import torch

from dq.quant.fake_quant import (
    check_bits,
    fake_quant,
    fake_quant_nograd,
    minmax_params,
    round_ste,
)


# tiny ops: thread start-up costs more than the work, and 2 threads thrash on a shared 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")


def reference(x: np.ndarray, delta: np.ndarray, z: np.ndarray, bits: int) -> np.ndarray:
    """Q(x) = Δ (clip(round(x/Δ) + z, 0, 2^b−1) − z) in float64 numpy, z already integer."""
    q = np.clip(np.round(x / delta) + z, 0, 2**bits - 1)
    return delta * (q - z)


def _data(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 7, generator=g, dtype=dtype) * 3
    delta = (torch.rand(6, 1, 1, generator=g, dtype=dtype) * 0.3 + 0.05)
    z = torch.randint(0, 16, (6, 1, 1), generator=g).to(dtype)
    return x, delta, z


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_float64_reference(bits):
    x, delta, z = _data()
    z = z.clamp(max=2**bits - 1)
    out = fake_quant(x, delta, z, bits)
    ref = reference(x.numpy(), delta.numpy(), z.numpy(), bits)
    # x*(1/Δ) and x/Δ may round differently exactly at a .5 boundary: exclude those points.
    frac = np.abs(np.abs((x / delta).numpy() % 1.0) - 0.5)
    ok = frac > 1e-9
    assert ok.mean() > 0.99
    np.testing.assert_array_equal(out.numpy()[ok], ref[ok])


def test_float32_close_to_float64_reference():
    x, delta, z = _data(1, torch.float32)
    out = fake_quant(x, delta, z, 4).double()
    ref = torch.from_numpy(reference(x.double().numpy(), delta.double().numpy(), z.double().numpy(), 4))
    flips = (out - ref).abs() > 1e-5
    # float32 rounding can flip a value sitting at a rounding boundary by one step, nothing else.
    assert flips.float().mean() < 0.01
    assert ((out - ref).abs()[flips] <= delta.double().expand_as(x)[flips] * 1.0001).all()


def test_zero_point_is_rounded_and_clamped():
    x = torch.linspace(-2, 2, 41, dtype=torch.float64)
    d = torch.tensor(0.1, dtype=torch.float64)
    assert torch.equal(fake_quant(x, d, torch.tensor(3.4, dtype=torch.float64), 4),
                       fake_quant(x, d, torch.tensor(3.0, dtype=torch.float64), 4))
    # z beyond the grid is clamped: 0 stays representable
    out = fake_quant(x, d, torch.tensor(40.0, dtype=torch.float64), 4)
    assert torch.equal(out, fake_quant(x, d, torch.tensor(15.0, dtype=torch.float64), 4))
    assert (out == 0).any()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_nograd_path_is_bitwise_equal(bits):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, 9, 9, generator=g) * 2
    delta = torch.rand(8, 4, 1, 1, generator=g) * 0.2 + 0.01  # per (sample, head) like TPQ tables
    z = torch.rand(8, 4, 1, 1, generator=g) * 2**bits
    assert torch.equal(fake_quant_nograd(x, delta, z, bits), fake_quant(x, delta, z, bits))
    # and equal to PyTorch's own fused kernel (which also multiplies by 1/Δ)
    d1, z1 = delta[:, 0, 0, 0], torch.round(z[:, 0, 0, 0]).clamp(0, 2**bits - 1)
    ref = torch.fake_quantize_per_channel_affine(x, d1, z1.int(), 0, 0, 2**bits - 1)
    assert torch.equal(fake_quant_nograd(x, d1.view(-1, 1, 1, 1), z1.view(-1, 1, 1, 1), bits), ref)


def test_round_ste():
    x = torch.tensor([-1.5, -0.4, 0.5, 1.5, 2.6], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))  # half to even, like the integer kernels
    y.backward(torch.arange(5.0))
    assert torch.equal(x.grad, torch.arange(5.0))


def _grads(x, delta, z, bits):
    x = x.clone().requires_grad_(True)
    delta = delta.clone().requires_grad_(True)
    z = z.clone().requires_grad_(True)
    fake_quant(x, delta, z, bits).sum().backward()
    return x.grad, delta.grad, z.grad


def test_gradients_inside_clip_range():
    bits, d, zp = 4, 0.25, 5.0
    # grid range is [−zΔ, (15−z)Δ] = [−1.25, 2.5]; points strictly inside, away from .5 boundaries
    x = torch.tensor([-1.1, -0.3, 0.07, 0.9, 2.2], dtype=torch.float64)
    d64, z64 = torch.tensor(d, dtype=torch.float64), torch.tensor(zp, dtype=torch.float64)
    for xi in x:
        gx, gd, gz = _grads(xi.view(1), d64, z64, bits)
        assert gx.item() == pytest.approx(1.0)
        r = (xi / d).item()
        assert gd.item() == pytest.approx(round(r) - r, abs=1e-12)  # LSQ: round(x/Δ) − x/Δ
        assert gz.item() == pytest.approx(0.0, abs=1e-12)


def test_gradients_outside_clip_range():
    bits, d, zp = 4, 0.25, 5.0
    for xi, level in ((5.0, 15 - zp), (-4.0, -zp)):
        gx, gd, gz = _grads(torch.tensor([xi], dtype=torch.float64), torch.tensor(d, dtype=torch.float64),
                            torch.tensor(zp, dtype=torch.float64), bits)
        assert gx.item() == 0.0
        assert gd.item() == pytest.approx(level)  # the clip level, d/dΔ of Δ·level
        assert gz.item() == pytest.approx(-d)


def test_gradcheck_where_function_is_smooth():
    # Outside the clip range Q = Δ·level is smooth in (x, Δ), so STE and true derivatives agree.
    x = torch.tensor([3.0, 4.5, -2.0, -3.5], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([0.1, 0.2, 0.1, 0.05], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([4.0, 2.0, 7.0, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x_, d_: fake_quant(x_, d_, z, 4), (x, d), eps=1e-6)


def test_finite_difference_of_delta_outside_range():
    x = torch.tensor([10.0], dtype=torch.float64)
    z = torch.tensor(3.0, dtype=torch.float64)
    d0, eps = 0.3, 1e-6
    fd = (fake_quant(x, torch.tensor(d0 + eps, dtype=torch.float64), z, 4)
          - fake_quant(x, torch.tensor(d0 - eps, dtype=torch.float64), z, 4)) / (2 * eps)
    _, gd, _ = _grads(x, torch.tensor(d0, dtype=torch.float64), z, 4)
    assert gd.item() == pytest.approx(fd.item(), rel=1e-6)


def test_grad_scale_option():
    x, delta, z = _data(3)
    x.requires_grad_(True)
    d1 = delta.clone().requires_grad_(True)
    d2 = delta.clone().requires_grad_(True)
    y1 = fake_quant(x, d1, z, 4)
    y2 = fake_quant(x, d2, z, 4, grad_scale=0.125)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(d2.grad, d1.grad * 0.125)


def test_minmax_params():
    d, z = minmax_params(torch.tensor([-1.0, 0.5, 0.0, -3.0]), torch.tensor([2.0, 1.5, 0.0, -1.0]), 8)
    # effective range includes 0: [0.5, 1.5] → [0, 1.5]; [−3, −1] → [−3, 0]; [0, 0] → Δ clamp
    torch.testing.assert_close(d, torch.tensor([3.0 / 255, 1.5 / 255, 1e-8, 3.0 / 255]))
    assert torch.equal(z, torch.tensor([85.0, 0.0, 0.0, 255.0]))


@pytest.mark.parametrize("bad", [1, 9, 0, 16, 4.0, True, "4"])
def test_bits_validation(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        check_bits(bad)
    with pytest.raises(ValueError, match="2..8"):
        fake_quant(torch.zeros(2), torch.ones(()), torch.zeros(()), bad)


@pytest.mark.parametrize("bits", [4, 8])
def test_single_row_fast_path_is_bitwise_equal_to_the_autograd_path(bits):
    """Sampling quantizes a whole batch with one (Δ, z) row: the 0-dim fast path must not change a bit."""
    x = torch.randn(16, 8, 5, 5) * 3
    delta, z = torch.tensor([0.037]).reshape(1, 1, 1, 1), torch.tensor([6.4]).reshape(1, 1, 1, 1)
    assert torch.equal(fake_quant_nograd(x, delta, z, bits), fake_quant(x, delta, z, bits))
