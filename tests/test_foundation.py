"""The foundation: embedded data, teacher, feature network, evaluation task, CLI errors."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from dq.data.digits import DigitsDataModule, load_digits_tensors, split_indices
from dq.errors import DQError
from dq.metrics.features import DigitsClassifier
from dq.models.load import EMBEDDED_TEACHER, REFERENCE_FILE, load_teacher


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
    teacher = load_teacher(cfg_factory().model)
    ref = load_file(str(EMBEDDED_TEACHER / REFERENCE_FILE))
    with torch.no_grad():
        out = teacher.unet(ref["x"], ref["t"]).sample
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)
    assert len(teacher.unet.down_blocks) >= 3
    assert any("Attn" in type(b).__name__ for b in teacher.unet.down_blocks)
    assert not any(p.requires_grad for p in teacher.unet.parameters())


def test_offline_hub_id_fails_fast_with_a_hint(cfg_factory):
    with pytest.raises(DQError, match="model=local model.path="):
        load_teacher(cfg_factory("model=hub", "model.id=google/ddpm-cifar10-32").model)


def test_missing_local_folder_and_unknown_source(cfg_factory, tmp_path):
    with pytest.raises(DQError, match="does not exist"):
        load_teacher(cfg_factory("model=local", f"model.path={tmp_path / 'nope'}").model)
    with pytest.raises(DQError, match="valid choices: embedded, local, hub, tiny"):
        load_teacher(cfg_factory("model.source=nope").model)


def test_local_folder_round_trip(tmp_path, cfg_factory):
    teacher = load_teacher(cfg_factory("model=tiny_unet").model)
    teacher.unet.save_pretrained(tmp_path / "m" / "unet")
    teacher.scheduler.save_pretrained(tmp_path / "m" / "scheduler")
    again = load_teacher(cfg_factory("model=local", f"model.path={tmp_path / 'm'}").model)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(again.unet(x, t).sample, teacher.unet(x, t).sample)


def test_feature_network_heldout_accuracy():
    net = DigitsClassifier.load()
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.heldout_set.tensors
    acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.97, acc


def test_tiny_pretrain_fast_dev_run(cfg_factory):
    from dq.tasks.pretrain import run

    out = run(cfg_factory("task=pretrain", "trainer.fast_dev_run=true"))
    assert torch.isfinite(torch.tensor(out["loss"]))


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("override,expect", [
    ("model=nope", "nope"),
    ("model=local model.path=/does/not/exist", "/does/not/exist"),
    ("task.num_samples=0", "task.num_samples=0"),
    ("sampler.name=plms", "valid choices: ddim, dpmsolver"),
])
def test_cli_bad_input_is_a_short_error(override, expect, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *override.split(), "logger=none",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 20  # hydra's own message lists the options
