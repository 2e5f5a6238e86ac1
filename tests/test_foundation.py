"""The foundation: embedded data, teacher, feature network, evaluation task, CLI errors."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from dq.config import typed
from dq.data.digits import DigitsDataModule, load_digits_tensors, split_indices
from dq.errors import DQError
from dq.metrics.features import DigitsClassifier
from dq.models.load import EMBEDDED_TEACHER, REFERENCE_FILE, ModelConfig, load_model


def load_teacher(cfg):
    """The model of a composed config's ``model`` group."""
    return load_model(typed(cfg, "model"))


def test_digits_shapes_range_and_split_determinism():
    x, y = load_digits_tensors(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert set(y.tolist()) == set(range(10))
    a = DigitsDataModule(heldout_fraction=0.2, split_seed=0)
    b = DigitsDataModule(heldout_fraction=0.2, split_seed=0)
    assert torch.equal(a.heldout_images, b.heldout_images)
    tr, ho = split_indices(1797, 0.2, 0)
    assert len(ho) == 359 and len(tr) + len(ho) == 1797
    assert not set(tr.tolist()) & set(ho.tolist())
    _, ho_other = split_indices(1797, 0.2, 1)
    assert not torch.equal(ho, ho_other)
    batch = next(iter(a.train_dataloader()))
    assert batch[0].shape == (64, 1, 16, 16) and batch[1].dtype == torch.long


def test_bad_split_fraction():
    with pytest.raises(ValueError, match="heldout_fraction=1.5"):
        split_indices(10, 1.5, 0)


def test_shipped_teacher_reproduces_its_saved_output(cfg_factory):
    teacher = load_teacher(cfg_factory())
    ref = load_file(str(EMBEDDED_TEACHER / REFERENCE_FILE))
    with torch.no_grad():
        out = teacher.denoiser(ref["x"], ref["t"]).sample
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    assert len(teacher.denoiser.down_blocks) >= 3
    assert any("Attn" in type(b).__name__ for b in teacher.denoiser.down_blocks)
    assert not any(p.requires_grad for p in teacher.denoiser.parameters())
    assert teacher.sample_shape == (1, 16, 16) and not teacher.conditional


def test_offline_hub_id_fails_fast_with_a_hint(cfg_factory):
    with pytest.raises(DQError, match="model=local model.path="):
        load_teacher(cfg_factory("model=hub", "model.id=google/ddpm-cifar10-32"))


def test_missing_local_folder_and_unknown_source(cfg_factory, tmp_path):
    with pytest.raises(DQError, match="does not exist"):
        load_teacher(cfg_factory("model=local", f"model.path={tmp_path / 'nope'}"))
    with pytest.raises(DQError, match="valid choices: embedded, local, hub, tiny"):
        load_model(ModelConfig(source="nope"))


def test_local_folder_round_trip(tmp_path, cfg_factory):
    teacher = load_teacher(cfg_factory("model=tiny_unet"))
    teacher.denoiser.save_pretrained(tmp_path / "m" / "unet")
    teacher.scheduler.save_pretrained(tmp_path / "m" / "scheduler")
    again = load_teacher(cfg_factory("model=local", f"model.path={tmp_path / 'm'}"))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(again.denoiser(x, t).sample, teacher.denoiser(x, t).sample)
    # a folder without a noise schedule is refused (no silent default)
    teacher.denoiser.save_pretrained(tmp_path / "bare")
    with pytest.raises(DQError, match="no noise scheduler"):
        load_model(ModelConfig(source="local", path=str(tmp_path / "bare")))


def test_feature_network_heldout_accuracy():
    net = DigitsClassifier.load()
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.heldout_set.tensors
    acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.97, acc


@pytest.mark.e2e
def test_tiny_pretrain_exports_a_teacher_that_reloads_and_reproduces_its_reference(cfg_factory, tmp_path):
    """Two optimisation steps of the real pretrain task (no evaluation), exported: the folder must load
    as a model, give the output recorded in its reference_io at save time, and hold trained (EMA)
    weights, not the random init."""
    import json

    from dq.models.load import build_arch
    from dq.tasks.pretrain import run

    export = tmp_path / "exported"
    run(cfg_factory("task=pretrain", "task.steps=2", "task.batch_size=8", "task.evaluate=false",
                    f"task.export_to={export}"))
    model = load_model(ModelConfig(source="local", path=str(export)))
    ref = load_file(str(export / REFERENCE_FILE))
    with torch.no_grad():
        out = model.family.forward(model.denoiser, ref["x"], ref["t"])
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    assert model.scheduler.config.num_train_timesteps == 1000
    init = build_arch("digits").denoiser.state_dict()
    trained = model.denoiser.state_dict()
    assert init.keys() == trained.keys()
    assert any(not torch.equal(init[k], trained[k]) for k in init)  # the EMA moved off the random init
    info = json.loads((export / "training.json").read_text())
    assert info["steps"] == 2 and "metrics" not in info and (export / "README.md").is_file()


@pytest.mark.e2e
def test_evaluate_task_writes_results_and_grid(cfg_factory, tmp_path):
    import json

    from dq.tasks.evaluate import run

    summary = run(cfg_factory("task=evaluate", "model=tiny_unet", "task.num_samples=20", "sampler.steps=3"))
    results = json.loads((tmp_path / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == ["real held-out vs train (floor)", "fp"]
    assert (tmp_path / "samples_fp.png").is_file()
    # A random UNet produces noise: far worse than real digits against real digits.
    assert summary["fp/fid"] > 5 * summary["real/fid"]


@pytest.mark.e2e
@pytest.mark.parametrize("override,expect", [
    ("model=nope", "nope"),
    ("model=local model.path=/does/not/exist", "/does/not/exist"),
    ("task.num_samples=0", "task.num_samples=0"),
    ("sampler.name=plms", "valid choices: ddim, dpmsolver"),
])
def test_cli_bad_input_is_a_short_error(override, expect, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *override.split(), "logger=none",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 20  # hydra's own message lists the options
