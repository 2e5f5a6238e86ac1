"""The fused quantized-attention kernel (dq.quant.qattention) and where the attention processor uses it."""
import pytest
import torch
from diffusers.models.attention_processor import Attention

import dq.models.attention as qa
from dq.models.export import can_compile
from dq.quant.fake_quant import fake_quant_nograd
from dq.quant.qattention import qattention

pytestmark = pytest.mark.skipif(not can_compile(), reason="no C++ compiler for the fused kernel")


def _explicit(q, k, v, scale, delta, zp, bits):
    """What QuantAttnProcessor._attend computes: two matmuls, a softmax, P on its per-head grid."""
    h = delta.numel()
    p = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(-1)
    return torch.matmul(fake_quant_nograd(p, delta.view(1, h, 1, 1), zp.view(1, h, 1, 1), bits), v)


@pytest.mark.parametrize("n,s,dk,dv", [(5, 37, 12, 20), (64, 64, 16, 16), (3, 5, 7, 33)])
def test_fused_kernel_matches_the_explicit_attention(n, s, dk, dv):
    g = torch.Generator().manual_seed(n + s)
    q, k, v = torch.randn(2, 3, n, dk, generator=g), torch.randn(2, 3, s, dk, generator=g), torch.randn(2, 3, s, dv, generator=g)
    delta = torch.tensor([1 / 255, 1 / 63, 1 / 15])
    zp = torch.tensor([0.0, 2.4, 1.0])  # rounded and clamped as the quantizer does: 0, 2, 1
    for bits in (8, 4):
        want = _explicit(q, k, v, 0.3, delta, zp, bits)
        got = qattention(q, k, v, 0.3, delta, zp, bits)
        assert got.shape == want.shape == (2, 3, n, dv)
        assert float((got - want).norm() / want.norm()) <= 1e-5, (bits, float((got - want).norm() / want.norm()))
    # strided inputs (the processor's transposed heads) give the same result as contiguous ones
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(qattention(qt, k, v, 0.3, delta, zp, 8), qattention(q, k, v, 0.3, delta, zp, 8))


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
    assert len(calls) == 1
    attn.processor.prob_quant.enabled = True
    attn(x)  # training (gradients on): the explicit path, whose backward exists
    wide = _attention(32)
    wide.processor.fused = True
    with torch.no_grad():
        wide(torch.randn(3, 37, 64))  # heads ≥ BF16_MIN_HEAD_DIM keep the batched matmuls
    assert len(calls) == 1
