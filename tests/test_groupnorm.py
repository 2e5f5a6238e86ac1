"""GroupNorm statistics for channels-last data (dq.quant.groupnorm), as the compiled runtime uses them."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dq.models.export import can_compile
import dq.quant.groupnorm as gn
from dq.quant.groupnorm import ChannelsLastGroupNorm, channels_last, gn_stats, use_channels_last_groupnorm

pytestmark = pytest.mark.skipif(not can_compile(), reason="no C++ compiler for the statistics kernel")


def _norm(groups, channels, seed=0):
    torch.manual_seed(seed)
    m = ChannelsLastGroupNorm(groups, channels)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


@pytest.mark.parametrize("shape,groups", [((3, 32, 5, 7), 8), ((2, 96, 4, 4), 8), ((2, 128, 3, 3), 32),
                                          ((2, 40, 9), 5), ((1, 20, 2, 2), 4), ((2, 70, 3, 5), 7)])
def test_channels_last_groupnorm_is_groupnorm(monkeypatch, shape, groups):
    """Channels at stride 1 (4-D channels-last, or [B, C, N] as the transposed [B, N, C] attention input): the
    statistics kernel plus the elementwise normalisation give GroupNorm to float rounding (against float64: torch's
    own channels-last float32 kernel is 30× further off here), with a mean far from 0 (two passes, no
    cancellation) and channel counts that do not fill whole vectors."""
    monkeypatch.setattr(gn, "MIN_ELEMENTS", 0)  # small inputs and wide groups through the kernel too
    monkeypatch.setattr(gn, "MAX_GROUP_CHANNELS", 1 << 20)
    m = _norm(groups, shape[1])
    x = (torch.randn(*shape) * 3 + 20).movedim(1, -1).contiguous().movedim(-1, 1)
    assert channels_last(x) and not channels_last(x.contiguous())
    with torch.no_grad():
        want = F.group_norm(x.double(), groups, m.weight.double(), m.bias.double(), m.eps)
        assert float((m(x).double() - want).abs().max()) <= 1e-5
        # bfloat16 in, bfloat16 out: the float32 result rounded (one step apart at most where it rounds differently)
        xb = x.bfloat16()
        got, want_b = m(xb), F.group_norm(xb.double(), groups, m.weight.double(), m.bias.double(), m.eps).float()
        assert got.dtype == torch.bfloat16
        assert float(((got.float() - want_b).abs() / want_b.abs().clamp_min(1e-3)).max()) <= 2 ** -7
    mean, scale = gn_stats(x, m.weight, groups, m.eps)
    per_group = x.reshape(shape[0], groups, -1)
    assert torch.allclose(mean, per_group.mean(-1).repeat_interleave(shape[1] // groups, 1), atol=1e-5)
    rstd = (per_group.var(-1, unbiased=False) + m.eps).rsqrt().repeat_interleave(shape[1] // groups, 1)
    assert torch.allclose(scale, rstd * m.weight, rtol=1e-5, atol=1e-6)


def test_other_layouts_small_inputs_and_training_take_torchs_groupnorm(monkeypatch):
    calls = []
    monkeypatch.setattr(gn, "gn_stats", lambda *a: calls.append(a) or gn_stats(*a))
    m = _norm(4, 16)
    with torch.no_grad():  # channels-last but below MIN_ELEMENTS
        small = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
        assert torch.equal(m(small), F.group_norm(small, 4, m.weight, m.bias, m.eps)) and not calls
        big = torch.randn(2, 16, 64, 64).contiguous(memory_format=torch.channels_last)
        m(big)
        assert len(calls) == 1
        wide = _norm(1, 16)  # one group of 16 channels: inductor's loads are full vectors there
        assert torch.equal(wide(big), F.group_norm(big, 1, wide.weight, wide.bias, wide.eps)) and len(calls) == 1
    x = torch.randn(2, 16, 5, 5)  # NCHW: channels not at stride 1
    with torch.no_grad():
        assert torch.equal(m(x), F.group_norm(x, 4, m.weight, m.bias, m.eps))
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(xc)  # gradients on: torch's own op, whose backward exists
    y.sum().backward()
    assert xc.grad is not None and torch.equal(y, F.group_norm(xc, 4, m.weight, m.bias, m.eps))


def test_gn_stats_names_bad_input_in_one_line():
    with pytest.raises(ValueError, match=r"gn_stats: x \(2, 16, 5, 5\) torch.float32 must be .* channels-last"):
        gn_stats(torch.randn(2, 16, 5, 5), torch.ones(16), 4, 1e-5)
    with pytest.raises(ValueError, match="multiple of groups=3"):
        gn_stats(torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last), torch.ones(16), 3, 1e-5)


def test_swap_keeps_the_parameters_and_the_function(monkeypatch):
    monkeypatch.setattr(gn, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(gn, "MAX_GROUP_CHANNELS", 1 << 20)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Sequential(nn.GroupNorm(4, 8, affine=False)))
    before = [model[1].weight, model[1].bias]
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        assert use_channels_last_groupnorm(model) == 2
        assert isinstance(model[1], ChannelsLastGroupNorm) and isinstance(model[2][0], ChannelsLastGroupNorm)
        assert model[1].weight is before[0] and model[1].bias is before[1]
        assert torch.allclose(model(x), want, atol=1e-4)


def test_a_kernel_started_in_the_background_is_built_once_and_loaded_from_that_build():
    from dq.quant import cpp_kernel

    cpp_kernel.prebuild(gn.KERNEL)
    build = cpp_kernel._BUILDS[gn.KERNEL]
    cpp_kernel.prebuild(gn.KERNEL)  # again: no second build
    assert cpp_kernel._BUILDS[gn.KERNEL] is build
    assert cpp_kernel.load(*gn.KERNEL) is build.result()
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)  # and it is the kernel
    mean, _ = gn_stats(x, torch.ones(16), 4, 1e-5)
    assert torch.allclose(mean, x.reshape(2, 4, -1).mean(-1).repeat_interleave(4, 1), atol=1e-6)
