"""prepare / WD / TPQ / calibrate / state_dict on tiny diffusers UNets (CPU, float32, fixed seeds)."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from dq.errors import DQError
from dq.models.attention import QuantAttnProcessor
from dq.models.families import family_of
from dq.models.student import calibrate, input_absmax, prepare, unprepare, weight_dilation
from dq.quant import QuantConv2d, QuantLinear, TemporalActQuantizer, iter_quant_layers, set_quant_state
from dq.quant.config import QuantConfig
from dq.quant.dilation import effective_bounds
from dq.quant.scaling import apply_smoothquant, apply_weight_dilation

TIMESTEPS = tuple(range(999, 0, -100))  # 10 steps: 999, 899, …, 99


# tiny ops: thread start-up costs more than the work, and 2 threads thrash on a shared 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
    ).eval()


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8,
    ).eval()


KINDS = {
    "unet2d": (tiny_unet, lambda b, g: (torch.randn(b, 1, 16, 16, generator=g), None)),
    "cond": (tiny_cond_unet, lambda b, g: (torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 16, generator=g))),
}


def heterogeneous(unet: nn.Module, seed: int = 0) -> nn.Module:
    """Unequal input-channel magnitudes (so WD finds s > 1) and non-trivial norm affines (so folding matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                col = [1, m.weight.shape[1]] + [1] * (m.weight.ndim - 2)
                m.weight.mul_(torch.exp(0.7 * torch.randn(col, generator=g)))
                if m.bias is not None:
                    m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return unet


def batches(kind: str, n: int, b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x, cond = KINDS[kind][1](b, g)
        t = torch.tensor(TIMESTEPS)[torch.randint(len(TIMESTEPS), (b,), generator=g)]
        out.append((x, t, cond))
    return out


def unet_forward(unet: nn.Module, x: torch.Tensor, t, cond=None) -> torch.Tensor:
    return family_of(unet).forward(unet, x, t, cond)


def groups(unet: nn.Module):
    return family_of(unet).dilation_groups(unet)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def perturb_tables(unet: nn.Module, seed: int = 0) -> None:
    """Make every step's table distinct (calibration on few batches copies rows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, TemporalActQuantizer):
                m.delta.mul_(1 + 0.5 * torch.rand(m.delta.shape, generator=g))


def student(kind: str, w=4, a=4, seed=0, wd=True, calib=2) -> nn.Module:
    unet = heterogeneous(KINDS[kind][0](seed), seed)
    prepare(unet, QuantConfig(w_bits=w, a_bits=a, timesteps=TIMESTEPS))
    if wd:
        apply_weight_dilation(unet, groups(unet))
    calibrate(unet, batches(kind, calib, seed=seed + 1))
    return unet


# ------------------------------------------------------------------------------ prepare structure
@pytest.mark.parametrize("kind", ["unet2d", "cond"])
def test_prepare_swaps_every_layer(kind):
    unet = KINDS[kind][0]()
    n_attn = sum(type(m).__name__ == "Attention" for m in unet.modules())
    prepare(unet, QuantConfig(w_bits=4, a_bits=4, timesteps=TIMESTEPS))
    plain = [n for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert plain == []
    layers = dict(iter_quant_layers(unet))
    assert layers["conv_in"].weight_quant.bits == 8 and layers["conv_in"].act_quant.bits == 8
    assert layers["conv_out"].weight_quant.bits == 8 and layers["conv_out"].act_quant.bits == 8
    assert layers["time_embedding.linear_1"].weight_quant.bits == 4
    assert all(m.act_quant.delta.shape == (10,) for m in layers.values())
    procs = [m for m in unet.modules() if isinstance(m, QuantAttnProcessor)]
    assert len(procs) == n_attn > 0
    sd = unet.state_dict()
    keys = [k for k in sd if ".processor.prob_quant.delta" in k]
    assert len(keys) == n_attn and sd[keys[0]].shape == (10, procs[0].heads)
    assert torch.equal(sd["dq_step_index.timesteps"], torch.tensor(TIMESTEPS))
    with pytest.raises(ValueError, match="already prepared"):
        prepare(unet, QuantConfig(timesteps=TIMESTEPS))


def test_prepare_rejects_other_models():
    with pytest.raises(DQError, match="'Sequential' is not supported; supported classes: DiTTransformer2DModel, "):
        prepare(nn.Sequential(nn.Linear(2, 2)), QuantConfig(timesteps=(1,)))


def test_quant_config_validation():
    with pytest.raises(ValueError, match="w_bits=9.*2..8"):
        QuantConfig(w_bits=9, timesteps=(1,))
    with pytest.raises(ValueError, match="prob_bits=1"):
        QuantConfig(prob_bits=1, timesteps=(1,))
    with pytest.raises(ValueError, match="timesteps is empty"):
        QuantConfig()
    with pytest.raises(ValueError, match=r"duplicates: \[5\]"):
        QuantConfig(timesteps=[9, 5, 5])
    cfg = QuantConfig(timesteps=[3, 2], skip=["mid_block"])  # lists (e.g. from hydra) become tuples
    assert cfg.timesteps == (3, 2) and cfg.skip == ("mid_block",) and cfg.num_steps == 2
    assert QuantConfig(shared_tables=True).num_steps == 1


def test_skip_and_float_time_embedding():
    unet = prepare(tiny_unet(), QuantConfig(timesteps=TIMESTEPS, skip=("mid_block",), quantize_time_embedding=False))
    names = [n for n, _ in iter_quant_layers(unet)]
    assert not any(n.startswith(("mid_block.", "time_embedding.")) for n in names)
    assert type(unet.time_embedding.linear_1) is nn.Linear
    assert not isinstance(unet.mid_block.attentions[0].processor, QuantAttnProcessor)


def test_a8_layers_raise_only_their_input_activations_and_a_typo_is_an_error():
    a8 = ("mid_block.resnets.0.conv1",)
    unet = prepare(tiny_unet(), QuantConfig(timesteps=TIMESTEPS, a8_layers=a8))
    bits = {n: (layer.weight_quant.bits, layer.act_quant.bits) for n, layer in iter_quant_layers(unet)
            if layer.act_quant is not None}
    assert bits["mid_block.resnets.0.conv1"] == (4, 8)
    assert bits["mid_block.resnets.0.conv2"] == (4, 4) and bits["conv_in"] == (8, 8)
    assert sum(a == 8 for _, a in bits.values()) == 3  # the named layer + conv_in / conv_out (first_last_bits)
    with pytest.raises(DQError, match=r"quant.a8_layers entry 'mid_block.resnets.0.conv9' names no layer with "
                                      r"quantized activations; layer names look like "):
        prepare(tiny_unet(), QuantConfig(timesteps=TIMESTEPS, a8_layers=("mid_block.resnets.0.conv9",)))


def test_float_embedding_acts_leave_only_the_timestep_branch_inputs_in_float():
    base = prepare(tiny_unet(), QuantConfig(timesteps=TIMESTEPS))
    emb = prepare(tiny_unet(), QuantConfig(timesteps=TIMESTEPS, quantize_embedding_acts=False))
    branch = {n for n, _ in iter_quant_layers(emb) if n.startswith("time_embedding.") or n.endswith(".time_emb_proj")}
    assert len(branch) == 2 + 11  # linear_1, linear_2 and one projection per resnet (3 down, 2 mid, 6 up)
    for n, layer in iter_quant_layers(emb):
        assert layer.weight_quant.bits == dict(iter_quant_layers(base))[n].weight_quant.bits
        assert (layer.act_quant is None) == (n in branch), n
    # the same function as the default student with exactly those activation quantizers switched off
    emb.load_state_dict({k: v for k, v in base.state_dict().items()
                         if not any(k.startswith(n + ".act_quant.") for n in branch)})
    for n, layer in iter_quant_layers(base):
        if n in branch:
            layer.act_quant.enabled = False
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(emb(x, 599).sample, base(x, 599).sample)
        dict(iter_quant_layers(base))["up_blocks.0.resnets.0.time_emb_proj"].act_quant.enabled = True  # by default
        # those inputs are quantized, and that changes the output
        assert not torch.equal(emb(x, 599).sample, base(x, 599).sample)


@pytest.mark.parametrize("kind", ["unet2d", "cond"])
def test_processor_mirrors_default_attention(kind):
    unet = heterogeneous(KINDS[kind][0]())
    (x, t, cond), = batches(kind, 1)
    kw = {}
    if kind == "cond":  # exercise the attention-mask path of cross-attention too
        kw = {"encoder_hidden_states": cond, "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 1]] * 4)}
    with torch.no_grad():
        ref = unet(x, t, **kw).sample
        prepare(unet, QuantConfig(timesteps=TIMESTEPS))
        set_quant_state(unet, weight=False, act=False)
        assert rel(unet(x, t, **kw).sample, ref) < 1e-5


# ------------------------------------------------------------------------------ Weight Dilation
@pytest.mark.parametrize("kind", ["unet2d", "cond"])
def test_weight_dilation_exact_on_unet(kind):
    unet = prepare(heterogeneous(KINDS[kind][0]()), QuantConfig(w_bits=4, a_bits=4, timesteps=TIMESTEPS))
    data = batches(kind, 2)
    absmax = input_absmax(unet, data)
    set_quant_state(unet, weight=False, act=False)
    with torch.no_grad():
        ref = [unet_forward(unet, *b) for b in data]
    layers = dict(iter_quant_layers(unet))
    bounds = {n: effective_bounds(m.weight.detach().clone()) for n, m in layers.items()}
    deltas = {n: m.weight_quant.delta.detach().clone() for n, m in layers.items()}

    report = apply_weight_dilation(unet, groups(unet), act_absmax=absmax)

    with torch.no_grad():
        for b, r in zip(data, ref):
            assert rel(unet_forward(unet, *b), r) <= 1e-5
    for n, m in layers.items():
        lo, hi = effective_bounds(m.weight.detach())
        assert torch.equal(lo, bounds[n][0]) and torch.equal(hi, bounds[n][1]), n  # bitwise
        assert torch.equal(m.weight_quant.delta, deltas[n]), n  # re-init: Δ_w unchanged
        assert (m.input_scale <= 1).all()
    assert all(r["s_min"] >= 1.0 for r in report)
    assert max(r["s_max"] for r in report) > 1.5  # heterogeneous channels give real factors
    folded = {r["folded_into"] for r in report} - {None}
    expected = {"unet2d": "down_blocks.1.attentions.0.group_norm",
                "cond": "down_blocks.0.attentions.0.transformer_blocks.0.norm1"}[kind]
    assert expected in folded
    assert all(r["act_absmax_after"] <= r["act_absmax_before"] for r in report)
    assert sum(len(r["layers"]) for r in report) == len(layers)


def test_smoothquant_on_unet_is_exact_in_float():
    unet = prepare(heterogeneous(tiny_unet()), QuantConfig(timesteps=TIMESTEPS))
    data = batches("unet2d", 1)
    absmax = input_absmax(unet, data)
    set_quant_state(unet, weight=False, act=False)
    with torch.no_grad():
        ref = unet_forward(unet, *data[0])
    d0 = unet.conv_in.weight_quant.delta.clone()
    report = apply_smoothquant(unet, groups(unet), absmax, alpha=0.5)
    with torch.no_grad():
        assert rel(unet_forward(unet, *data[0]), ref) <= 1e-5
    assert not torch.equal(unet.conv_in.weight_quant.delta, d0)  # SQ moves Δ_w; re-initialised
    assert report[0]["s_min"] > 0


# ------------------------------------------------------------------------------ TPQ
@pytest.mark.parametrize("kind", ["unet2d", "cond"])
def test_mixed_timestep_batch_equals_per_step_runs(kind):
    unet = student(kind)
    perturb_tables(unet)
    (x, _, cond), = batches(kind, 1, seed=5)
    t_mixed = torch.tensor([999, 499, 99, 499])
    with torch.no_grad():
        out = unet_forward(unet, x, t_mixed, cond)
        for v in t_mixed.unique().tolist():
            alone = unet_forward(unet, x, torch.full((4,), v), cond)  # same shapes: bitwise comparable
            idx = (t_mixed == v).nonzero().flatten()
            assert torch.equal(out[idx], alone[idx])
        for i in range(4):  # batch of one: equal up to kernel-dependent float rounding
            c = None if cond is None else cond[i:i + 1]
            single = unet_forward(unet, x[i:i + 1], t_mixed[i:i + 1], c)
            assert rel(single, out[i:i + 1]) < 1e-4
        # the tables matter: sample 1 at its step vs computed with step 999's tables
        wrong = unet_forward(unet, x, torch.full((4,), 999), cond)
        assert rel(wrong[1], out[1]) > 1e-3


def test_gradients_reach_only_used_rows():
    unet = student("unet2d")
    (x, _, _), = batches("unet2d", 1, seed=7)
    t = torch.tensor([899, 299, 899, 299])
    used = unet.dq_step_index.rows(t).unique()
    unet_forward(unet, x, t).pow(2).mean().backward()
    quantizers = [m for m in unet.modules() if isinstance(m, TemporalActQuantizer)]
    mask = torch.zeros(10, dtype=torch.bool)
    mask[used] = True
    nonzero = 0
    for q in quantizers:
        assert (q.delta.grad[~mask] == 0).all() and (q.zero_point.grad[~mask] == 0).all()
        nonzero += bool(q.delta.grad[mask].abs().sum() > 0)
    assert nonzero >= 0.9 * len(quantizers)


def test_unknown_timestep_and_state_restored():
    unet = student("unet2d", calib=1)
    si = unet.dq_step_index
    (x, _, _), = batches("unet2d", 1)
    with pytest.raises(ValueError, match=r"\[123\]"):
        unet(x, 123)
    assert si.current is None and si._saved == []
    with pytest.raises(Exception):
        unet(x[:, :, :7], 999)  # fails inside forward
    assert si.current is None and si._saved == []
    with torch.no_grad():
        unet(torch.cat([x, x]), torch.tensor(999))  # scalar timestep, doubled batch (CFG-style)
    assert si.current is None


def test_blocks_called_directly_need_rows():
    unet = student("unet2d", calib=1)
    h = torch.randn(2, 16, 16, 16)
    temb = torch.randn(2, 64)
    block = unet.down_blocks[0]
    with pytest.raises(RuntimeError, match="dq_step_index.use"):
        block(h, temb)
    with torch.no_grad(), unet.dq_step_index.use(unet.dq_step_index.rows(torch.tensor([999, 99]))):
        out, _ = block(h, temb)
    assert out.shape == (2, 16, 8, 8)


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("kind", ["unet2d", "cond"])
def test_state_dict_round_trip_strict(kind):
    unet = student(kind)
    perturb_tables(unet)
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=TIMESTEPS)
    fresh = prepare(KINDS[kind][0](seed=123), qcfg)  # other weights, no forward pass, no WD
    fresh.load_state_dict(unet.state_dict(), strict=True)
    (x, t, cond), = batches(kind, 1, seed=9)
    with torch.no_grad():
        assert torch.equal(unet_forward(fresh, x, t, cond), unet_forward(unet, x, t, cond))
    assert torch.equal(fresh.dq_step_index.rows(t), unet.dq_step_index.rows(t))


def test_deepcopy_keeps_its_own_step_index():
    unet = student("unet2d", calib=1)
    twin = copy.deepcopy(unet)
    q = next(m for m in twin.modules() if isinstance(m, TemporalActQuantizer))
    assert q._step_index is twin.dq_step_index
    (x, t, _), = batches("unet2d", 1)
    with torch.no_grad():
        assert torch.equal(twin(x, t).sample, unet(x, t).sample)


def test_unprepare_restores_float_model():
    unet = heterogeneous(tiny_unet())
    (x, t, _), = batches("unet2d", 1)
    with torch.no_grad():
        ref = unet(x, t).sample
    prepare(unet, QuantConfig(timesteps=TIMESTEPS))
    apply_weight_dilation(unet, groups(unet))
    unprepare(unet)
    assert not any(isinstance(m, (QuantConv2d, QuantLinear, QuantAttnProcessor)) for m in unet.modules())
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    with torch.no_grad():
        unet(x, 5)  # any timestep again: no schedule anymore
        assert rel(unet(x, t).sample, ref) < 1e-5
    prepare(unet, QuantConfig(timesteps=TIMESTEPS))


# ------------------------------------------------------------------------------ calibration
def test_calibration_error_w8a8_small_w4a4_worse():
    # 8-bit min–max: per tensor the rounding noise has RMS Δ/√12 ≈ range/880, i.e. ≈ 1% of the RMS
    # for activations whose range is ~8σ; over the ~20 quantized layers on the path, with residual
    # connections, independent noise adds in quadrature to a few %. 5% leaves margin (measured ≈ 2%).
    data = batches("unet2d", 3, seed=11)
    fp = tiny_unet()
    with torch.no_grad():
        ref = [unet_forward(fp, *b) for b in data]
    err = {}
    for bits in (8, 4):
        unet = prepare(tiny_unet(), QuantConfig(w_bits=bits, a_bits=bits, timesteps=TIMESTEPS))
        report = calibrate(unet, data)
        assert report.calibrated > 0 and report.unobserved == []
        with torch.no_grad():
            err[bits] = sum(rel(unet_forward(unet, *b), r) for b, r in zip(data, ref)) / len(data)
    print(f"relative output error: W8A8 {err[8]:.4f}, W4A4 {err[4]:.4f}")
    assert err[8] < 0.05
    assert err[4] > 3 * err[8]


def test_calibration_methods_and_missing_steps(caplog):
    unet = prepare(tiny_unet(), QuantConfig(w_bits=8, a_bits=8, timesteps=TIMESTEPS))
    data = [(x, torch.full((4,), 999), c) for x, _, c in batches("unet2d", 1)]
    with caplog.at_level("WARNING"):
        calibrate(unet, data, method="percentile", samples_per_row=32)
    assert "899" in caplog.text and "99]" in caplog.text  # unseen steps are reported
    q = unet.conv_in.act_quant
    assert torch.equal(q.delta, q.delta[:1].expand(10))  # filled from the nearest seen step
    calibrate(unet, data, method="mse", samples_per_row=32)
    with pytest.raises(ValueError, match="method='bogus'"):
        calibrate(unet, data, method="bogus")


def test_student_steps_report():
    # prepare → weight_dilation (with data: the report records what it did to the activations) → calibrate
    data = batches("cond", 2)
    unet = prepare(heterogeneous(tiny_cond_unet()), QuantConfig(timesteps=TIMESTEPS))
    scaling = weight_dilation(unet, data)
    calibration = calibrate(unet, data)
    assert calibration.calibrated > 0 and calibration.unobserved == []
    assert scaling and all("act_absmax_before" in r for r in scaling)
    assert sum(len(r["layers"]) for r in scaling) == len(list(iter_quant_layers(unet)))
    with torch.no_grad():
        out = unet_forward(unet, *data[0])
    assert torch.isfinite(out).all()


def test_shared_tables_are_timestep_agnostic():
    qcfg = QuantConfig(w_bits=8, a_bits=8, timesteps=TIMESTEPS, shared_tables=True)
    unet = prepare(tiny_unet(), qcfg)
    assert unet.conv_in.act_quant.delta.shape == (1,)
    data = batches("unet2d", 1)
    calibrate(unet, data)
    (x, t, _), = data
    with torch.no_grad():
        unet(x, 5)  # not in the schedule: fine, no table depends on the step
        with unet.dq_step_index.use(torch.tensor([9, 0, 3, 3])):  # data pipelines still pass rows
            unet.down_blocks[0](unet.conv_in(x), torch.randn(4, 64))
    fresh = prepare(tiny_unet(seed=1), qcfg)
    fresh.load_state_dict(unet.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x, t).sample, unet(x, t).sample)


def test_a_batch_at_one_step_uses_one_row_with_the_same_outputs():
    """Sampling calls the model with one timestep for the whole batch: the hook passes one row (the
    quantizers' scalar path), and the outputs equal those of a batch whose rows are given per sample."""
    from dq.models.load import build_arch
    from dq.quant.prepare import rows_of

    m = prepare(build_arch("unet2d").denoiser, QuantConfig(w_bits=4, a_bits=4, timesteps=(900, 500, 100)))
    g = torch.Generator().manual_seed(0)
    calibrate(m, [(torch.randn(6, 1, 16, 16, generator=g), torch.tensor([900, 500, 100] * 2), None)], "minmax")
    seen = []
    q = next(q for q in m.modules() if isinstance(q, TemporalActQuantizer) and q.num_steps > 1)
    q.register_forward_pre_hook(lambda mod, args: seen.append(mod._rows(args[0]).numel()))
    x, t = torch.randn(4, 1, 16, 16, generator=g), torch.full((4,), 500)
    with torch.no_grad():
        one_row = m(x, t).sample
        blocks = family_of(m).blocks(m)
        with m.dq_step_index.use(rows_of(m, t)):  # four equal rows, given explicitly
            s = family_of(m).initial_state(x, t)
            for b in blocks:
                s = b(s)
    assert seen == [1, 4]
    assert torch.equal(one_row, s.sample)
