"""Bad input and faults as a new user meets them: one-line errors (exit 2) or the correct recovery."""
import copy
import json
import pickle
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch

from conftest import ROOT
from dq.data.calibration import CalibConfig, cache_path, calibration_key, load_or_generate
from dq.distill.bkd import DistillConfig
from dq.distill.fit import FitRun, fit
from dq.errors import DQError
from dq.models.checkpoint import load_student, read_meta
from dq.models.load import build_arch
from dq.models.sampling import SamplerConfig, sampler_timesteps
from dq.models.student import calibrate, prepare
from dq.quant.config import QuantConfig

SAMPLER = SamplerConfig(steps=4)
CALIB = CalibConfig(n_samples=64, n_trajectories=16, batch_size=16, act_init_samples=64)


def run_main(cfg, capsys):
    from dq.tasks.common import main
    with pytest.raises(SystemExit) as e:
        main(cfg)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"\x80\x04\x95truncated"])
def test_eval_of_a_broken_checkpoint_is_one_line(content, tmp_path, cfg_factory, capsys):
    bad = tmp_path / "student.safetensors"
    bad.write_bytes(content)
    code, err = run_main(cfg_factory(f"ckpt_path={bad}", config_name="eval"), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], err


def test_loading_a_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "student.pt"
    path.write_bytes(pickle.dumps({"format": "dq-student-v2", "x": Evil()}))
    with pytest.raises(DQError, match="not a readable safetensors file"):
        load_student(path)
    with pytest.raises(DQError):
        read_meta(path)
    assert not marker.exists()


def test_truncated_calibration_cache_is_reported_and_rebuilt(tmp_path, caplog):
    teacher = build_arch("unet2d")
    first = load_or_generate(teacher, SAMPLER, CALIB, tmp_path)
    path = cache_path(tmp_path, calibration_key(teacher, SAMPLER, CALIB))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="dq"):
        again = load_or_generate(teacher, SAMPLER, CALIB, tmp_path)
    assert [r.message for r in caplog.records if "unreadable" in r.message and "rebuilding" in r.message]
    assert torch.equal(again.x, first.x) and torch.equal(again.t, first.t)
    assert torch.load(path, weights_only=True)["key"] == first.key  # the rebuilt file is whole


def test_truncated_reference_cache_is_rebuilt(tmp_path, caplog):
    from dq.data.digits import DataConfig
    from dq.metrics.features import build_backend
    from dq.metrics.reference import reference_features, reference_key, reference_path

    backend, data = build_backend("digits"), DataConfig()
    ref = reference_features(backend, data, "heldout", tmp_path)
    path = reference_path(tmp_path, reference_key(backend, data, "heldout"))
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="dq"):
        again = reference_features(backend, data, "heldout", tmp_path)
    assert any("unreadable" in r.message for r in caplog.records)
    assert torch.equal(again.features, ref.features)


@pytest.mark.e2e
def test_two_runs_sharing_one_empty_cache_both_finish(tmp_path):
    code = ("import sys; sys.path.insert(0, {root!r}); from pathlib import Path; "
            "from dq.models.load import build_arch; from dq.models.sampling import SamplerConfig; "
            "from dq.data.calibration import CalibConfig, load_or_generate; "
            "cs = load_or_generate(build_arch('unet2d'), SamplerConfig(steps=4), "
            "CalibConfig(n_samples=64, n_trajectories=16), Path({cache!r})); print(len(cs))")
    cmd = [sys.executable, "-c", code.format(root=str(ROOT), cache=str(tmp_path))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["64", "64"]
    files = list(tmp_path.glob("calib-*"))
    assert len(files) == 1 and files[0].suffix == ".pt"  # one whole file, no temporary left behind


class Interrupt(L.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.e2e
def test_ctrl_c_then_resume_equals_an_uninterrupted_run_without_warnings(tmp_path):
    teacher = build_arch("unet2d")
    calib = load_or_generate(teacher, SAMPLER, CALIB, tmp_path / "cache")
    student = prepare(copy.deepcopy(teacher.denoiser), QuantConfig(timesteps=tuple(sampler_timesteps(teacher, SAMPLER))))
    calibrate(student, calib.batches(64), "minmax")
    dcfg = DistillConfig(steps_per_block=2, batch_size=8, ckpt_every=100)  # checkpoints only at the end / on Ctrl-C
    trainer = dict(accelerator="cpu", enable_model_summary=False)
    full, part = copy.deepcopy(student).requires_grad_(True), copy.deepcopy(student).requires_grad_(True)
    fit(full, teacher.denoiser, calib, dcfg, FitRun(out=tmp_path / "a", trainer=trainer))
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown on Ctrl-C: callbacks run, then exit 1
        fit(part, teacher.denoiser, calib, dcfg, FitRun(out=tmp_path / "b", trainer=trainer, callbacks=[Interrupt(7)]))
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and not list(ckpt.parent.glob("*.tmp"))
    resumed = copy.deepcopy(student).requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = fit(resumed, teacher.denoiser, calib, dcfg,
                   FitRun(out=tmp_path / "b", trainer=trainer, resume=str(ckpt)))
    noisy = [str(w.message) for w in caught if "resumable" in str(w.message) or "not empty" in str(w.message)]
    assert noisy == [] and info["steps"] == 18
    a, b, p = full.state_dict(), resumed.state_dict(), part.state_dict()
    assert any(not torch.equal(a[k], p[k]) for k in a)  # the interrupted run really was behind
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.e2e
def test_console_of_a_tiny_job_has_no_third_party_noise(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "debug=tiny", "logger=wandb", f"hydra.run.dir={tmp_path}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    known = ["litlogger", "litmodels", "GPU available", "TPU available", "LeafSpec", "anonymous", "accelerate",
             "ModelCheckpoint", "not resumable", "Warning", "WARNING", "deprecated", "Traceback"]
    found = [k for k in known if k in proc.stderr or k in proc.stdout]
    assert found == [], proc.stderr
    lines = proc.stderr.splitlines() + proc.stdout.splitlines()
    assert len(lines) < 40  # one line per block / sampling batch when not a terminal
    assert json.loads((tmp_path / "results.json").read_text())["bits"] == "W4A4"


def test_a_model_setting_the_source_ignores_is_an_error():
    from dq.models.load import ModelConfig
    with pytest.raises(DQError, match="model.arch is not used with model.source=embedded"):
        ModelConfig(source="embedded", arch="unet2d")


@pytest.mark.e2e
def test_steps_never_seen_in_calibration_are_recorded_in_results(tmp_path, cfg_factory):
    from dq.tasks.quantize import run
    # the paper's table calibrates each step on its own inputs (a pooled start has no unseen steps)
    cfg = cfg_factory("debug=tiny", "method=dilatequant_table", "calib.n_samples=8", "calib.n_trajectories=8",
                      "calib.act_init_samples=2", "task.evaluate=false", "distill.steps_per_block=1")
    run(cfg)
    notes = json.loads((tmp_path / "results.json").read_text())["notes"]
    assert any("were never seen" in n for n in notes), notes
