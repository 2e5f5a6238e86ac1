"""Block-wise distillation: curriculum, learning, resume, checkpoints, DDP, sweeps, bad input."""
import copy
import dataclasses
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from dq.distill.callbacks import PeriodicCheckpoint

from conftest import ROOT
from dq.config import typed
from dq.data.calibration import CalibConfig, CalibrationDataModule, generate, load_or_generate
from dq.distill.bkd import BlockDistiller, DistillConfig
from dq.errors import DQError
from dq.models.checkpoint import load_student, read_meta, save_student
from dq.models.load import build_arch, load_model
from dq.models.sampling import SamplerConfig, sampler_timesteps
from dq.models.student import calibrate, prepare, weight_dilation
from dq.quant.config import QuantConfig

SAMPLER = SamplerConfig(name="ddim", steps=5, eta=0.0)
CALIB = CalibConfig(n_samples=64, n_trajectories=16, batch_size=16, guidance_scale=1.0, seed=0)


def build_student(denoiser, qcfg, batches):
    """prepare → Weight Dilation → min–max activation tables (what the tests distil from)."""
    prepare(denoiser, qcfg)
    weight_dilation(denoiser)
    calibrate(denoiser, batches, "minmax")
    return denoiser


def tiny_setup(tmp_path, arch="unet2d", bits=4):
    teacher = build_arch(arch)
    calib = load_or_generate(teacher, SAMPLER, CALIB, tmp_path / "cache")
    qcfg = QuantConfig(w_bits=bits, a_bits=bits, timesteps=tuple(sampler_timesteps(teacher, SAMPLER)))
    student = build_student(copy.deepcopy(teacher.denoiser), qcfg, calib.batches(64))
    return teacher, calib, qcfg, student


def resampler(teacher):
    """What dq.tasks.quantize passes: the calibration set's x_t on a student's own trajectories."""
    return lambda s: generate(dataclasses.replace(teacher, denoiser=s), SAMPLER, CALIB).x


def fit(student, teacher, calib, cfg, max_steps=None, ckpt_dir=None, ckpt_path=None, callbacks=()):
    student.train().requires_grad_(True)  # parameters that do not require grad are not trained
    module = BlockDistiller(student, teacher.denoiser, cfg, resample=resampler(teacher))
    dm = CalibrationDataModule(calib, 8, module.total_steps, seed=0)
    cbs = list(callbacks)
    if ckpt_dir is not None:
        cbs.append(PeriodicCheckpoint(ckpt_dir, every=1))
    trainer = L.Trainer(max_steps=max_steps or module.total_steps, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=cbs,
                        enable_checkpointing=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def test_curriculum_covers_every_block_once_in_order():
    module = BlockDistiller(build_arch("unet2d").denoiser, build_arch("unet2d").denoiser,
                            DistillConfig(steps_per_block=3))
    seq = [module.block_index(s) for s in range(module.total_steps)]
    n = len(module.student_blocks)
    assert seq == [k for k in range(n) for _ in range(3)]
    assert [module.block_name(s) for s in (0, 2, 3)] == ["stem", "stem", "down.0"]
    assert module.block_position(4) == (1, n, 1) and module.block_position(3 * n - 1) == (n - 1, n, 2)
    assert [s for s in range(module.total_steps + 1) if module.block_ends_at(s)] == [3 * (k + 1) for k in range(n)]
    sub = BlockDistiller(build_arch("unet2d").denoiser, build_arch("unet2d").denoiser,
                         DistillConfig(steps_per_block=2, blocks=["up.1", "stem"]))
    assert [sub.block_name(s) for s in range(sub.total_steps)] == ["stem", "stem", "up.1", "up.1"]
    assert sub.block_position(2) == (1, 2, 0)


def test_model_stage_follows_the_blocks_with_its_own_length_and_cosine():
    module = BlockDistiller(build_arch("unet2d").denoiser, build_arch("unet2d").denoiser,
                            DistillConfig(steps_per_block=2, blocks=["stem", "up.1"], model_steps=4))
    assert module.total_steps == 2 * 2 + 4
    assert [module.block_name(s) for s in range(module.total_steps)] == ["stem"] * 2 + ["up.1"] * 2 + ["model"] * 4
    assert module.block_index(7) == module.MODEL == len(module.student_blocks)
    assert module.block_position(5) == (2, 3, 1) and module.stage_length(5) == 4 and module.stage_length(1) == 2
    assert [s for s in range(module.total_steps + 1) if module.block_ends_at(s)] == [2, 4, 8]
    # cosine restarts at each stage and spans the stage's own length
    assert [round(module.lr_factor(s), 6) for s in (4, 5, 6, 7)] == [1.0, round(0.5 * (1 + 2 ** -0.5), 6), 0.5,
                                                                     round(0.5 * (1 - 2 ** -0.5), 6)]
    assert module.lr_factor(2) == 1.0 and module.lr_factor(3) == 0.5


def test_model_stage_loss_is_the_output_mse_and_trains_every_block(tmp_path):
    teacher, calib, qcfg, student = tiny_setup(tmp_path)
    cfg = DistillConfig(steps_per_block=1, blocks=["mid"], model_steps=3)
    module = fit(student, teacher, calib, cfg)
    batch = calib.batch(torch.arange(8))
    with torch.no_grad():
        expect = torch.nn.functional.mse_loss(module.family.forward(student, batch["x"], batch["t"]),
                                              module.family.forward(teacher.denoiser, batch["x"], batch["t"]))
        assert torch.allclose(module.block_loss(batch, module.MODEL), expect, rtol=1e-5, atol=0)
    state = module.optimizers().optimizer.state  # the model stage's Adam moments cover every block
    trained = {id(p) for p in state}
    for k, b in enumerate(module.student_blocks):
        assert trained & {id(p) for p in b.parameters()}, b.name


def test_model_stage_on_student_trajectories_keeps_the_calibration_picks(tmp_path):
    teacher, calib, qcfg, student = tiny_setup(tmp_path)
    cfg = DistillConfig(steps_per_block=1, blocks=["mid"], model_steps=2, model_trajectory="student")
    module = fit(student, teacher, calib, cfg)
    x = module.trajectory_x
    assert x.shape == calib.x.shape
    first = calib.t == max(calib.timesteps)  # every trajectory starts from the same noise
    assert first.any() and torch.equal(x[first], calib.x[first])
    later = calib.t == min(calib.timesteps)  # the quantized student ends elsewhere than the teacher
    assert not torch.allclose(x[later], calib.x[later], atol=1e-3)
    with pytest.raises(DQError, match="model_trajectory=student needs the run's sampler"):
        BlockDistiller(student, teacher.denoiser, cfg)


def test_bad_distill_config():
    with pytest.raises(DQError, match="distill.input"):
        DistillConfig(input="oracle")
    with pytest.raises(DQError, match=r"distill.model_trajectory.*'own'.*teacher, student"):
        DistillConfig(model_trajectory="own")
    with pytest.raises(DQError, match=r"distill.model_steps=-1 must be >= 0"):
        DistillConfig(model_steps=-1)
    with pytest.raises(DQError, match=r"distill.model_steps=5 .*granularity=model already trains the whole model"):
        DistillConfig(model_steps=5, granularity="model")


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append((module.block_index(trainer.global_step - 1), float(outputs["loss"])))


class BlockLossProbe(L.Callback):
    """Each block's distillation loss on one fixed batch, when its training starts and when it ends."""

    def __init__(self, batch):
        self.batch, self.before, self.after = batch, {}, {}

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = trainer.global_step
        if step % module.cfg.steps_per_block == 0:
            self.before[module.block_index(step)] = float(module.block_loss(self.batch, module.block_index(step)))

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if module.block_ends_at(step):
            self.after[module.block_index(step - 1)] = float(module.block_loss(self.batch, module.block_index(step - 1)))


@pytest.mark.e2e
def test_each_block_loss_decreases_on_the_embedded_teacher(tmp_path, cfg_factory):
    # Measured on the same inputs (the whole calibration set) before and after the block trains: the
    # per-step losses are of different random batches, too noisy to compare (the mid block's 6-step
    # averages moved by 0.3 % either way).
    teacher = load_model(typed(cfg_factory(), "model"))
    calib = load_or_generate(teacher, SAMPLER, CALIB, tmp_path / "cache")
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=tuple(sampler_timesteps(teacher, SAMPLER)))
    student = build_student(copy.deepcopy(teacher.denoiser), qcfg, calib.batches(64))
    probe = BlockLossProbe(calib.batch(torch.arange(len(calib))))
    fit(student, teacher, calib, DistillConfig(steps_per_block=24, lr_weights=1e-4, lr_act=1e-3),
        callbacks=[probe])
    assert sorted(probe.before) == sorted(probe.after) == list(range(9))
    for k in probe.before:
        assert probe.after[k] < probe.before[k], (k, probe.before[k], probe.after[k])


@pytest.mark.e2e
def test_resume_mid_curriculum_gives_the_same_student(tmp_path):
    cfg = DistillConfig(steps_per_block=2, blocks=["down.0", "mid", "up.1"], model_steps=3, model_trajectory="student")
    teacher, calib, qcfg, student = tiny_setup(tmp_path)
    s_full, s_part = copy.deepcopy(student), copy.deepcopy(student)
    fit(s_full, teacher, calib, cfg)
    fit(s_part, teacher, calib, cfg, max_steps=7, ckpt_dir=tmp_path / "ck")  # stops inside the model stage
    s_resumed = copy.deepcopy(student)  # a fresh process would rebuild this from config
    fit(s_resumed, teacher, calib, cfg, ckpt_dir=tmp_path / "ck2", ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    full, resumed, part = s_full.state_dict(), s_resumed.state_dict(), s_part.state_dict()
    assert any(not torch.equal(full[k], part[k]) for k in full)  # the interrupted run really was behind
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_optimizer_holds_state_only_for_the_block_in_training(tmp_path):
    teacher, calib, qcfg, student = tiny_setup(tmp_path)
    module = fit(student, teacher, calib, DistillConfig(steps_per_block=2, blocks=["down.1", "mid", "up.1"]))
    state = module.optimizers().optimizer.state
    last = {id(p) for p in module.student_blocks[module.schedule[-1]].parameters()}
    assert module.block_name(module.total_steps - 1) == "up.1"
    assert state and {id(p) for p in state} <= last  # earlier blocks' Adam moments were dropped
    assert len(last) < sum(1 for _ in student.parameters())


def test_teacher_is_not_in_the_checkpoint_and_student_reloads(tmp_path):
    teacher, calib, qcfg, student = tiny_setup(tmp_path)
    module = fit(student, teacher, calib, DistillConfig(steps_per_block=1, blocks=["down.1", "up.1"]),
                 ckpt_dir=tmp_path / "ck")
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert all(k.startswith("student.") for k in ckpt["state_dict"])
    assert not any(p.requires_grad for p in module.teacher.parameters())
    student.eval()
    path = save_student(tmp_path / "student.safetensors", student, teacher, qcfg,
                        {"sampler": dataclasses.asdict(SAMPLER), "method": {"name": "test"}})
    again, meta = load_student(path)
    assert meta["quant"]["w_bits"] == 4 and meta["sampler"]["steps"] == 5 and meta["method"] == {"name": "test"}
    assert read_meta(path) == meta and again.scheduler.config.num_train_timesteps == 1000
    x, t = calib.x[:6], calib.t[:6]
    with torch.no_grad():
        assert torch.equal(again.denoiser(x, t).sample, student(x, t).sample)


def test_missing_truncated_or_foreign_student_checkpoint(tmp_path):
    with pytest.raises(DQError, match="does not exist"):
        load_student("/nope/student.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DQError, match="not a readable safetensors file"):
        load_student(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(DQError, match="not a dq student checkpoint"):
        load_student(tmp_path / "foreign.safetensors")


def test_calibration_cache_reused_and_foreign_cache_refused(tmp_path, caplog):
    teacher = build_arch("unet2d")
    a = load_or_generate(teacher, SAMPLER, CALIB, tmp_path)
    files = list(tmp_path.glob("calib-*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = load_or_generate(teacher, SAMPLER, CALIB, tmp_path)
    assert torch.equal(a.x, b.x) and files[0].stat().st_mtime_ns == mtime
    assert set(a.row.tolist()) == set(range(5))  # stratified: every step has samples
    assert torch.equal(torch.tensor(a.timesteps)[a.row], a.t)
    other = dataclasses.replace(CALIB, seed=1, path=str(files[0]))
    with pytest.raises(DQError, match="made for another configuration.*seed"):
        load_or_generate(teacher, SAMPLER, other, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime  # nothing already written is lost
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated (a crash, a full disk): rebuilt, not fatal
    with caplog.at_level("WARNING", logger="dq"):
        c = load_or_generate(teacher, SAMPLER, CALIB, tmp_path)
    assert "unreadable" in caplog.text and torch.equal(c.x, a.x) and torch.equal(c.t, a.t)
    assert load_or_generate(teacher, SAMPLER, CALIB, tmp_path).x.shape == a.x.shape  # the rebuilt file reads


@pytest.mark.e2e
def test_conditional_unet_calibrates_and_distils(tmp_path):
    teacher, calib, qcfg, student = tiny_setup(tmp_path, arch="unet2d_cond")
    assert calib.cond is not None and calib.cond.shape[0] == len(calib)
    batch = calib.batch(torch.arange(3))
    assert {"x", "t", "cond"} <= set(batch) and "row" not in batch  # a sample's row follows from its t
    rec = LossRecorder()
    fit(student, teacher, calib, DistillConfig(steps_per_block=2), callbacks=[rec])
    assert len(rec.losses) == 2 * 7 and all(torch.isfinite(torch.tensor(l)) for _, l in rec.losses)


def run_cli(args, tmp_path, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


TINY_JOB = ["model=tiny_unet", "sampler.steps=4", "calib.n_samples=32", "calib.n_trajectories=8",
            "distill.steps_per_block=1", "task.num_samples=8", "task.floor=false"]


@pytest.mark.e2e
def test_ddp_two_cpu_processes_end_with_identical_students(tmp_path):
    proc = run_cli([*TINY_JOB, "trainer=ddp", "logger=none", f"hydra.run.dir={tmp_path}",
                    f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((tmp_path / "results.json").read_text())["train"]
    assert train["world_size"] == 2 and train["ranks_identical"] is True


@pytest.mark.e2e
def test_multirun_two_jobs_one_group_and_a_failure_does_not_stop_the_sweep(tmp_path):
    proc = run_cli(["-m", *TINY_JOB, "quant=w4a4,w8a8", "quant.w_bits=99,4", f"hydra.sweep.dir={tmp_path}",
                    f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert sorted(r["bits"] for r in results) == ["W4A4", "W4A8"]  # the two w_bits=99 jobs failed, the rest ran
    assert len({r["wandb_group"] for r in results}) == 1 and results[0]["wandb_group"]
    assert "w_bits=99" in proc.stderr or "w_bits=99" in proc.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("override,expect", [
    ("quant.w_bits=9", "w_bits=9"),
    ("distill.blocks=[down.7]", "unknown block name 'down.7'; valid choices: stem"),
    ("task.resume=/nope/last.ckpt", "task.resume='/nope/last.ckpt' does not exist"),
    ("method.calib_method=magic", "unknown method.calib_method 'magic'; valid choices: minmax, percentile, mse"),
    ("method.scaling=wd", "method.scaling is not a known setting"),  # replaced by method.weight_dilation
])
def test_quantize_bad_input_is_one_line(override, expect, tmp_path):
    proc = run_cli([*TINY_JOB, override, "logger=none", f"hydra.run.dir={tmp_path}"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]


def test_non_finite_loss_names_block_and_step(tmp_path):
    teacher, calib, qcfg, student = tiny_setup(tmp_path)
    with torch.no_grad():
        student.down_blocks[1].resnets[0].conv1.weight.fill_(float("nan"))
    with pytest.raises(DQError, match=r"non-finite distillation loss .* in block 'down.1' at step 2"):
        fit(student, teacher, calib, DistillConfig(steps_per_block=1))
