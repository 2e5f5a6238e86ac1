"""The fused quantized-attention kernel (dq.quant.qattention) and where the attention processor uses it."""
import pytest
import torch
from diffusers.models.attention_processor import Attention

import dq.models.attention as qa
from dq.models.export import can_compile
from dq.quant.fake_quant import fake_quant_nograd
import dq.quant.qattention as qk
from dq.quant.qattention import qattention

pytestmark = pytest.mark.skipif(not can_compile(), reason="no C++ compiler for the fused kernel")


def _explicit(q, k, v, scale, delta, zp, bits):
    """What QuantAttnProcessor._attend computes: two matmuls, a softmax and P on its per-head grid."""
    h = delta.numel()
    p = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(-1)
    return torch.matmul(fake_quant_nograd(p, delta.view(1, h, 1, 1), zp.view(1, h, 1, 1), bits), v)


def _ints(g, shape, bits, h):
    """A fake quantizer's integers (−z ≤ k ≤ qmax − z, per head) in bfloat16, and its per-head Δ."""
    z = torch.tensor([0.0, 3.0, float(2 ** bits // 2)])[:h].view(1, h, 1, 1)
    k = torch.randint(0, 2 ** bits, shape, generator=g).float() - z
    return k.bfloat16(), torch.rand(h, generator=g) / 4 + 0.05


def test_the_runtime_expects_the_tiles_exactly_where_the_kernel_gets_them(monkeypatch):
    """export.use_runtime routes wide heads by tiles_expected() before the kernel is built; the build agrees."""
    assert qk.tiles_expected() == qk.has_amx()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # a narrowed pick: no promise of tiles
    assert not qk.tiles_expected()


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("n,s,dk,dv", [(5, 37, 12, 20), (64, 64, 16, 16), (3, 5, 7, 33), (17, 70, 40, 48)])
def test_fused_kernel_matches_the_explicit_attention(monkeypatch, amx, n, s, dk, dv):
    """The integers' products are exact on either path (tiles or float loops): the kernel agrees with the explicit
    attention on the fake-quantized operands to float rounding, for 8- and 4-bit operands and P."""
    if amx and not qk.has_amx():
        pytest.skip("no AMX tiles on this CPU: the float loops serve it")
    monkeypatch.setattr(qk, "AMX", amx)
    g = torch.Generator().manual_seed(n + s)
    p_delta = torch.tensor([1 / 255, 1 / 63, 1 / 15])
    p_zp = torch.tensor([0.0, 2.4, 1.0])  # rounded and clamped as the quantizer does: 0, 2, 1
    for bits in (8, 4):
        (q, dq), (k, dk_), (v, dv_) = (_ints(g, (2, 3, m, d), bits, 3) for m, d in ((n, dk), (s, dk), (s, dv)))
        want = _explicit(q.float() * dq.view(1, 3, 1, 1), k.float() * dk_.view(1, 3, 1, 1),
                         v.float() * dv_.view(1, 3, 1, 1), 0.3, p_delta, p_zp, bits)
        got = qattention(q, k, v, dq * dk_ * 0.3, p_delta * dv_, p_delta, p_zp, bits, torch.float32)
        # bfloat16 output: the float32 one rounded to nearest even, as .to(torch.bfloat16) rounds it
        half = qattention(q, k, v, dq * dk_ * 0.3, p_delta * dv_, p_delta, p_zp, bits, torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, got.to(torch.bfloat16))
        assert got.shape == want.shape == (2, 3, n, dv) and got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) <= 1e-5, (bits, float((got - want).norm() / want.norm()))
    # strided inputs (the processor's transposed heads) give the same result as contiguous ones
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    args = (dq * dk_ * 0.3, p_delta * dv_, p_delta, p_zp, 4, torch.float32)
    assert torch.equal(qattention(qt, k, v, *args), qattention(q, k, v, *args))


def _attention(dim_head):
    torch.manual_seed(0)
    attn = Attention(query_dim=2 * dim_head, heads=2, dim_head=dim_head)
    qa.install_quant_attention("attn", attn, a_bits=4, prob_bits=8, num_steps=1)
    p = attn.processor
    with torch.no_grad():
        for quant in (p.q_quant, p.k_quant, p.v_quant):
            quant.delta.fill_(0.1)
            quant.zero_point.fill_(8)
        p.prob_quant.delta.fill_(1 / 255)
    return attn


def test_processor_runs_the_fused_kernel_only_where_it_computes_the_same(monkeypatch):
    calls = []
    monkeypatch.setattr(qa, "qattention", lambda *a: calls.append(a) or qattention(*a))
    attn = _attention(16)
    x = torch.randn(3, 37, 32)
    with torch.no_grad():
        plain = attn(x)
        attn.processor.fused = True
        fused = attn(x)
        assert len(calls) == 1 and torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)
        attn(x, attention_mask=torch.randn(3, 1, 37))  # a mask: the explicit path
        attn.processor.prob_quant.enabled = False  # P left in float: not the kernel's function
        attn(x)
        attn.processor.prob_quant.enabled = True
        attn.processor.v_quant.enabled = False  # v in float: no integers for the kernel
        attn(x)
        attn.processor.v_quant.enabled = True
    assert len(calls) == 1
    attn(x)  # training (gradients on): the explicit path, whose backward exists
    wide = _attention(32)
    wide.processor.fused = True
    x = torch.randn(3, 37, 64)
    with torch.no_grad():
        plain = wide(x)  # heads ≥ BF16_MIN_HEAD_DIM keep the batched matmuls, unless the kernel runs them on tiles
        assert len(calls) == 1
        wide.processor.wide = True
        assert torch.allclose(wide(x), plain, rtol=1e-5, atol=1e-6) and len(calls) == 2
