"""Every method config composes and runs a tiny job through the one quantize code path."""
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from dq.quant.quantizers import TemporalActQuantizer

METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
TINY = ["model=tiny_unet", "sampler.steps=4", "calib.n_samples=32", "calib.n_trajectories=8",
        "distill.steps_per_block=1", "task.num_samples=8", "task.floor=false"]


def test_all_methods_are_listed():
    assert {"fp", "ptq", "lsq_qat", "smoothquant_bkd", "dilatequant", "dilatequant_no_wd", "dilatequant_no_tpq",
            "dilatequant_no_bkd"} <= set(METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_a_tiny_job(method, cfg_factory, tmp_path):
    from dq.models.student import load_student
    from dq.tasks.quantize import run

    cfg = cfg_factory(*TINY, f"method={method}")
    if method == "lsq_qat":
        cfg.distill.steps_per_block = 3
    summary = run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"]["name"] == method
    if not cfg.method.quantize:
        assert summary["bits"] == "FP" and not (tmp_path / "student.pt").exists()
        return
    assert summary["bits"] == "W4A4" and torch.isfinite(torch.tensor(summary["student/fid"]))
    expected_steps = 0 if not cfg.method.bkd else (3 if method == "lsq_qat" else 9)
    assert results["train"]["steps"] == expected_steps
    student, _ = load_student(tmp_path / "student.pt")
    tables = [q.delta.shape[0] for q in student.unet.modules() if isinstance(q, TemporalActQuantizer)]
    assert set(tables) == ({1} if cfg.method.shared_tables else {4})
    # a scaling method reports one row per scaled layer group; "none" scales nothing
    assert bool(results["weight_dilation"]) == (cfg.method.scaling != "none")
