"""EfficientDM's adapters: exact at init, merge without changing the function, train only what they should."""
import torch

from dq.methods.efficientdm import add_lora, merge_lora
from dq.models.load import build_arch
from dq.models.student import prepare
from dq.quant.config import QuantConfig


def _student():
    m = build_arch("unet2d")
    s = prepare(m.denoiser, QuantConfig(timesteps=(999, 500, 1))).requires_grad_(True)
    return m.family, s


def test_lora_starts_exact_and_merges_to_the_same_function():
    family, s = _student()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([999, 500, 1])
    keys = set(s.state_dict())
    with torch.no_grad():
        ref = family.forward(s, x, t)
        add_lora(s, rank=2, alpha=2.0)
        assert torch.equal(family.forward(s, x, t), ref)  # B = 0 at init: the teacher's weights exactly
        for name, p in s.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.01)
        adapted = family.forward(s, x, t)
        assert not torch.equal(adapted, ref)
        merge_lora(s)
        assert set(s.state_dict()) == keys  # an ordinary student again: same keys, no adapters
        torch.testing.assert_close(family.forward(s, x, t), adapted, rtol=1e-5, atol=1e-5)


def test_only_adapters_and_quantizer_steps_train():
    _, s = _student()
    s.requires_grad_(False)
    n = add_lora(s, rank=2, alpha=2.0)
    trainable = {name.rsplit(".", 1)[-1] for name, p in s.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B"} and n == sum(p.numel() for p in s.parameters() if p.requires_grad)
    assert all(not p.requires_grad for name, p in s.named_parameters() if name.endswith("original"))
