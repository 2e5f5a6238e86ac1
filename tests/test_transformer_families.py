"""DiT and PixArt families on tiny random-init models: blocks, Weight Dilation (folded and carried), TPQ rows
by timestep, strict state_dict round trip, conditioning, and the main job end to end."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT
from dq.errors import DQError
from dq.models.blocks import run_blocks
from dq.models.families import family_of
from dq.models.load import build_arch
from dq.models.student import calibrate, prepare, smoothquant, weight_dilation
from dq.quant import TemporalActQuantizer, iter_quant_layers, set_quant_state
from dq.quant.config import QuantConfig
from dq.quant.dilation import effective_bounds
from dq.quant.scaling import apply_weight_dilation

TIMESTEPS = tuple(range(999, 0, -100))  # 10 steps
ARCHS = ["dit_tiny", "pixart_tiny"]
QCFG = QuantConfig(w_bits=4, a_bits=4, timesteps=TIMESTEPS)

pytestmark = pytest.mark.usefixtures("one_thread")


def heterogeneous(model: nn.Module, seed: int = 0) -> nn.Module:
    """Unequal input-channel magnitudes (WD finds s > 1) and non-trivial biases / modulation tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embedding_table" not in name and "scale_shift_table" not in name:
                col = [1, p.shape[1]] + [1] * (p.dim() - 2)
                p.mul_(torch.exp(0.7 * torch.randn(col, generator=g)))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "scale_shift_table" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def tiny(arch: str, seed: int = 0) -> nn.Module:
    return heterogeneous(build_arch(arch, seed).denoiser, seed)


def data(arch: str, b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor(TIMESTEPS)[torch.randint(len(TIMESTEPS), (b,), generator=g)]
    cond = torch.randint(0, 11, (b,), generator=g) if arch == "dit_tiny" else torch.randn(b, 5, 12, generator=g)
    return x, t, cond


def raw_forward(model, x, t, cond):
    """The diffusers forward itself (all output channels), for block-chain comparisons."""
    if type(model).__name__.startswith("DiT"):
        return model(x, timestep=t, class_labels=cond).sample
    return model(x, encoder_hidden_states=cond, timestep=t, added_cond_kwargs={"resolution": None,
                                                                               "aspect_ratio": None}).sample


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def student(arch: str, seed: int = 0) -> nn.Module:
    model = prepare(tiny(arch, seed), QCFG)
    weight_dilation(model)
    calibrate(model, [data(arch, seed=seed + 1), data(arch, seed=seed + 2)])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every step's table distinct (calibration on few batches copies rows)
        for m in model.modules():
            if isinstance(m, TemporalActQuantizer):
                m.delta.mul_(1 + 0.5 * torch.rand(m.delta.shape, generator=g))
    return model


# ------------------------------------------------------------------------------ blocks
@pytest.mark.parametrize("granularity", ["block", "module", "model"])
@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_in_order_equal_the_forward(arch, granularity):
    model = tiny(arch)
    fam = family_of(model)
    x, t, cond = data(arch, 3)
    with torch.no_grad():
        ref = raw_forward(model, x, t, cond)
        blocks = fam.blocks(model, granularity)
        out = run_blocks(blocks, fam.initial_state(x, t, cond), len(blocks) - 1)
    assert torch.equal(out.sample, ref) and ref.shape == (3, 8, 8, 8)  # ε and learned variance
    assert torch.equal(fam.forward(model, x, t, cond), ref[:, :4])
    names = [b.name for b in blocks]
    if granularity == "model":
        assert names == ["model"]
        return
    middle = {"block": ["blocks.0", "blocks.1"],
              "module": {"dit_tiny": ["blocks.0.norm1", "blocks.0.attn1", "blocks.0.ff"],
                         "pixart_tiny": ["blocks.0.attn1", "blocks.0.attn2", "blocks.0.ff"]}[arch]}[granularity]
    assert names[0] == "stem" and names[1:1 + len(middle)] == middle and names[-1] == "head"
    owned = [id(p) for b in blocks for p in b.parameters()]  # every parameter in exactly one unit
    assert len(owned) == len(set(owned)) == len(list(model.parameters()))


def test_dit_student_in_train_mode_keeps_its_labels():
    # diffusers' LabelEmbedding drops 10 % of labels to the null class in train(); BKD trains students in
    # train() against an eval() teacher, so the units must embed labels without that dropout.
    model = tiny("dit_tiny")
    fam = family_of(model)
    x, t, _ = data("dit_tiny", 64)
    labels = torch.randint(0, 10, (64,))
    blocks = fam.blocks(model, "block")
    with torch.no_grad():
        ref = run_blocks(blocks, fam.initial_state(x, t, labels), len(blocks) - 1).sample
        model.train()
        assert torch.equal(run_blocks(blocks, fam.initial_state(x, t, labels), len(blocks) - 1).sample, ref)


# ------------------------------------------------------------------------------ conditioning
@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # inside diffusers' token_drop
def test_conditioning_of_each_family():
    dit = build_arch("dit_tiny").denoiser
    spec = family_of(dit).conditioning(dit)
    assert (spec.kind, spec.num_classes, spec.null_class) == ("class", 10, 10)
    emb = dit.transformer_blocks[0].norm1.emb.class_embedder
    # the index diffusers' label dropout writes is the null class, and the table has a row for it
    assert emb.token_drop(torch.tensor([3, 7]), torch.tensor([1, 0])).tolist() == [10, 7]
    assert emb.embedding_table.num_embeddings == 11
    pixart = build_arch("pixart_tiny").denoiser
    assert family_of(pixart).conditioning(pixart).kind == "text"
    assert family_of(pixart).conditioning(pixart).dim == 12


def test_missing_or_unsupported_conditioning_is_a_one_line_error():
    x = torch.randn(2, 4, 8, 8)
    dit = build_arch("dit_tiny").denoiser
    with pytest.raises(DQError, match=r"class-conditional: cond must be class labels \[B=2\], got None"):
        family_of(dit).forward(dit, x, 999, None)
    pixart = build_arch("pixart_tiny").denoiser
    with pytest.raises(DQError, match=r"text-conditional: cond must be encoder hidden states \[B=2, L, D\], "
                                      r"got \(2,\)"):
        family_of(pixart).initial_state(x, torch.tensor([1, 2]), torch.tensor([1, 2]))
    from diffusers import PixArtTransformer2DModel

    micro = PixArtTransformer2DModel(**{**family_of(pixart).archs["pixart_tiny"][1], "use_additional_conditions": True})
    with pytest.raises(DQError, match="micro-conditioned PixArt"):
        family_of(micro).forward(micro, x, 999, torch.randn(2, 5, 12))


# ------------------------------------------------------------------------------ Weight Dilation
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_weight_dilation_exact(arch, fold):
    """fold: dq.models.student.weight_dilation (WD, then the family folds 1/s into adaLN rows);
    not fold: dq.quant.scaling alone (every 1/s carried as input_scale)."""
    model = prepare(tiny(arch), QCFG)
    batches = [data(arch, seed=s) for s in (1, 2)]
    set_quant_state(model, weight=False, act=False)
    fam = family_of(model)
    with torch.no_grad():
        ref = [fam.forward(model, *b) for b in batches]
    layers = dict(iter_quant_layers(model))
    bounds = {n: effective_bounds(m.weight.detach().clone()) for n, m in layers.items()}
    deltas = {n: m.weight_quant.delta.detach().clone() for n, m in layers.items()}

    report = weight_dilation(model) if fold else apply_weight_dilation(model, fam.dilation_groups(model))

    with torch.no_grad():
        for b, r in zip(batches, ref):
            assert rel(fam.forward(model, *b), r) <= 1e-5
    assert max(r["s_max"] for r in report) > 1.5 and all(r["s_min"] >= 1.0 for r in report)
    assert sum(len(r["layers"]) for r in report) == len(layers)
    assert ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
            "transformer_blocks.0.attn1.to_v") in [tuple(r["layers"]) for r in report]
    folded = {r["folded_into"]: r["layers"] for r in report if r["folded_into"] is not None}
    if fold and arch == "dit_tiny":
        assert set(folded) == {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear",
                               "proj_out_1"}
    else:
        assert folded == {}
    producers = set(folded)
    for r in report:
        for n in r["layers"]:
            assert torch.equal(layers[n].input_scale, torch.ones_like(layers[n].input_scale)) == (
                r["folded_into"] is not None or r["s_max"] == 1.0), n
    for n, m in layers.items():
        lo, hi = effective_bounds(m.weight.detach())
        if n in producers:  # rows scaled by u = 1/s ≤ 1: Δ_w of a row scales with it, gate rows untouched
            d = m.weight.shape[1]
            untouched = [2, 5] if n.endswith("norm1.linear") else []
            for j in untouched:
                assert torch.equal(m.weight_quant.delta[j * d:(j + 1) * d], deltas[n][j * d:(j + 1) * d])
            assert (m.weight_quant.delta <= deltas[n] * (1 + 1e-6)).all()
            continue
        assert torch.equal(lo, bounds[n][0]) and torch.equal(hi, bounds[n][1]), n  # bitwise
        assert torch.equal(m.weight_quant.delta, deltas[n]), n


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothquant_is_exact_in_float_and_folds_like_wd(arch):
    model = prepare(tiny(arch), QCFG)
    batches = [data(arch, seed=1)]
    set_quant_state(model, weight=False, act=False)
    fam = family_of(model)
    with torch.no_grad():
        ref = fam.forward(model, *batches[0])
    report = smoothquant(model, batches, alpha=0.5)
    with torch.no_grad():
        assert rel(fam.forward(model, *batches[0]), ref) <= 1e-5
    folded = {r["folded_into"] for r in report} - {None}
    assert folded == ({"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear", "proj_out_1"}
                      if arch == "dit_tiny" else set())


def test_folding_scales_the_modulation_rows_as_computed_by_hand():
    model = prepare(tiny("dit_tiny"), QCFG)
    lin = model.transformer_blocks[1].norm1.linear
    apply_weight_dilation(model, family_of(model).dilation_groups(model))  # lin is dilated too (its own input)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    u = model.transformer_blocks[1].ff.net[0].proj.input_scale.clone()  # the MLP rows: shift 3, scale 4
    family_of(model).fold_scales(model)
    d = u.numel()
    sh, sc = slice(3 * d, 4 * d), slice(4 * d, 5 * d)
    assert torch.equal(lin.weight[sh], w0[sh] * u[:, None]) and torch.equal(lin.bias[sh], b0[sh] * u)
    assert torch.equal(lin.weight[sc], w0[sc] * u[:, None]) and torch.equal(lin.bias[sc], b0[sc] * u + (u - 1))
    assert (u < 1).any()


# ------------------------------------------------------------------------------ TPQ and checkpoints
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_timestep_batch_equals_per_step_runs(arch):
    model = student(arch)
    fam = family_of(model)
    x, _, cond = data(arch, seed=5)
    t_mixed = torch.tensor([999, 499, 99, 499])
    with torch.no_grad():
        out = fam.forward(model, x, t_mixed, cond)
        for v in t_mixed.unique().tolist():
            alone = fam.forward(model, x, torch.full((4,), v), cond)
            idx = (t_mixed == v).nonzero().flatten()
            assert torch.equal(out[idx], alone[idx])
        for i in range(4):
            single = fam.forward(model, x[i:i + 1], t_mixed[i:i + 1], cond[i:i + 1])
            assert rel(single, out[i:i + 1]) < 1e-4
        wrong = fam.forward(model, x, torch.full((4,), 999), cond)  # step 999's tables for every sample
        assert rel(wrong[1], out[1]) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_strict(arch):
    model = student(arch)
    fresh = prepare(build_arch(arch, seed=123).denoiser, QCFG)  # other weights, no WD, no calibration
    fresh.load_state_dict(model.state_dict(), strict=True)
    x, t, cond = data(arch, seed=9)
    fam = family_of(model)
    with torch.no_grad():
        assert torch.equal(fam.forward(fresh, x, t, cond), fam.forward(model, x, t, cond))
    assert torch.equal(fresh.dq_step_index.rows(t), model.dq_step_index.rows(t))


def test_layer_bits_first_last_and_embeddings():
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=TIMESTEPS, quantize_time_embedding=False)
    dit = dict(iter_quant_layers(prepare(build_arch("dit_tiny").denoiser, qcfg)))
    assert dit["pos_embed.proj"].weight_quant.bits == 8 and dit["proj_out_2"].weight_quant.bits == 8
    assert dit["transformer_blocks.0.norm1.linear"].weight_quant.bits == 4
    assert not any(".norm1.emb." in n for n in dit)
    pixart = dict(iter_quant_layers(prepare(build_arch("pixart_tiny").denoiser, qcfg)))
    assert pixart["proj_out"].weight_quant.bits == 8 and "adaln_single.linear" in pixart
    assert not any(n.startswith(("adaln_single.emb.", "caption_projection.")) for n in pixart)
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=TIMESTEPS, quantize_embedding_acts=False)
    for arch, branch in (("dit_tiny", lambda n: ".norm1.emb." in n or n.endswith(".norm1.linear") or n == "proj_out_1"),
                         ("pixart_tiny", lambda n: n.startswith(("adaln_single.", "caption_projection.")))):
        layers = dict(iter_quant_layers(prepare(build_arch(arch).denoiser, qcfg)))
        assert any(branch(n) for n in layers) and any(not branch(n) for n in layers)
        assert all((layer.act_quant is None) == branch(n) and layer.weight_quant is not None
                   for n, layer in layers.items()), arch


# ------------------------------------------------------------------------------ end to end
@pytest.mark.e2e
@pytest.mark.parametrize("model", ["tiny_dit", "tiny_pixart"])
def test_main_job_end_to_end(tmp_path, model):
    proc = subprocess.run([sys.executable, "train.py", "debug=tiny", f"model={model}", f"hydra.run.dir={tmp_path}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bits"] == "W4A4" and results["train"]["steps"] == 2 * 4  # 4 blocks × 2 steps
    assert (tmp_path / "student.safetensors").is_file()


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_loads_through_its_config_class(tmp_path, arch):
    from diffusers import DDPMScheduler

    from dq.models.load import ModelConfig, load_model

    saved = build_arch(arch)
    saved.denoiser.save_pretrained(tmp_path)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(source="local", path=str(tmp_path)))
    assert type(loaded.denoiser) is type(saved.denoiser) and loaded.sample_shape == (4, 8, 8)
    x, t, cond = data(arch, 2)
    with torch.no_grad():
        out = loaded.family.forward(loaded.denoiser, x, t, cond)
        assert torch.equal(out, saved.family.forward(saved.denoiser, x, t, cond))
