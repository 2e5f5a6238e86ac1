"""The fast runtime: compiled int8 layers agree with the fake-quant reference per layer and per table row,
the runtime is picked by what the machine has, and a tampered export fails on load in one line."""
import copy
import json
import logging

import pytest
import torch

from dq.errors import DQError
from dq.models import export as export_mod
from dq.models.export import export_student, load_export
from dq.models.load import build_arch
from dq.quant.compiled import shared_knots
from dq.quant.int8 import Int8Conv2d, Int8Linear, available, int8_weight, qconv2d, quantize_u8
from dq.quant.knots import KnotActQuantizer
from dq.quant.prepare import rows_of
from test_export import _student, layer_io

needs_int8 = pytest.mark.skipif(not available(), reason="no oneDNN int8 ops in this torch build")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A W4A4 student of the tiny UNet (knot-form TPQ: every row differs) with some 8-bit-weight layers."""
    model = build_arch("unet2d")
    student, meta, batch = _student(model, knots=3)
    return student, export_student(student, meta, tmp_path_factory.mktemp("exp") / "exp"), batch


@needs_int8
def test_compiled_layers_agree_with_reference_per_layer_on_every_row_of_a_mixed_batch(exported):
    student, folder, (x, t) = exported
    assert len(set(t.tolist())) > 1  # the batch mixes steps
    seen = layer_io(student, x, t)
    fast, qc = load_export(folder, "compiled")
    mods = dict(fast.denoiser.named_modules())
    picked = {}  # one of each kind: a conv with a Weight-Dilation input scale, an 8-bit-weight conv, a linear
    for n, m in mods.items():
        if isinstance(m, Int8Conv2d) and m.input_scale is not None:
            picked.setdefault("conv, input scale", n)
        if isinstance(m, Int8Conv2d) and m.halved:
            picked.setdefault("conv, 8-bit weights", n)
        if isinstance(m, Int8Linear):
            picked.setdefault("linear", n)
    assert len(picked) == 3, picked
    rows = rows_of(fast.denoiser, t)
    si = fast.denoiser.dq_step_index
    # float32 kernel output: float rounding only; bfloat16 output (where the CPU has it): one bf16 rounding more
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2 ** -8)):
        for kind, name in picked.items():
            mods[name].out_dtype = dtype
            layer = torch.compile(mods[name])  # the layer as the graph runs it: one row per call, a runtime input
            a, want = seen[name]
            for r in torch.unique(rows):
                mask = rows == r
                with torch.no_grad(), si.use(r.reshape(1)):
                    got = layer(a[mask])
                assert got.dtype == dtype
                err = ((got.float() - want[mask]).norm() / want[mask].norm()).item()
                assert err <= tol, (kind, name, dtype, int(r), err)


@needs_int8
def test_compiled_model_serves_every_step_and_mixed_batches(exported, monkeypatch):
    student, folder, (x, t) = exported
    monkeypatch.setenv("DQ_COMPILED_DTYPE", "float32")  # bfloat16 between the kernels: scored by FID, docs/runtime.md
    fast, _ = load_export(folder, "compiled")
    eager, _ = load_export(folder, "int8")
    with torch.no_grad():
        for step in sorted(set(t.tolist()))[:2]:  # two steps: one graph, the row is an input
            tt = torch.full((x.shape[0],), step)
            a, b = fast.family.forward(fast.denoiser, x, tt), eager.family.forward(eager.denoiser, x, tt)
            ref = student.family.forward(student.denoiser, x, tt)
            assert a.dtype == torch.float32 and float((a - b).abs().max()) <= 1e-2 * float(b.abs().max())
            assert float((a - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
        # a batch that mixes steps runs the same int8 layers, each step's samples with its row
        assert torch.equal(fast.family.forward(fast.denoiser, x, t), eager.family.forward(eager.denoiser, x, t))
    knotted = [m for m in fast.denoiser.modules() if isinstance(m, KnotActQuantizer)]
    assert knotted and all(m.shared_hat for m in knotted)  # the graph computed one set of knot weights per call
    assert fast.denoiser.dq_step_index.hat is None  # and left none behind for an eager call


@needs_int8
def test_two_compiled_runtimes_in_one_process_each_run_their_own_graph(exported, tmp_path, monkeypatch):
    """The compiled graphs keep no guards on module attributes (dq.quant.compiled.OPTIONS): a second runtime of the
    same architecture but other bits and weights must not be served by the first one's graph."""
    monkeypatch.setenv("DQ_COMPILED_DTYPE", "float32")
    _, folder, (x, _) = exported
    student8, meta8, _ = _student(build_arch("unet2d"), w_bits=8, knots=3)
    folder8 = export_student(student8, meta8, tmp_path / "w8")
    tt = torch.full((x.shape[0],), int(meta8["quant"]["timesteps"][0]))
    with torch.no_grad():
        for f in (folder, folder8, folder):
            fast, eager = load_export(f, "compiled")[0], load_export(f, "int8")[0]
            a, b = fast.family.forward(fast.denoiser, x, tt), eager.family.forward(eager.denoiser, x, tt)
            assert float((a - b).abs().max()) <= 1e-2 * float(b.abs().max()), f


def test_knot_weights_are_shared_only_where_every_quantizer_has_the_same_knots(exported):
    student, _, _ = exported
    model = copy.deepcopy(student.denoiser)
    knotted = [m for m in model.modules() if isinstance(m, KnotActQuantizer)]
    assert torch.equal(shared_knots(model), knotted[0].knot_t) and all(m.shared_hat for m in knotted)
    with torch.no_grad():
        knotted[-1].knot_t[1] += 1
    assert shared_knots(model) is None and not any(m.shared_hat for m in knotted)


def test_auto_picks_what_the_machine_supports_and_says_so(exported, monkeypatch, caplog):
    _, folder, _ = exported
    caplog.set_level(logging.INFO, logger="dq")
    monkeypatch.setattr(export_mod, "int8_available", lambda: False)
    model, qc = load_export(folder)
    assert qc["runtime"] == "reference" and model.name.endswith(":reference")
    assert "runtime=auto: reference" in caplog.text and "no oneDNN int8 ops" in caplog.text
    with pytest.raises(DQError, match="runtime=int8 needs torch's oneDNN int8 ops"):
        load_export(folder, "int8")
    if available():
        monkeypatch.setattr(export_mod, "int8_available", lambda: True)
        monkeypatch.setattr(export_mod, "can_compile", lambda: False)
        assert load_export(folder)[1]["runtime"] == "int8"
        monkeypatch.setattr(export_mod, "can_compile", lambda: True)
        assert load_export(folder)[1]["runtime"] == "compiled"
    with pytest.raises(DQError, match="unknown runtime 'fast'; valid choices: auto, reference, int8, compiled"):
        load_export(folder, "fast")
    monkeypatch.setenv("DQ_COMPILED_DTYPE", "half")
    with pytest.raises(DQError, match="unknown DQ_COMPILED_DTYPE 'half'; valid choices: float32, bfloat16"):
        export_mod.compiled_dtype()


def _edit(folder, tmp_path, name, edit):
    import shutil
    out = tmp_path / "tampered"
    shutil.copytree(folder, out)
    data = json.loads((out / name).read_text())
    edit(data)
    (out / name).write_text(json.dumps(data))
    return out


def _first_layer(qc, w_bits):
    return next(n for n, info in qc["layers"].items() if info["w_bits"] == w_bits)


@pytest.mark.parametrize("what,edit,message", [
    ("global weight bits", lambda qc: qc["quant"].update(w_bits=3), "is declared W4A4 but quant 3/4 builds it W3A4"),
    ("a layer's weight bits", lambda qc: qc["layers"][_first_layer(qc, 4)].update(w_bits=3),
     "is declared W3A4 but quant 4/4 builds it W4A4"),
    ("every 4-bit width, consistently", lambda qc: [qc["quant"].update(w_bits=3)] + [
        layer.update(w_bits=3) for layer in qc["layers"].values() if layer["w_bits"] == 4],
     "integer weights or zero points outside the 3-bit range 0..7"),
    ("a layer's shape", lambda qc: qc["layers"][_first_layer(qc, 4)].update(shape=[3, 3]), "has weight shape [3, 3]"),
    ("the timesteps", lambda qc: (qc["timesteps"].pop(), qc["quant"]["timesteps"].pop()), "has shape"),
    ("one timestep list", lambda qc: qc["timesteps"].pop(), "the two must be the same schedule"),
])
def test_a_tampered_export_fails_in_one_line(exported, tmp_path, what, edit, message):
    _, folder, _ = exported
    bad = _edit(folder, tmp_path, "quantization_config.json", edit)
    with pytest.raises(DQError) as e:
        load_export(bad, "reference")
    assert message in str(e.value) and "\n" not in str(e.value), (what, str(e.value))


def test_an_export_whose_config_builds_another_model_fails_in_one_line(exported, tmp_path):
    _, folder, _ = exported
    bad = _edit(folder, tmp_path, "config.json", lambda c: c.update(block_out_channels=[c["block_out_channels"][0] * 2,
                                                                                      *c["block_out_channels"][1:]]))
    with pytest.raises(DQError) as e:
        load_export(bad, "reference")
    msg = str(e.value)  # the first layer the two files disagree on: one that is not built, or of another shape
    assert ("do not belong together" in msg or "config.json builds" in msg) and "\n" not in msg, msg


def test_tables_of_the_wrong_length_name_the_timesteps(exported, tmp_path):
    """A table whose row count disagrees with the timesteps in quantization_config.json."""
    from safetensors.torch import load_file, save_file
    import shutil
    _, folder, _ = exported
    out = tmp_path / "rows"
    shutil.copytree(folder, out)
    tensors = load_file(str(out / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("act_quant.log_scale"))
    tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(DQError, match=f"tensor '{key}' has shape .* one row per timestep"):
        load_export(out, "reference")


def test_bench_runtime_names_a_bad_cell_in_one_line():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_runtime.py"
    proc = subprocess.run([sys.executable, str(script), "--cells", "resnet:8"], capture_output=True, text=True)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1 and "'resnet:8'" in err[0] and "ddpm_cifar10" in err[0], proc.stderr


def test_bench_runtime_ledger_keeps_cells_of_earlier_runs_and_takes_new_ones_over_them(tmp_path):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_runtime", Path(__file__).resolve().parents[1] / "scripts" / "bench_runtime.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ledger, folder = tmp_path / "runtime_cells.json", tmp_path / "cpu"
    folder.mkdir()
    old = {"cell": "digits:1", "ms": {"FP float32": 7.0}}
    ledger.write_text(json.dumps({"machines": {"cpu": {"model": "X"}}, "fid": {},
                                  "cells": {"cpu": {"digits:1": old, "digits:250": {"cell": "digits:250", "ms": {}}}}}))
    new = {"cell": "digits:250", "ms": {"FP float32": 300.0}}
    (folder / "digits_b250.json").write_text(json.dumps(new))
    (folder / "machine.json").write_text(json.dumps({"model": "Y"}))
    ledger.write_text(json.dumps({**json.loads(ledger.read_text()),
                                  "fid": {"cpu": [{"student": "a", "rows": [1]}, {"student": "b", "rows": [2]}]}}))
    (folder / "fid.json").write_text(json.dumps([{"student": "b", "rows": [3]}]))
    merged = bench.merge_ledger(ledger, "cpu", folder)
    assert merged["cells"]["cpu"] == {"digits:1": old, "digits:250": new} and merged["machines"]["cpu"] == {"model": "Y"}
    assert merged["fid"]["cpu"] == [{"student": "a", "rows": [1]}, {"student": "b", "rows": [3]}]
    assert json.loads(ledger.read_text()) == merged  # written back


def test_bench_runtime_pairs_each_round_with_its_faster_peer(tmp_path):
    """'paired': per round the faster peer's time over the row's, median over rounds; a drift that slows every row
    of a round alike cancels, where the medians' ratio moves with it. Sequential cells have no pairs."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_runtime", Path(__file__).resolve().parents[1] / "scripts" / "bench_runtime.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    drift = [1.0, 1.0, 2.0, 2.0, 2.0]  # the machine twice as slow from round 3 on
    rounds = {"FP bf16 + compile": [10 * d for d in drift], "PT2E W8A8 + compile": [12 * d for d in drift],
              "dq W4A4 compiled": [9.0, 9.0, 20.0, 20.0, 20.0]}  # ratios 10/9, 10/9, 1, 1, 1: median 1
    record = {"rounds_ms": rounds, "order": "interleaved"}
    paired = bench.paired_vs_peer(record)
    assert paired["dq W4A4 compiled"] == pytest.approx(1.0) and paired["FP bf16 + compile"] == pytest.approx(1.0)
    assert paired["PT2E W8A8 + compile"] == pytest.approx(10 / 12)
    rounds["dq W4A4 compiled"] = [5 * d for d in drift]
    assert bench.paired_vs_peer(record)["dq W4A4 compiled"] == pytest.approx(2.0)
    assert bench.paired_vs_peer({**record, "order": "sequential"}) == {} and bench.paired_vs_peer({"ms": {}}) == {}


@needs_int8
def test_a_halved_layer_of_small_fan_in_runs_as_one_exact_float_convolution(exported):
    """conv_in's 8-bit weights (fan-in 27) sum exactly in float32: one float convolution of (x_q − zx) with W
    gives what the two int8 halves give, with half the output channels."""
    _, folder, _ = exported
    eager = load_export(folder, "int8")[0]
    halved = [m for m in eager.denoiser.modules() if isinstance(m, Int8Conv2d) and m.halved]
    assert halved and all(m.float_ints == (m.w8[0].numel() * 255 ** 2 < 2 ** 24) for m in halved)
    m = next(m for m in halved if m.float_ints)
    x = torch.randn(2, m.w8.shape[1], 8, 8, generator=torch.Generator().manual_seed(0))
    dx, inv, zp = m._row(m._row0)
    xq = quantize_u8(x, inv, zp, m.act.bits)
    got = m._float_ints(xq, dx, zp)
    want = m._join(qconv2d(xq, dx, zp.long(), m.w8, m.w_scale, m._wzp, m.bias, m.stride, m.padding, m.dilation,
                           torch.float32), 1)
    assert got.shape == want.shape and got.shape[1] == m.w8.shape[0] // 2
    assert float((got - want).norm() / want.norm()) <= 1e-6


def test_wide_integer_weights_run_as_two_exact_int8_halves():
    """8-bit weights less their zero point span [−255, 255]: the kernel gets [W_hi; W_lo] with 16·W_hi + W_lo = W,
    both int8; weights that fit int8 stay as they are; wider than two halves hold is refused in one line."""
    w = torch.randint(-255, 256, (6, 5, 3, 3))
    w[0, 0, 0, 0], w[1, 0, 0, 0] = 255, -255
    w8, halved = int8_weight(w)
    assert halved and w8.dtype == torch.int8 and w8.shape == (12, 5, 3, 3)
    hi, lo = w8.long().chunk(2)
    assert torch.equal(16 * hi + lo, w) and int(lo.abs().max()) <= 8
    small = torch.randint(-128, 128, (4, 7))
    w8, halved = int8_weight(small)
    assert not halved and torch.equal(w8.long(), small)
    with pytest.raises(ValueError, match="up to ±2040 do not fit two int8 halves"):
        int8_weight(torch.tensor([[2040, 0]]))


def test_bench_runtime_ab_turns_one_feature_off_and_pairs_both_load_orders(exported):
    """--ab: the 'off' copy differs from the 'on' one in exactly the feature's modules; the table gives each order's
    paired ratio and their geometric mean (the load-order effect cancels to first order)."""
    import importlib.util
    from pathlib import Path
    from dq.models.attention import QuantAttnProcessor
    from dq.models.export import can_compile
    from dq.quant.groupnorm import ChannelsLastGroupNorm

    if not (available() and can_compile()):
        pytest.skip("runtime=compiled needs oneDNN int8 ops and a C++ compiler")
    spec = importlib.util.spec_from_file_location(
        "bench_runtime", Path(__file__).resolve().parents[1] / "scripts" / "bench_runtime.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = load_export(exported[1], "compiled")[0].denoiser  # not called: nothing compiles
    norms = [m for m in model.modules() if isinstance(m, ChannelsLastGroupNorm)]
    fused = [m for m in model.modules() if isinstance(m, QuantAttnProcessor) and m.fused]
    assert norms and fused
    assert bench.feature_off(model, "groupnorm") == len(norms)
    assert all(type(m) is torch.nn.GroupNorm for m in norms)
    assert bench.feature_off(model, "attention") == len(fused) and not any(m.fused for m in fused)
    assert bench.feature_off(model, "groupnorm") == 0  # nothing left to turn off
    rec = {"cell": "digits:250", "feature": "groupnorm", "threads": 2, "code": {},
           "rounds_ms": {"on": [1.0] * 3, "off": [1.0] * 3}}
    table = bench.ab_table([{**rec, "order": ["on", "off"], "ms": {"on": 10.0, "off": 11.0}, "paired_off_over_on": 1.1},
                            {**rec, "order": ["off", "on"], "ms": {"on": 10.0, "off": 10.0}, "paired_off_over_on": 1.0}],
                           {"model": "CPU"})
    assert "| digits:250 | 10.0 / 11.0, 1.100 | 10.0 / 10.0, 1.000 | **1.049** |" in table


@needs_int8
def test_a_dit_mlps_gelu_runs_inside_its_int8_matmul(tmp_path):
    """DiT's MLP (diffusers GELU: a projection, then tanh-GELU) on the int8 runtime: the projection's oneDNN matmul
    applies the GELU to its float result; the module gives what the separate GELU gives, to float rounding."""
    from diffusers.models.activations import GELU
    from dq.models.export import fuse_gelu
    from dq.quant.int8 import Int8Linear

    from dq.models.conditioning import cond_fn_for
    from dq.models.load import DiffusionModel
    from dq.models.sampling import SamplerConfig, sampler_timesteps
    from dq.models.student import calibrate, prepare, weight_dilation
    from dq.quant.config import QuantConfig

    model = build_arch("dit_tiny")
    ts = tuple(sampler_timesteps(model, SamplerConfig(steps=4)))
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=ts, tpq_knots=2)
    s = prepare(copy.deepcopy(model.denoiser), qcfg)
    labels = cond_fn_for(model, 0)(torch.arange(len(ts)))[0]
    batch = [(torch.randn(len(ts), *model.sample_shape, generator=torch.Generator().manual_seed(0)), torch.tensor(ts),
              labels)]
    weight_dilation(s, batch)
    calibrate(s, batch, "minmax")
    meta = {"quant": json.loads(json.dumps(qcfg.__dict__, default=list)), "sampler": {"name": "ddim", "steps": 4},
            "method": {"name": "test"}, "teacher": model.name}
    folder = export_student(DiffusionModel(s, model.scheduler, "student"), meta, tmp_path / "exp")
    fused = load_export(folder, "int8")[0].denoiser
    plain = load_export(folder, "int8")[0].denoiser
    gelus = [m for m in fused.modules() if isinstance(m, GELU)]
    assert gelus and all(m.proj.post_op == "gelu_tanh" and m.approximate == "tanh" for m in gelus)
    for m in plain.modules():  # undo the fusion: the projection writes y, the module's own GELU follows
        if isinstance(m, GELU):
            m.proj.fuse_post_op("none")
            del m.gelu
    assert fuse_gelu(fused) == len(gelus)  # idempotent: loading fused them already, fusing again keeps one GELU
    for a, b in zip(gelus, [m for m in plain.modules() if isinstance(m, GELU)]):
        inp = torch.randn(2, 5, a.proj.w8.shape[1], generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), fused.dq_step_index.use(torch.tensor([1])), plain.dq_step_index.use(torch.tensor([1])):
            got, want = a(inp), b(inp)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max()), (got - want).abs().max()
    with pytest.raises(ValueError, match="post_op='relu6'"):
        next(m for m in fused.modules() if isinstance(m, Int8Linear)).fuse_post_op("relu6")
