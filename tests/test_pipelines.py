"""Real pipelines: pipeline folders with VAE / text encoder / tokenizer, prompts encoded by the pipeline's
own text encoder, classifier-free guidance pairs, class labels, latent decoding, schedulers from the
folder, and the paper presets run with their tiny stand-ins."""
import json
import string
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conftest import ROOT, make_cfg
from dq.config import check
from dq.errors import DQError
from dq.models.conditioning import cond_fn_for, read_prompts
from dq.models.families.base import Conditioning
from dq.models.load import ModelConfig, build_arch, load_model

PROMPTS = ["a red cat", "two dogs on a beach", "a blue house at night"]
# preset → the tiny stand-in of the same classes it runs with here
STAND_INS = {"sd15": "tiny_sd", "ldm_bedroom": "tiny_ldm", "ddpm_cifar10": "tiny_unet"}
SMALL = ["debug=tiny", "metrics=digits", "metrics.reference=null", "logger=none"]


def _tokenizer(max_length: int = 12) -> CLIPTokenizer:
    """A CLIP BPE tokenizer written here: single characters plus a few merges."""
    chars = string.ascii_lowercase + "."
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(chars)})
    merges = [("a", "t</w>"), ("o", "g</w>"), ("d", "og</w>")]
    vocab.update({"at</w>": len(vocab), "og</w>": len(vocab) + 1, "dog</w>": len(vocab) + 2})
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _save_text_to_image_pipeline(folder, seed=0):
    torch.manual_seed(seed)
    tok = _tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


def _train(tmp_path, *overrides, expect=0):
    proc = subprocess.run([sys.executable, "train.py", *SMALL, f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _calibration_set(tmp_path):
    (path,) = (tmp_path / "cache").glob("calib-*.pt")
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------------ conditioning
def test_prompt_encoding_is_the_pipelines_own(tmp_path):
    """cond_fn_for encodes exactly as StableDiffusionPipeline.encode_prompt; image i gets prompt i mod n."""
    pipe = _save_text_to_image_pipeline(tmp_path / "sd")
    teacher = load_model(ModelConfig(source="local", path=str(tmp_path / "sd")))
    teacher.prompts = tuple(PROMPTS)
    cond, uncond = cond_fn_for(teacher, seed=0)(torch.arange(5))
    want, want_neg = pipe.encode_prompt([PROMPTS[i % 3] for i in range(5)], "cpu", 1, True)
    assert torch.equal(cond, want) and torch.equal(uncond, want_neg)
    assert cond.shape == (5, 12, 16) and not torch.equal(cond[0], cond[1]) and torch.equal(cond[0], cond[3])


def test_class_labels_are_a_function_of_seed_and_index_and_guide_with_the_null_class():
    spec = Conditioning("class", num_classes=10, null_class=10)
    fn = cond_fn_for(SimpleNamespace(conditioning=spec), seed=3)
    labels, null = fn(torch.arange(64))
    assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() < 10 and len(labels.unique()) > 5
    assert torch.equal(torch.cat([fn(torch.arange(0, 20))[0], fn(torch.arange(20, 64))[0]]), labels)
    assert torch.equal(null, torch.full((64,), 10))
    assert not torch.equal(cond_fn_for(SimpleNamespace(conditioning=spec), seed=4)(torch.arange(64))[0], labels)
    none = cond_fn_for(SimpleNamespace(conditioning=Conditioning("class", num_classes=10)), seed=3)
    assert none(torch.arange(4))[1] is None


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_class_conditional_unet_blocks_equal_its_forward(granularity):
    """The stem adds the class embedding to the time embedding, as UNet2DModel.forward does."""
    from dq.models.blocks import run_blocks

    m = build_arch("unet2d_class")
    x, t, labels = torch.randn(3, *m.sample_shape), torch.tensor([10, 500, 999]), torch.tensor([1, 5, 9])
    blocks = m.family.blocks(m.denoiser, granularity)
    with torch.no_grad():
        out = run_blocks(blocks, m.family.initial_state(x, t, labels), len(blocks) - 1).sample
        assert torch.equal(out, m.family.forward(m.denoiser, x, t, labels))
        assert not torch.equal(out, m.family.forward(m.denoiser, x, t, torch.tensor([2, 5, 9])))


def test_prompt_file_errors_and_shipped_default(tmp_path):
    assert len(read_prompts(None)) >= 16
    (tmp_path / "p.txt").write_text("\n  a cat \n\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ("a cat",)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DQError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(DQError, match="does not exist"):
        read_prompts(str(tmp_path / "nope.txt"))


def test_results_say_when_stand_in_embeddings_were_used():
    from dq.models.conditioning import conditioning_notes

    assert "stand-in" in conditioning_notes(build_arch("unet2d_cond"))[0]
    assert "stand-in" not in conditioning_notes(build_arch("sd"))[0] and conditioning_notes(build_arch("unet2d")) == []


def test_unconditional_calibration_key_is_unchanged():
    from dq.data.calibration import CalibConfig, calibration_key
    from dq.models.sampling import SamplerConfig

    key = calibration_key(load_model(ModelConfig()), SamplerConfig(), CalibConfig())
    assert set(key) == {"teacher", "sampler", "steps", "eta", "n_samples", "n_trajectories", "guidance_scale", "seed"}


# ------------------------------------------------------------------------------------- loading folders
def test_latents_decode_as_diffusers_pipelines_do():
    m = build_arch("sd")
    z = torch.randn(3, *m.sample_shape)
    with torch.no_grad():
        want = m.vae.decode(z / m.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.equal(m.to_images(z, batch_size=3), want) and m.image_shape == tuple(want.shape[1:])
    torch.testing.assert_close(m.to_images(z, batch_size=2), want, rtol=1e-5, atol=1e-6)  # decoded in chunks
    ldm = build_arch("ldm")
    assert ldm.to_images(torch.randn(2, *ldm.sample_shape)).shape == (2, *ldm.image_shape) == (2, 3, 16, 16)


def test_flat_folder_scheduler_and_named_scheduler(tmp_path):
    m = build_arch("unet2d")
    m.denoiser.save_pretrained(tmp_path / "flat")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "flat")
    flat = load_model(ModelConfig(source="local", path=str(tmp_path / "flat")))
    assert flat.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert torch.equal(flat.scheduler.betas, DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas)
    m.denoiser.save_pretrained(tmp_path / "bare")
    DDPMScheduler(beta_schedule="scaled_linear").save_pretrained(tmp_path / "sched")
    named = load_model(ModelConfig(source="local", path=str(tmp_path / "bare"), scheduler=str(tmp_path / "sched")))
    assert torch.equal(named.scheduler.betas, DDPMScheduler(beta_schedule="scaled_linear").betas)
    with pytest.raises(DQError, match="model.scheduler=.* holds no scheduler_config.json"):
        load_model(ModelConfig(source="local", path=str(tmp_path / "bare"), scheduler=str(tmp_path)))


def test_unknown_pipeline_component_class_is_one_line(tmp_path):
    _save_text_to_image_pipeline(tmp_path / "sd")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "GPT2Model"]
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DQError, match=r"text_encoder is \['transformers', 'GPT2Model'\].*supported: .*CLIPTextModel"):
        load_model(ModelConfig(source="local", path=str(tmp_path / "sd")))


@pytest.mark.e2e
def test_folder_without_scheduler_exits_2_with_one_line(tmp_path):
    build_arch("unet2d").denoiser.save_pretrained(tmp_path / "bare")
    proc = _train(tmp_path, "model=local", f"model.path={tmp_path / 'bare'}", expect=2)
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: no noise scheduler in") and "model.scheduler=" in proc.stderr


def test_gpu_smoke_skips_cleanly_without_cuda():
    proc = subprocess.run([sys.executable, "scripts/gpu_smoke.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "no CUDA: skipped", proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(name, tmp_path):
    cfg = make_cfg(tmp_path, "train", [f"experiment={name}"])
    if name in STAND_INS:  # the real model / reference are the user's to give: the run must say so
        cfg = make_cfg(tmp_path, "train", [f"experiment={name}", f"model={STAND_INS[name]}", *SMALL])
    check(cfg)


def test_paper_presets_hold_the_paper_settings(tmp_path):
    from omegaconf import OmegaConf

    cifar = make_cfg(tmp_path, "train", ["experiment=ddpm_cifar10"])
    assert (cifar.sampler.steps, cifar.task.num_samples, cifar.metrics.backend) == (100, 50000, "inception")
    assert OmegaConf.is_missing(cifar, "reference") and cifar.metrics._get_node("reference")._value() == "${reference}"
    bedroom = make_cfg(tmp_path, "train", ["experiment=ldm_bedroom"])
    assert (bedroom.sampler.steps, bedroom.sampler.eta) == (200, 1.0) and OmegaConf.is_missing(bedroom, "reference")
    sd = make_cfg(tmp_path, "train", ["experiment=sd15"])
    assert (sd.sampler.steps, sd.calib.guidance_scale, sd.task.guidance_scale) == (50, 7.5, 7.5)


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_preset_runs_with_its_tiny_stand_in(name, tmp_path):
    from dq.tasks.quantize import run

    cfg = make_cfg(tmp_path, "train", [f"experiment={name}", f"model={STAND_INS[name]}", *SMALL])
    run(cfg)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["bits"] == "W4A4" and [r["name"] for r in res["rows"]] == ["fp", "student"]
    assert (tmp_path / "samples_student.png").is_file()


# ----------------------------------------------------------------------------------- end to end, CLI
@pytest.mark.e2e
def test_text_to_image_pipeline_folder_end_to_end(tmp_path):
    pipe = _save_text_to_image_pipeline(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _train(tmp_path, "model=local", f"model.path={tmp_path / 'sd'}", f"data.prompts={tmp_path / 'prompts.txt'}",
           "calib.guidance_scale=3.0")
    cs = _calibration_set(tmp_path)
    enc, empty = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    # every recorded input carries its own image's prompt encoding, or the empty prompt's (the CFG pair)
    cond = cs["cond_table"][cs["cond_index"]]
    is_cond = torch.tensor([torch.equal(c, enc[int(i) % 3]) for c, i in zip(cond, cs["image"])])
    is_uncond = torch.tensor([torch.equal(c, empty[0]) for c in cond])
    assert bool((is_cond | is_uncond).all()) and is_cond.any() and is_uncond.any()
    assert len(cs["cond_table"]) == 4  # stored once per distinct encoding: 3 prompts + the empty prompt
    assert cs["x"].shape[1:] == (4, 8, 8) and cs["key"]["guidance_scale"] == 3.0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["model"] == str(tmp_path / "sd") and res["bits"] == "W4A4"
    assert any("3 prompts" in n and "CLIPTextModel" in n for n in res["notes"]), res["notes"]
    student = next(r for r in res["rows"] if r["name"] == "student")  # scored against the FP teacher
    assert student["fid_to_fp"] >= 0 and 0 < student["psnr_to_fp"] <= 100 and -1 <= student["ssim_to_fp"] <= 1
    assert "fid_to_fp" in res["metrics"], res["metrics"]
    losses = res["train"]["last_block_losses"]  # BKD trained every block on these inputs
    assert len(losses) == 7 and all(0 < v < 10 for v in losses.values()), losses
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "samples_student.png")
    assert grid.mode == "RGB"  # decoded 3-channel images, not 4-channel latents
    # eval.py of the saved student re-attaches the teacher's VAE, text encoder and tokenizer and samples with the
    # guidance the student was distilled under (no task.guidance_scale given): the same images
    proc = subprocess.run([sys.executable, "eval.py", f"ckpt_path={tmp_path / 'run' / 'student.safetensors'}",
                           "debug=tiny", "metrics=digits", "logger=none",
                           f"data.prompts={tmp_path / 'prompts.txt'}", f"hydra.run.dir={tmp_path / 'eval'}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                            "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    import numpy as np

    again = Image.open(tmp_path / "eval" / "samples_student.png")
    assert np.array_equal(np.asarray(again), np.asarray(grid))
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["guidance_scale"] == 3.0


@pytest.mark.e2e
def test_class_conditional_unet_folder_end_to_end(tmp_path):
    m = build_arch("unet2d_class", seed=1)
    m.denoiser.save_pretrained(tmp_path / "cin")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "cin")
    _train(tmp_path, "model=local", f"model.path={tmp_path / 'cin'}")
    cs = _calibration_set(tmp_path)
    labels, _ = cond_fn_for(load_model(ModelConfig(source="local", path=str(tmp_path / "cin"))),
                            cs["key"]["seed"])(cs["image"])
    assert cs["cond_index"] is None and cs["cond_table"].dtype == torch.long and torch.equal(cs["cond_table"], labels)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["rows"][-1]["name"] == "student" and any("class labels 0..9" in n for n in res["notes"])
    assert res["rows"][-1]["fid_to_fp"] >= 0 and 0 < res["rows"][-1]["psnr_to_fp"] <= 100
    # guidance needs a null class, which a UNet2DModel does not define
    proc = _train(tmp_path, "model=local", f"model.path={tmp_path / 'cin'}", "calib.guidance_scale=2.0", expect=2)
    assert "defines no null class" in proc.stderr
