"""Typed configs: bad values fail at compose time with one line and exit 2; every named config composes."""
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dq import cli
from dq.config import typed


def run_cli(monkeypatch, capsys, *args):
    """train.py's guard in-process: (exit code, stderr) — the entry is never reached on bad input."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    reached = []
    with pytest.raises(SystemExit) as e:
        cli.run("train", lambda: (reached.append(True), sys.exit(0)))
    return e.value.code, capsys.readouterr().err, bool(reached)


@pytest.mark.parametrize("override, expect", [
    ("quant.w_bits=three", ["quant.w_bits='three'", "2..8"]),
    ("quant.w_bits=9", ["quant.w_bits=9", "2..8"]),
    ("method=nope", ["unknown method 'nope'", "dilatequant", "efficientdm", "ptq"]),
    ("quant=w3a3", ["unknown quant 'w3a3'", "w4a4", "w8a8"]),
    ("trainer.devices=abc", ["trainer.devices='abc'", "auto"]),
    ("method.calib_method=median", ["method.calib_method", "percentile", "minmax"]),
    ("distill.granularity=layer", ["distill.granularity", "block", "module", "model"]),
    ("sampler.name=euler", ["sampler.name", "ddim", "dpmsolver"]),
    ("method.no_such_flag=1", ["method.no_such_flag"]),
    ("logger.kind=tensorboard", ["logger.kind", "wandb", "csv", "none"]),
    ("calib.n_samples=0", ["calib.n_samples=0", "positive"]),
])
def test_bad_value_is_one_line_exit_2_before_any_work(override, expect, monkeypatch, capsys):
    code, err, reached = run_cli(monkeypatch, capsys, override)
    assert code == 2 and not reached
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for e in expect:
        assert e in lines[0], (e, lines[0])


def test_good_overrides_reach_the_entry(monkeypatch, capsys):
    code, err, reached = run_cli(monkeypatch, capsys, "quant=w8a8", "method=efficientdm", "method.rank=2")
    assert reached and code == 0 and err == ""


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment, cfg_factory):
    cfg = cfg_factory(f"experiment={experiment}")
    method = typed(cfg, "method")
    from dq.methods import recipe_for
    recipe_for(method)
    assert typed(cfg, "quant").w_bits in range(2, 9)


def test_typed_groups_are_dataclasses_with_the_yaml_values(cfg_factory):
    cfg = cfg_factory("quant=w8a8", "method=dilatequant_no_tpq")
    from dq.methods.dilatequant import DilateQuantConfig
    from dq.quant.config import QuantSpec
    q, m = typed(cfg, "quant"), typed(cfg, "method")
    assert isinstance(q, QuantSpec) and (q.w_bits, q.a_bits, q.label) == (8, 8, "W8A8")
    assert isinstance(m, DilateQuantConfig) and m.shared_tables and m.weight_dilation and m.name == "dilatequant_no_tpq"


def test_no_cfg_any_below_the_entry_points():
    """Library functions take typed arguments; only dq/tasks (the entry points) see the DictConfig."""
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "dq").rglob("*.py") if "tasks" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "cfg: Any" in line]
    assert offenders == []


def test_no_library_file_is_much_over_300_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "dq").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 320}
    assert long == {}


@pytest.mark.e2e
def test_debug_tiny_runs_end_to_end(tmp_path):
    import json
    import subprocess
    proc = subprocess.run([sys.executable, "train.py", "debug=tiny", f"hydra.run.dir={tmp_path}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((Path(tmp_path) / "results.json").read_text())
    assert results["bits"] == "W4A4" and results["train"]["steps"] == 18
    assert (Path(tmp_path) / "student.safetensors").is_file()
