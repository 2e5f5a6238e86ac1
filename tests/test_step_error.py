"""scripts/step_error.py: the error decomposition and the trajectory bookkeeping, on tiny inputs."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from step_error import Moments, RelErr, measure, parse_students  # noqa: E402

from dq.errors import DQError  # noqa: E402
from dq.models.load import build_arch  # noqa: E402
from dq.models.sampling import SamplerConfig  # noqa: E402


def test_decomposition_recovers_bias_and_scale_and_shares_sum_to_one():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(64, 2, 8, 8, generator=g)
    bias = torch.tensor([0.3, -0.1]).view(1, 2, 1, 1)
    rest = 0.05 * torch.randn(eps.shape, generator=g)
    e = bias + 0.2 * eps + rest
    m = Moments(2)
    for part in range(0, 64, 16):  # batches pooled = one batch
        m.add(e[part:part + 16], eps[part:part + 16])
    r = m.result()
    assert r["scale_k"] == pytest.approx(0.2, abs=5e-3)
    assert r["bias_per_channel"] == pytest.approx([0.3, -0.1], abs=5e-3)
    assert r["bias_share"] + r["scale_share"] + r["rest_share"] == pytest.approx(1.0, abs=1e-9)
    assert r["bias_share"] == pytest.approx(float((bias.expand_as(e) ** 2).sum() / (e ** 2).sum()), rel=0.05)
    assert r["local_rel_mse"] == pytest.approx(float((e ** 2).sum() / (eps ** 2).sum()), rel=1e-6)
    rel = RelErr()
    rel.add(eps + e, eps)
    assert rel.value == pytest.approx(r["local_rel_mse"], rel=1e-6)


def test_identical_student_has_zero_error_and_perturbed_one_does_not():
    torch.set_num_threads(1)
    teacher = build_arch("unet2d", seed=0)
    noisy = copy.deepcopy(teacher.denoiser)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    res = measure(teacher, {"same": copy.deepcopy(teacher.denoiser), "noisy": noisy},
                  SamplerConfig(name="ddim", steps=3), n=5, seed=0, batch_size=3)
    assert len(res["timesteps"]) == 3
    same, other = res["students"]["same"], res["students"]["noisy"]
    assert all(r["local_rel_mse"] == 0 and r["acc_rel_err"] == 0 for r in same["steps"]) and same["x0_rel_err"] == 0
    assert all(r["local_rel_mse"] > 0 and r["acc_rel_err"] > 0 for r in other["steps"])
    assert other["steps"][-1]["acc_rel_err"] == pytest.approx(other["x0_rel_err"])


def test_bad_student_argument_is_one_line_error():
    with pytest.raises(DQError, match="NAME=path"):
        parse_students(["just/a/path.safetensors"])
    with pytest.raises(DQError, match="twice"):
        parse_students(["a=x", "a=y"])
