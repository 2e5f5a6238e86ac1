"""SVDQuant's low-rank branch and split-concatenation quantizers: exact equivalences and the int8 runtime."""
import copy

import pytest
import torch
from torch import nn

from dq.errors import DQError
from dq.methods.svdquant import SVDQuantConfig
from dq.models.load import build_arch
from dq.models.student import prepare, weight_dilation
from dq.quant.act_quantizer import TemporalActQuantizer
from dq.quant.config import LowRank, QuantConfig, QuantSpec
from dq.methods.base import Job
from dq.methods.dilatequant import BRANCH
from dq.quant.int8 import Int8Layer, available
from dq.quant.layers import QuantConv2d, QuantLinear, iter_quant_layers
from dq.quant.lowrank import svd_init
from dq.quant.split import SplitActQuantizer, split_inputs
from dq.quant.steps import StepIndex

TS = (900, 600, 300, 0)


def _layer(kind, rank=0, c_in=24, c_out=16):
    torch.manual_seed(0)
    f = nn.Conv2d(c_in, c_out, 3, padding=1) if kind == "conv" else nn.Linear(c_in, c_out)
    layer = (QuantConv2d if kind == "conv" else QuantLinear).from_float(f, 4, 4, num_steps=len(TS))
    with torch.no_grad():  # distinct rows, an input scale that is not one
        layer.act_quant.delta.copy_(torch.tensor([0.05, 0.08, 0.11, 0.2]))
        layer.act_quant.zero_point.copy_(torch.tensor([3.0, 7.0, 8.0, 2.0]))
        layer.input_scale.copy_(torch.linspace(0.5, 2.0, c_in))
    si = StepIndex(TS)
    layer.act_quant.set_step_index(si)
    if rank:
        layer.set_lowrank(rank)
    return layer, si


def _x(kind, c_in=24, n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, c_in, 5, 5, generator=g) if kind == "conv" else torch.randn(n, 7, c_in, generator=g)


ROWS = torch.tensor([0, 1, 2, 3, 1, 0])  # one batch mixing every step


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_a_zero_branch_is_the_plain_quantized_layer_bitwise(kind):
    plain, si = _layer(kind)
    branched = copy.deepcopy(plain)
    branched.act_quant.set_step_index(si)
    branched.set_lowrank(4)
    x = _x(kind)
    with torch.no_grad(), si.use(ROWS):
        assert torch.equal(branched(x), plain(x))
    assert not any("lowrank" in k for k in plain.state_dict())  # rank 0 adds nothing


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_svd_split_keeps_the_float_function_and_narrows_the_quantized_weight(kind):
    layer, si = _layer(kind, rank=4)
    with torch.no_grad():  # a weight whose outliers are low-rank: what the branch is for
        spike = torch.zeros_like(layer.weight).flatten(1)
        spike[:, :3] = 20 * torch.randn(16, 1)  # three input columns 20x the rest, one direction
        layer.weight.add_(spike.view_as(layer.weight))
    model = nn.Sequential(layer)
    before = layer.weight.detach().clone()
    layer.act_quant.enabled = False
    layer.weight_quant.enabled = False
    x = _x(kind)
    with torch.no_grad():
        want = layer(x)
        report = svd_init(model)
        got = layer(x)
    assert len(report) == 1 and report[0]["rank"] == 4
    assert ((got - want).norm() / want.norm()).item() < 1e-5  # R + B·A = W
    assert report[0]["range_ratio"] < 0.5  # the spike went to the branch
    assert layer.weight.abs().amax() < 0.5 * before.abs().amax()
    assert svd_init(model) == []  # a branch is split once
    with pytest.raises(ValueError, match="scale .* before"):  # scaling after the split would be wrong
        from dq.quant.scaling import DilationGroup, apply_weight_dilation
        apply_weight_dilation(model, [DilationGroup(("0",))])


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_split_quantizer_with_one_shared_table_is_the_unsplit_one_bitwise(kind):
    layer, si = _layer(kind)
    split = copy.deepcopy(layer)
    holder = nn.Module()
    holder.layer = split
    split_inputs(holder, {"layer": (10, 14)})
    assert isinstance(split.act_quant, SplitActQuantizer) and split.act_quant.bits == 4
    for q in split.act_quant.parts:
        q.set_step_index(si)
    x = _x(kind)
    with torch.no_grad(), si.use(ROWS):
        assert torch.equal(split(x), layer(x))
        with torch.no_grad():  # own tables: each part is quantized on its own grid
            split.act_quant.parts[1].delta.mul_(0.5)
        axis = 1 if kind == "conv" else -1
        part = x.narrow(axis, 10, 14)
        want = split.act_quant.parts[1](part)
        got = split.act_quant(x).narrow(axis, 10, 14)
        assert torch.equal(got, want) and not torch.equal(split(x), layer(x))
    with pytest.raises(ValueError, match="sums to 20"):
        split_inputs(nn.Sequential(copy.deepcopy(layer)), {"0": (10, 10)})


@pytest.mark.skipif(not available(), reason="no oneDNN int8 ops in this torch build")
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("split,rank", [(True, 0), (False, 4), (True, 4)])
def test_int8_runs_split_and_branched_layers_within_1e_3_on_a_mixed_batch(kind, split, rank):
    layer, si = _layer(kind, rank=rank)
    holder = nn.Module()
    holder.layer = layer
    if split:
        split_inputs(holder, {"layer": (10, 14)})
        for i, q in enumerate(layer.act_quant.parts):
            q.set_step_index(si)
            with torch.no_grad():
                q.delta.mul_(1 + i)
    if rank:
        svd_init(holder)
    layer.eval()
    fast = Int8Layer(layer)
    assert len(fast.kernels) == (2 if split else 1) and fast.lowrank == bool(rank)
    x = _x(kind)
    with torch.no_grad(), si.use(ROWS):
        want, got = layer(x), fast(x)
    assert ((got - want).norm() / want.norm()).item() <= 1e-3


def test_split_concat_follows_the_unet_skips_and_fails_where_there_are_none():
    model = build_arch("unet2d")
    s = prepare(copy.deepcopy(model.denoiser), QuantConfig(timesteps=TS, split_concat=True))
    splits = {n: m for n, m in iter_quant_layers(s) if isinstance(m.act_quant, SplitActQuantizer)}
    up = {n for n, _ in iter_quant_layers(s) if ".resnets." in n and n.startswith("up_blocks")
          and n.rsplit(".", 1)[1] in ("conv1", "conv_shortcut")}
    assert set(splits) == up and up
    for n, m in splits.items():
        assert sum(m.act_quant.sizes) == m.weight.shape[1] and all(isinstance(q, TemporalActQuantizer)
                                                                   for q in m.act_quant.parts)
    x = torch.randn(2, *model.sample_shape)
    with torch.no_grad():  # every split layer was called with its concatenation's width
        s(x, torch.tensor([TS[1]] * 2))
    dit = build_arch("dit_tiny")
    with pytest.raises(ValueError, match="split_concat=true, but no layer .* reads a skip concatenation"):
        prepare(copy.deepcopy(dit.denoiser), QuantConfig(timesteps=TS, split_concat=True))


def test_bad_ranks_fail_naming_the_value():
    with pytest.raises(ValueError, match="quant.lowrank_rank=-1"):
        QuantSpec(lowrank_rank=-1)
    with pytest.raises(DQError, match="method.rank=0"):
        SVDQuantConfig(rank=0)
    layer, _ = _layer("linear")
    with pytest.raises(ValueError, match="rank=16 must be an int in 1..15"):
        layer.set_lowrank(16)


def test_lowrank_layers_pick_where_the_branch_goes_and_a_bad_name_is_one_line():
    model = build_arch("unet2d")
    qcfg = QuantConfig(timesteps=TS, lowrank_rank=3, lowrank_layers=("up_blocks.1.resnets.0.conv_shortcut",))
    s = prepare(copy.deepcopy(model.denoiser), qcfg)
    assert [n for n, m in iter_quant_layers(s) if m.lowrank_rank] == ["up_blocks.1.resnets.0.conv_shortcut"]
    every = prepare(copy.deepcopy(model.denoiser), QuantConfig(timesteps=TS, lowrank_rank=3))
    assert sum(bool(m.lowrank_rank) for _, m in iter_quant_layers(every)) > 10
    with pytest.raises(DQError, match="quant.lowrank_layers entry 'up_blocks.1.resnet' names no layer a rank-3 branch fits"):
        prepare(copy.deepcopy(model.denoiser), QuantConfig(timesteps=TS, lowrank_rank=3,
                                                           lowrank_layers=("up_blocks.1.resnet",)))


def test_skip_shortcut_scope_branches_the_up_path_shortcuts_only():
    model = build_arch("unet2d")
    s = prepare(copy.deepcopy(model.denoiser), QuantConfig(timesteps=TS, lowrank_rank=3, lowrank_scope="skip_shortcuts"))
    got = [n for n, m in iter_quant_layers(s) if m.lowrank_rank]
    assert got and all(n.startswith("up_blocks.") and n.endswith(".conv_shortcut") for n in got)
    assert set(got) == {n for n, _ in iter_quant_layers(s) if n.startswith("up_blocks.") and n.endswith("conv_shortcut")}
    with pytest.raises(ValueError, match="lowrank_scope=skip_shortcuts, but no layer .* raw skip concatenation"):
        prepare(copy.deepcopy(build_arch("dit_tiny").denoiser),
                QuantConfig(timesteps=TS, lowrank_rank=3, lowrank_scope="skip_shortcuts"))
    with pytest.raises(ValueError, match="lowrank_scope='some' is not valid; valid choices: all, skip_shortcuts"):
        QuantSpec(lowrank_scope="some")


def test_the_branch_is_the_users_where_set_else_the_methods():
    own = LowRank(16, "skip_shortcuts")
    assert QuantSpec().resolve_lowrank(own) == own and QuantSpec().resolve_lowrank() == LowRank(0, "all")
    assert QuantSpec(lowrank_rank=8).resolve_lowrank(own) == LowRank(8, "all")  # a rank alone: every layer
    assert QuantSpec(lowrank_rank=0).resolve_lowrank(own) == LowRank(0, "all")
    assert QuantSpec(lowrank_scope="all").resolve_lowrank(own) == LowRank(16, "all")
    with pytest.raises(ValueError, match="quant.lowrank_scope=all names no branch: this method has none"):
        QuantSpec(lowrank_scope="all").resolve_lowrank()


def _job(arch):
    return Job(teacher=build_arch(arch), quant=QuantSpec(), distill=None, timesteps=list(TS),
               calibration=lambda: None, fit=None)


def test_dilatequants_own_branch_goes_to_the_unet_shortcuts_and_is_noted_where_none_fits():
    job = _job("unet2d")
    widest = max(min(job.teacher.denoiser.get_submodule(n).weight.shape[:2])
                 for n in job.teacher.family.skip_shortcuts(job.teacher.denoiser))
    fits = LowRank(widest - 1, BRANCH.scope)
    student, qcfg = job.prepare(False, 0, fits)
    assert (qcfg.lowrank_rank, qcfg.lowrank_scope) == (widest - 1, "skip_shortcuts")
    got = [n for n, m in iter_quant_layers(student) if m.lowrank_rank]
    assert got and all(n.endswith("conv_shortcut") for n in got)
    assert job.notes == [f"quant.lowrank_rank unset: the method's own low-rank branch, rank {widest - 1} on "
                         "skip_shortcuts (quant.lowrank_rank=0 for none)"]
    assert _job("unet2d").quant_config(False, 0, LowRank(widest, "skip_shortcuts")).lowrank_rank == 0
    dit = _job("dit_tiny")
    assert dit.quant_config(False, 0, BRANCH).lowrank_rank == 0
    assert dit.notes == ["quant.lowrank_rank unset: the method's low-rank branch (rank 16 on skip_shortcuts) fits no "
                         "layer of this DiTTransformer2DModel (no skip concatenation): none built"]
    with pytest.raises(ValueError, match=f"quant.lowrank_rank={widest} fits none of the skip shortcuts "
                                         f"\\(largest rank that fits: {widest - 1}\\)"):
        prepare(copy.deepcopy(job.teacher.denoiser), QuantConfig(timesteps=TS, lowrank_rank=widest,
                                                                 lowrank_scope="skip_shortcuts"))
