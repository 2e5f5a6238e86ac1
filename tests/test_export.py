"""Deployable students: packed export folder, reference runtime bitwise, int8 runtime close, diffusers-native."""
import copy
import json
import pickle

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from dq.errors import DQError
from dq.models.export import export_student, load_export, pack, unpack
from dq.models.load import ModelConfig, build_arch, load_model
from dq.models.sampling import SamplerConfig, sampler_timesteps
from dq.models.student import calibrate, prepare, weight_dilation
from dq.quant.config import QuantConfig
from dq.quant.int8 import available
from dq.quant.lowrank import svd_init


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_pack_unpack_round_trip(bits, n):
    q = torch.randint(0, 2 ** bits, (n, 3), dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8 and p.numel() == (-(-q.numel() // 2) if bits <= 4 else q.numel())
    assert torch.equal(unpack(p, bits, [n, 3]), q)


def _student(model, steps=4, w_bits=4, knots=0, a8=(), emb_acts=True, split=False, rank=0):
    ts = tuple(sampler_timesteps(model, SamplerConfig(steps=steps)))
    qcfg = QuantConfig(w_bits=w_bits, a_bits=4, timesteps=ts, tpq_knots=knots, a8_layers=a8,
                       quantize_embedding_acts=emb_acts, split_concat=split, lowrank_rank=rank)
    s = prepare(copy.deepcopy(model.denoiser), qcfg)
    g = torch.Generator().manual_seed(0)
    every_step = (torch.randn(len(ts), *model.sample_shape, generator=g), torch.tensor(ts))
    weight_dilation(s, [every_step])
    svd_init(s)  # the low-rank branches (rank > 0) from the dilated weights
    calibrate(s, [every_step], "minmax")
    batch = (torch.randn(8, *model.sample_shape, generator=g), torch.tensor(ts[:2] * 4))  # mixed steps
    meta = {"quant": json.loads(json.dumps(qcfg.__dict__, default=list)),
            "sampler": {"name": "ddim", "steps": steps, "eta": 0.0}, "method": {"name": "test"}, "teacher": model.name}
    return type(model)(s, model.scheduler, "student"), meta, batch


A8 = ("up_blocks.2.resnets.0.conv_shortcut", "up_blocks.2.resnets.1")


@pytest.mark.parametrize("w_bits,knots,a8,emb_acts,split,rank",
                         [(4, 0, (), True, False, 0), (8, 0, (), True, False, 0), (4, 3, (), True, False, 0),
                          (4, 3, A8, True, False, 0), (4, 0, (), False, False, 0), (4, 3, (), True, True, 0),
                          (4, 3, (), False, True, 3), (8, 0, (), True, False, 3)])
def test_export_reloads_without_teacher_reference_bitwise_int8_close(w_bits, knots, a8, emb_acts, split, rank,
                                                                      tmp_path):
    model = build_arch("unet2d")
    student, meta, (x, t) = _student(model, w_bits=w_bits, knots=knots, a8=a8, emb_acts=emb_acts, split=split,
                                     rank=rank)
    assert split == any(k.endswith("act_quant.parts.1.delta") for k in student.denoiser.state_dict())
    assert (rank > 0) == any(k.endswith("lowrank_up") for k in student.denoiser.state_dict())
    out = export_student(student, meta, tmp_path / "exp")
    ref, qc = load_export(out, "reference")
    assert qc["layers"]["conv_in"]["w_bits"] == 8 and qc["timesteps"] == meta["quant"]["timesteps"]
    a8_named = {n for n in qc["layers"] if any(n == p or n.startswith(p + ".") for p in a8)}
    assert len(a8_named) == (5 if a8 else 0)  # the shortcut + resnets.1's conv1, conv2, conv_shortcut, time_emb_proj
    for n, layer in qc["layers"].items():
        if n in a8_named:
            assert (layer["w_bits"], layer["a_bits"]) == (w_bits, 8), n
    float_in = {n: layer for n, layer in qc["layers"].items() if layer["a_bits"] is None}  # the timestep branch
    assert set(float_in) == (set() if emb_acts else {n for n in qc["layers"] if student.family.embedding_branch(n)})
    assert (emb_acts or len(float_in) >= 3) and all(layer["w_bits"] == w_bits for layer in float_in.values())
    with torch.no_grad():
        want = student.family.forward(student.denoiser, x, t)
        assert torch.equal(ref.family.forward(ref.denoiser, x, t), want)
    if available():  # every layer call agrees to float rounding (a whole 4-bit model can differ more: a
        # rounding difference that moves one activation to the next integer level propagates)
        i8, _ = load_export(out, "int8")
        assert max(per_layer_errors(student, i8, x, t).values()) <= 1e-3


def layer_io(fake, x, t):
    """{quantized layer name: (its input, the fake-quant layer's output)} of one reference model call."""
    from dq.quant.layers import iter_quant_layers
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
             for n, layer in iter_quant_layers(fake.denoiser)]
    with torch.no_grad():
        fake.family.forward(fake.denoiser, x, t)
    for h in hooks:
        h.remove()
    return seen


def per_layer_errors(fake, int8, x, t):
    """Relative error of every int8 layer against its fake-quant layer on the same input (one model call)."""
    from dq.quant.prepare import rows_of
    seen = layer_io(fake, x, t)
    mods = dict(int8.denoiser.named_modules())
    with torch.no_grad(), int8.denoiser.dq_step_index.use(rows_of(int8.denoiser, t)):
        return {n: ((mods[n](a) - o).norm() / o.norm()).item() for n, (a, o) in seen.items()}


@pytest.mark.e2e
def test_embedded_teacher_export_is_small_and_int8_layers_agree(tmp_path):
    from dq.models.load import EMBEDDED_TEACHER
    model = load_model(ModelConfig())
    student, meta, (x, t) = _student(model, steps=50)
    out = export_student(student, meta, tmp_path / "exp")
    teacher_bytes = (EMBEDDED_TEACHER / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size <= 0.2 * teacher_bytes, (size, teacher_bytes)
    if available():
        i8, _ = load_export(out, "int8")
        errors = per_layer_errors(student, i8, x, t)
        assert len(errors) > 50 and max(errors.values()) <= 1e-3, max(errors.items(), key=lambda kv: kv[1])


def test_loaded_export_samples_inside_a_diffusers_pipeline(tmp_path):
    model = build_arch("unet2d")
    student, meta, _ = _student(model)
    ref, _ = load_export(export_student(student, meta, tmp_path / "exp"), "reference")
    images = []
    for denoiser in (student.denoiser, ref.denoiser):
        pipe = DDIMPipeline(unet=denoiser, scheduler=DDIMScheduler.from_config(ref.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(batch_size=2, num_inference_steps=4, output_type="np",
                           generator=torch.Generator().manual_seed(0)).images)
    assert images[0].shape == (2, 16, 16, 1) and (images[0] == images[1]).all()


def test_broken_export_and_malicious_training_checkpoint_run_nothing(tmp_path, cfg_factory, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "quantization_config.json").write_text("{}")
    with pytest.raises(DQError, match="not a readable dq export"):
        load_export(tmp_path / "exp")
    evil = tmp_path / "last.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Evil()}))
    from dq.tasks.common import main
    with pytest.raises(SystemExit) as e:
        main(cfg_factory("debug=tiny", f"task.resume={evil}"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "task.resume" in err[0] and not marker.exists()


@pytest.mark.parametrize("knots", [0, 3])
def test_export_moved_to_another_schedule_agrees_on_both_runtimes(knots, tmp_path):
    """retarget works on a loaded export, reference and int8 alike (int8 layers read the moved rows)."""
    from dq.quant.retarget import retarget

    model = build_arch("unet2d")
    student, meta, (x, _) = _student(model, knots=knots)
    out = export_student(student, meta, tmp_path / "exp")
    ref, _ = load_export(out, "reference")
    new = [999, 800, 500, 250, 0]
    mapping = retarget(ref.denoiser, new)
    assert mapping.exact == [500, 250, 0] and mapping.clamped == [999, 800]
    if available():
        i8, _ = load_export(out, "int8")
        retarget(i8.denoiser, new)
        t = torch.tensor([800, 250, 500, 0] * 2)
        with torch.no_grad():
            a, b = ref.family.forward(ref.denoiser, x, t), i8.family.forward(i8.denoiser, x, t)
        assert float((a - b).abs().max()) <= 1e-2 * float(a.abs().max())
