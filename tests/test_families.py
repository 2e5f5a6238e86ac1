"""Model families: one module per family names its classes; loading reads classes and schedulers from configs."""
import json

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import ROOT
from dq.errors import DQError
from dq.models.families import family_of, model_class, supported
from dq.models.load import ModelConfig, build_arch, load_model
from dq.models.student import prepare, unprepare
from dq.quant.config import QuantConfig


def test_each_supported_class_is_named_in_exactly_one_module():
    files = [p for p in (ROOT / "dq").rglob("*.py")]
    for name in supported():
        holders = {str(p.relative_to(ROOT)) for p in files if name in p.read_text()}
        assert len(holders) == 1 and next(iter(holders)).startswith("dq/models/families/"), (name, holders)


def test_unsupported_class_error_lists_the_supported_ones():
    with pytest.raises(DQError, match="'Linear' is not supported; supported classes: DiTTransformer2DModel, "
                                 "PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel"):
        family_of(torch.nn.Linear(2, 2))
    with pytest.raises(DQError, match="supported classes"):
        model_class("FluxTransformer2DModel")


def _save_flat(tmp_path, beta_schedule="squaredcos_cap_v2", scheduler=True):
    m = build_arch("unet2d")
    m.denoiser.save_pretrained(tmp_path)
    if scheduler:
        DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule).save_pretrained(tmp_path)
    return m


def test_flat_folder_loads_its_own_scheduler_and_class_from_config(tmp_path):
    saved = _save_flat(tmp_path)
    model = load_model(ModelConfig(source="local", path=str(tmp_path)))
    assert type(model.denoiser).__name__ == json.loads((tmp_path / "config.json").read_text())["_class_name"]
    assert model.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert torch.equal(model.scheduler.betas, DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    assert torch.equal(model.family.forward(model.denoiser, x, t), saved.family.forward(saved.denoiser, x, t))


def test_folder_without_scheduler_is_a_one_line_error(tmp_path):
    _save_flat(tmp_path, scheduler=False)
    with pytest.raises(DQError, match="no noise scheduler in .*scheduler.save_pretrained"):
        load_model(ModelConfig(source="local", path=str(tmp_path)))


@pytest.mark.parametrize("arch", ["unet2d", "unet2d_cond", "dit_tiny", "pixart_tiny"])
def test_unprepare_removes_exactly_its_own_hooks(arch):
    model = build_arch(arch).denoiser
    marker = model.register_forward_pre_hook(lambda m, a: None)  # a user's hook must survive
    before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    prepare(model, QuantConfig(timesteps=(999, 500, 1)))
    assert len(model._forward_pre_hooks) == before[0] + 1 and len(model._forward_hooks) == before[1] + 1
    unprepare(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == before
    assert marker.id in model._forward_pre_hooks and not hasattr(model, "dq_step_index")
