"""Real sizes: the stand-ins are the published architectures, phases record time and peak memory,
calibration conditioning is stored once per distinct encoding, and an export carries its whole pipeline."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiTPipeline, StableDiffusionPipeline

from dq.data.calibration import generate
from dq.data.indexed import IndexedRows
from dq.data.calibration import CalibConfig
from dq.errors import DQError
from dq.models.conditioning import cond_fn_for, encode_prompts
from dq.models.export import export_student, load_export, load_pipeline
from dq.models.load import ModelConfig, build_arch, load_model
from dq.models.sampling import SamplerConfig
import copy
import json

from dq.models.sampling import sampler_timesteps
from dq.models.student import calibrate, prepare, weight_dilation
from dq.quant.config import QuantConfig


def _student(model, steps=4):
    """A W4A4 student of a (possibly conditional) model, min-max calibrated on one input per step."""
    ts = tuple(sampler_timesteps(model, SamplerConfig(steps=steps)))
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=ts)
    s = prepare(copy.deepcopy(model.denoiser), qcfg)
    batch = (torch.randn(len(ts), *model.sample_shape), torch.tensor(ts))
    cond_fn = cond_fn_for(model, 0)
    if cond_fn is not None:
        batch = (*batch, cond_fn(torch.arange(len(ts)))[0])
    weight_dilation(s, [batch])
    calibrate(s, [batch], "minmax")
    meta = {"quant": json.loads(json.dumps(qcfg.__dict__, default=list)),
            "sampler": {"name": "ddim", "steps": steps, "eta": 0.0}, "method": {"name": "test"}, "teacher": model.name}
    return type(model)(s, model.scheduler, "student"), meta


def _params(m):
    return None if m is None else sum(p.numel() for p in m.parameters())


# parameters of the real architectures (SD-1.5's UNet, VAE and CLIP ViT-L/14 text tower are its published
# 859,520,964 / 83,653,863 / 123,060,480); diffusers' DiT keeps a timestep / class embedder in each of its
# 28 blocks (the original shares one), so its DiT-XL/2 has 749.8M parameters where the paper's has 675.1M
@pytest.mark.parametrize("arch,denoiser,vae,text", [
    ("ddpm_cifar10", 35_746_307, None, None),
    ("ldm_bedroom", 274_056_163, 55_322_782, None),
    ("sd15", 859_520_964, 83_653_863, 123_060_480),
    ("dit_xl2_256", 749_826_464, 83_653_863, None),
])
def test_real_size_stand_ins_are_the_published_architectures(arch, denoiser, vae, text):
    with torch.device("meta"):  # the classes and shapes, no memory
        m = load_model(ModelConfig(source="tiny", arch=arch))
    assert (_params(m.denoiser), _params(m.vae), _params(m.text_encoder)) == (denoiser, vae, text)
    assert "random init" in m.name  # a stand-in never passes for the real model
    if arch == "sd15":
        assert m.image_shape == (3, 512, 512) and m.tokenizer.model_max_length == 77
        assert m.text_encoder.config.hidden_size == m.denoiser.config.cross_attention_dim == 768


PHASES_PROBE = """
import json, torch
from dq.phases import Phases, reset_hwm
if not reset_hwm():
    print(json.dumps(None)); raise SystemExit
phases = Phases()
with phases("outer"):
    with phases("big"):
        x = torch.ones(256 * 2**20 // 4)  # 256 MB, touched
        x += 1
        del x
    with phases("small"):
        y = torch.ones(16)
    with phases("small"):  # a repeated phase: seconds add up, the peak is the max
        y += 1
print(json.dumps(phases.summary()))
"""


def test_phases_record_seconds_and_the_peak_inside_each_phase():
    import json
    import subprocess
    import sys

    # a fresh process: a test process's allocator may serve the tensor from memory it already holds
    out = subprocess.run([sys.executable, "-c", PHASES_PROBE], capture_output=True, text=True, timeout=120).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if r is None:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert r["peak_scope"] == "phase"
    assert r["big"]["peak_rss_mb"] - r["small"]["peak_rss_mb"] > 200  # the 256 MB showed only where it was made
    assert r["outer"]["peak_rss_mb"] >= r["big"]["peak_rss_mb"]  # an enclosing phase includes its children
    assert r["outer"]["seconds"] >= r["big"]["seconds"] + r["small"]["seconds"] - 0.05


def test_indexed_rows_gather_like_the_full_tensor():
    table = torch.randn(3, 4, 2)
    index = torch.tensor([2, 0, 0, 1, 2])
    rows = IndexedRows(table, index)
    full = table[index]
    idx = torch.tensor([4, 1, 3])
    assert torch.equal(rows[idx], full[idx]) and rows.shape == full.shape and len(rows) == 5


def test_text_calibration_stores_each_encoding_once_and_gathers_every_inputs_own():
    teacher = build_arch("sd")
    teacher.prompts = ("a red cat", "two dogs", "a house", "the sea")
    cs = generate(teacher, SamplerConfig(steps=4), CalibConfig(n_samples=24, n_trajectories=8, batch_size=8,
                                                              guidance_scale=3.0, act_init_samples=8))
    enc = encode_prompts(teacher.tokenizer, teacher.text_encoder, list(teacher.prompts) + [""])
    assert len(cs.cond_table) <= 5 and cs.cond_index.shape == (24,)
    cond = cs.cond[torch.arange(24)]
    for c, image in zip(cond, cs.image):  # each input: its own image's prompt, or the empty one (CFG's other half)
        assert torch.equal(c, enc[int(image) % 4]) or torch.equal(c, enc[4])
    labels = generate(build_arch("unet2d_class"), SamplerConfig(steps=4),
                      CalibConfig(n_samples=8, n_trajectories=4, batch_size=4, act_init_samples=8))
    assert labels.cond_index is None and labels.cond.shape == (8,) and labels.cond.dtype == torch.long


@pytest.mark.parametrize("arch", ["sd", "dit_tiny_vae"])
def test_export_carries_its_pipeline_and_loads_as_a_diffusers_pipeline(arch, tmp_path):
    if arch == "sd":
        model = build_arch("sd")
    else:  # the tiny DiT with a VAE around it
        model = build_arch("dit_tiny")
        model.vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    student, meta = _student(model)
    for part in ("vae", "text_encoder", "tokenizer"):
        setattr(student, part, getattr(model, part))
    folder = export_student(student, meta, tmp_path / "exp")
    loaded, qc = load_export(folder, "reference")
    assert set(qc["pipeline"]) == {k for k in ("vae", "text_encoder", "tokenizer") if getattr(model, k) is not None}
    for part in qc["pipeline"]:
        if part == "tokenizer":
            assert loaded.tokenizer("a red cat").input_ids == model.tokenizer("a red cat").input_ids
        else:
            a, b = getattr(loaded, part).state_dict(), getattr(model, part).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = load_pipeline(folder, "reference")
    pipe.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    if arch == "sd":
        assert isinstance(pipe, StableDiffusionPipeline)
        out = pipe(prompt=["a red cat"], num_inference_steps=4, generator=g(), output_type="np").images
        assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()
        with pytest.raises(ValueError, match="not in the schedule"):  # the tables hold the 4 trained timesteps
            pipe(prompt=["a red cat"], num_inference_steps=5, generator=g(), output_type="np")
        # eval.py on the export alone: no teacher, no model argument; it decodes and encodes with what it carries
        import subprocess
        import sys

        from conftest import ROOT
        proc = subprocess.run([sys.executable, "eval.py", f"ckpt_path={folder}", "runtime=reference", "debug=tiny",
                               "task.num_samples=2", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                   "HOME": str(tmp_path)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        from PIL import Image
        assert Image.open(tmp_path / "eval" / "samples_student.png").mode == "RGB"  # decoded images
    else:
        assert isinstance(pipe, DiTPipeline)
        out = pipe(class_labels=[1, 3], guidance_scale=1.0, num_inference_steps=4, generator=g(),
                   output_type="np").images  # (DiTPipeline guides against class 1000: DiT-XL/2's null class)
        assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()


def test_a_pipeline_without_its_parts_is_one_line(tmp_path):
    student, meta = _student(build_arch("sd"))  # the denoiser alone: no VAE, text encoder, tokenizer
    folder = export_student(student, meta, tmp_path / "exp")
    with pytest.raises(DQError, match="StableDiffusionPipeline needs the model's vae, text_encoder, tokenizer"):
        load_pipeline(folder, "reference")


def test_prefix_cache_on_disk_trains_the_same_student_as_in_memory(tmp_path, caplog):
    """(Recomputing the prefixes runs them at the training batch, the cache in chunks of 256: kernels round
    differently and quantization amplifies it, so only memory vs disk is bitwise.)"""
    import lightning as L

    from dq.data.calibration import CalibrationDataModule
    from dq.distill.bkd import BlockDistiller, DistillConfig
    from test_distill import tiny_setup

    teacher, calib, qcfg, student = tiny_setup(tmp_path)
    inputs = {"x": calib.x, "t": calib.t}
    spill = tmp_path / "spill"
    trained = {}
    for name, budget in {"memory": dict(cache_mb=4096), "disk": dict(cache_mb=0.01, cache_disk_mb=512,
                                                                      cache_dir=str(spill)),
                         "recompute": dict(cache_mb=0)}.items():
        s = copy.deepcopy(student).train().requires_grad_(True)
        cfg = DistillConfig(steps_per_block=2, blocks=["down.0", "mid", "up.1"], **budget)
        module = BlockDistiller(s, teacher.denoiser, cfg, inputs=inputs)
        with caplog.at_level("INFO", logger="dq"):
            L.Trainer(max_steps=module.total_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False).fit(
                module, datamodule=CalibrationDataModule(calib, 8, module.total_steps, seed=0))
        assert module.cache.enabled == (name != "recompute")
        assert module.cache.on_disk.get("teacher", False) == (name == "disk")
        trained[name] = s.state_dict()
    assert "memory-mapped files" in caplog.text
    assert list(spill.iterdir()) == []  # the files were unlinked as soon as they were mapped
    for k, v in trained["memory"].items():
        assert torch.equal(v, trained["disk"][k]), k  # the same float32 states: bitwise the same student


@pytest.mark.parametrize("mask", [None, "keys"])
def test_attention_in_blocks_of_query_rows_matches_the_whole_scores(mask, monkeypatch):
    from diffusers.models.attention_processor import Attention

    import dq.models.attention as qa

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    qa.install_quant_attention("attn", attn, a_bits=4, prob_bits=8, num_steps=1)
    x = torch.randn(3, 37, 16)
    m = None if mask is None else torch.randn(3, 1, 37)  # diffusers' masks: per key, broadcast over queries
    with torch.no_grad():
        for quant in (attn.processor.q_quant, attn.processor.k_quant, attn.processor.v_quant):
            quant.delta.fill_(0.1)
        whole = attn(x, attention_mask=m)
        monkeypatch.setattr(qa, "SCORES_BYTES", 2 * 2 * 37 * 4 * 5)  # 5 query rows per block: 8 blocks
        blocks = attn(x, attention_mask=m)
    assert blocks.shape == whole.shape and torch.allclose(blocks, whole, rtol=1e-5, atol=1e-6)


def test_results_name_the_machine_they_came_from(tmp_path):
    import json

    from dq.machine import onednn_isa
    from dq.tasks.common import write_results

    m = json.loads(write_results(tmp_path, {"x": 1}).read_text())["machine"]
    assert m["model"] and m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert m["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(m["flags"]) <= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
    assert m["onednn"] == onednn_isa() and "convolution f32" in m["onednn"]  # what oneDNN really ran here


@pytest.mark.parametrize("overrides", [["experiment=ddpm_cifar10", "model=standin_ddpm_cifar10"],
                                       ["experiment=ldm_bedroom", "model=standin_ldm_bedroom"],
                                       ["experiment=sd15", "model=standin_sd15"], ["model=standin_dit_xl2"]])
def test_dry_run_config_composes_with_every_preset_and_keeps_its_model(overrides, tmp_path):
    from conftest import make_cfg
    from dq.config import check

    cfg = make_cfg(tmp_path, "train", [*overrides, "debug=dryrun"])
    check(cfg)
    preset = make_cfg(tmp_path, "train", overrides[:1])
    assert cfg.model.source == "tiny" and cfg.model.arch in ("ddpm_cifar10", "ldm_bedroom", "sd15", "dit_xl2_256")
    assert (cfg.sampler.steps, cfg.calib.n_trajectories, cfg.distill.steps_per_block, cfg.task.num_samples) == (4, 2, 2, 4)
    assert cfg.quant == preset.quant and cfg.method == preset.method  # reduced counts, the preset's method and bits


def test_training_attention_in_checkpointed_blocks_gives_the_same_gradients(monkeypatch):
    """Backward runs after the step rows are reset: the recomputed blocks must read the rows of the forward."""
    from diffusers.models.attention_processor import Attention

    import dq.models.attention as qa
    from dq.quant.steps import StepIndex

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    qa.install_quant_attention("attn", attn, a_bits=4, prob_bits=8, num_steps=3)
    si = StepIndex([30, 20, 10])
    p = attn.processor
    for quant in (p.q_quant, p.k_quant, p.v_quant, p.prob_quant):
        quant.set_step_index(si)
        with torch.no_grad():
            quant.delta.copy_(torch.rand_like(quant.delta) * 0.1 + 0.02)
            quant.delta[1] *= 3  # the row used differs from the others: a wrong row changes every gradient
    x0 = torch.randn(2, 37, 16)
    results = []
    for scores_bytes in (qa.SCORES_BYTES, 2 * 2 * 37 * 4 * 5):
        monkeypatch.setattr(qa, "SCORES_BYTES", scores_bytes)
        attn.zero_grad()
        x = x0.clone().requires_grad_(True)
        with si.use(torch.tensor([1])):
            out = attn(x)
        out.square().sum().backward()  # outside the rows' context, as in distillation
        results.append((out.detach(), x.grad, p.prob_quant.delta.grad.clone(), p.q_quant.delta.grad.clone()))
    for whole, blocks in zip(*results):
        assert torch.allclose(blocks, whole, rtol=1e-4, atol=1e-6)
    assert results[0][2][1].abs().sum() > 0 and results[0][2][0].abs().sum() == 0  # only row 1 was used


def test_dropping_the_weight_copies_changes_no_output():
    from dq.quant.quantizers import clear_weight_caches

    model = build_arch("unet2d")
    student, _ = _student(model)
    x, t = torch.randn(2, *model.sample_shape), torch.tensor(list(student.denoiser.dq_step_index.timesteps[:2]))
    with torch.no_grad():
        before = model.family.forward(student.denoiser, x, t)
        assert clear_weight_caches(student.denoiser) > 0  # a no-grad call left a float copy per quantized weight
        assert clear_weight_caches(student.denoiser) == 0
        after = model.family.forward(student.denoiser, x, t)
    assert torch.equal(before, after)


def test_dryrun_script_bad_preset_is_one_line():
    import subprocess
    import sys

    from conftest import ROOT
    proc = subprocess.run([sys.executable, "scripts/dryrun.py", "--presets", "sd21"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "sd21" in proc.stderr and "ddpm_cifar10, ldm_bedroom, sd15, dit_xl2" in proc.stderr
    assert len([l for l in proc.stderr.splitlines() if l.strip() and "torchao" not in l]) <= 2, proc.stderr


@pytest.mark.parametrize("dim_head", [16, 32])
def test_bf16_attention_runs_its_matmuls_in_bf16_for_wide_heads_only(dim_head, monkeypatch):
    """A runtime computing in bf16 feeds the attention bf16 projections; the quantized q, k, v, P go back to
    bf16 for the matmuls from BF16_MIN_HEAD_DIM on (float32 below), and the result stays within bf16 rounding."""
    from diffusers.models.attention_processor import Attention

    import dq.models.attention as qa

    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=2, dim_head=dim_head)
    qa.install_quant_attention("attn", attn, a_bits=8, prob_bits=8, num_steps=1)
    p = attn.processor
    with torch.no_grad():
        for quant in (p.q_quant, p.k_quant, p.v_quant):
            quant.delta.fill_(0.02)
            quant.zero_point.fill_(128)
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):  # values bf16 holds exactly
            for v in (lin.weight, lin.bias):
                if v is not None:
                    v.copy_(v.bfloat16().float())
        x = torch.randn(2, 37, 64).bfloat16()
        ref = attn(x.float())  # float32 all through
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lin.to(torch.bfloat16)
        seen = []
        matmul = torch.matmul
        monkeypatch.setattr(torch, "matmul", lambda a, b: seen.append((a.dtype, b.dtype)) or matmul(a, b))
        out = attn(x)
    wide = dim_head >= qa.BF16_MIN_HEAD_DIM
    assert seen == [(torch.bfloat16 if wide else torch.float32,) * 2] * 2
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
