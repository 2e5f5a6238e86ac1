"""The UNet as a chain of blocks: exact equivalence with the model's own forward."""
import pytest
import torch

from dq.errors import DQError
from dq.models.blocks import run_blocks, select_blocks
from dq.models.families import family_of
from dq.models.families.unet import UNetState
from dq.models.load import build_arch


def unet_blocks(unet, granularity="block"):
    return family_of(unet).blocks(unet, granularity)


@pytest.mark.parametrize("granularity", ["block", "module", "model"])
@pytest.mark.parametrize("arch", ["unet2d", "unet2d_cond"])
def test_blocks_in_order_equal_the_unet_forward(arch, granularity):
    unet = build_arch(arch).denoiser
    c = unet.config
    x = torch.randn(3, c.in_channels, c.sample_size, c.sample_size)
    t = torch.tensor([3, 500, 999])
    ehs = torch.randn(3, 5, c.cross_attention_dim) if arch == "unet2d_cond" else None
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ehs).sample if ehs is not None else unet(x, t).sample
        blocks = unet_blocks(unet, granularity)
        out = run_blocks(blocks, family_of(unet).initial_state(x, t, ehs), len(blocks) - 1)
    assert torch.equal(out.sample, ref)
    assert out.res == ()  # every skip tensor pushed by a down block was consumed by an up block
    names = [b.name for b in blocks]
    if granularity == "model":
        assert names == ["model"]
        return
    assert names[0] == "stem" and names[-1] == "head" and any(n.startswith("mid") for n in names)
    # every parameter belongs to exactly one block
    owned = [id(p) for b in blocks for p in b.parameters()]
    assert len(owned) == len(set(owned)) == len(list(unet.parameters()))


def test_block_selection_validates_names():
    blocks = unet_blocks(build_arch("unet2d").denoiser)
    assert select_blocks(blocks, ["up.0", "down.1"]) == [2, 5]
    with pytest.raises(DQError, match="unknown block name 'down.9'; valid choices: stem, down.0"):
        select_blocks(blocks, ["down.9"])


def test_detached_state_is_contiguous_and_trainable():
    # Attention blocks emit channels-last strided maps; a block fed one as a non-grad leaf crashed
    # torch 2.13's CPU backward. detach() must hand blocks contiguous tensors.
    unet = build_arch("unet2d").denoiser.train().requires_grad_(True)
    blocks = unet_blocks(unet)
    with torch.no_grad():
        s = run_blocks(blocks, UNetState(sample=torch.randn(4, 1, 16, 16), timestep=torch.tensor([1, 2, 3, 4])), 2)
    s = s.detach()
    assert all(t.is_contiguous() for t in (s.sample, s.emb, *s.res))
    out = blocks[3](s).new
    sum(o.pow(2).mean() for o in out).backward()
    assert all(p.grad is not None for p in blocks[3].parameters())


def test_module_granularity_names_and_bad_value():
    names = [b.name for b in unet_blocks(build_arch("unet2d").denoiser, "module")]
    assert names[:6] == ["stem", "down.0.resnets.0", "down.0.downsamplers.0", "down.1.resnets.0",
                         "down.1.attentions.0", "down.1.downsamplers.0"]
    assert "up.1.attentions.1" in names and names[-1] == "head"
    with pytest.raises(DQError, match="distill.granularity 'layer'; valid choices: block, module, model"):
        unet_blocks(build_arch("unet2d").denoiser, "layer")
