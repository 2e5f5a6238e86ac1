"""Every method config composes to a registered recipe, and each runs a tiny job through the one quantize
code path doing what the method says it does (tables, training steps, changed weights, scaling)."""
import json

import pytest
import torch

from conftest import ROOT
from dq.config import typed
from dq.quant.layers import iter_quant_layers
from dq.quant.quantizers import TemporalActQuantizer

METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
TINY = ["model=tiny_unet", "sampler.steps=4", "calib.n_samples=32", "calib.n_trajectories=8",
        "calib.act_init_samples=32", "distill.steps_per_block=1", "task.evaluate=false"]
WHOLE_MODEL_STEPS = 3  # method.steps of the methods that train the whole model (lsq_qat, efficientdm)


def test_every_method_yaml_has_a_recipe_and_every_recipe_a_yaml():
    from hydra import compose, initialize_config_dir

    import dq.config  # noqa: F401  (stores the method schemas the yamls start from)
    from dq.methods import _RECIPES, recipe_for

    used = set()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for method in METHODS:  # the method group alone (the tiny jobs below compose each in the full config)
            cfg = typed(compose(overrides=[f"+method={method}"]), "method")
            assert cfg.name == method, (method, cfg)  # results.json names the method by this field
            assert recipe_for(cfg) is _RECIPES[type(cfg)]
            used.add(type(cfg))
    unused = {c.__name__ for c in _RECIPES} - {c.__name__ for c in used}
    assert not unused, f"registered method configs no conf/method/*.yaml uses: {unused}"


def _shared_tables(m) -> bool:
    return m.shared_tables if hasattr(m, "shared_tables") else not m.per_step_tables  # ptq: per_step_tables


@pytest.mark.e2e
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_a_tiny_job(method, cfg_factory, tmp_path):
    from dq.models.checkpoint import load_student
    from dq.models.load import load_model
    from dq.tasks.quantize import run

    extra = [f"method.steps={WHOLE_MODEL_STEPS}"] if method in ("lsq_qat", "efficientdm") else []
    cfg = cfg_factory(*TINY, f"method={method}", *extra)
    m = typed(cfg, "method")
    summary = run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"]["name"] == method and "weight_dilation" not in results
    ckpt = tmp_path / "student.safetensors"
    if method == "fp":
        assert summary["bits"] == results["bits"] == "FP" and not ckpt.exists()
        assert results["train"]["steps"] == 0 and results["scaling"] == []
        return
    assert summary["bits"] == "W4A4" and ckpt.is_file() and not (tmp_path / "student.pt").exists()
    teacher = load_model(typed(cfg, "model")).denoiser
    student, meta = load_student(ckpt)
    assert meta["method"]["name"] == method and meta["sampler"]["steps"] == 4

    # activation tables: one row per sampler step (TPQ), or one shared row
    shared = _shared_tables(m)
    quantizers = [q for q in student.denoiser.modules() if isinstance(q, TemporalActQuantizer)]
    if getattr(m, "tpq_knots", 0) and not shared:  # the continuous form: 4 steps read from K ≤ 4 knots
        assert {q.num_steps for q in quantizers if q.delta.shape[0] == 1 and hasattr(q, "knot_t")} == {4}
        assert {q.knot_t.numel() for q in quantizers if hasattr(q, "knot_t")} == {min(m.tpq_knots, 4)}
        assert any("one knot per step (K=4)" in n for n in results["notes"]) == (m.tpq_knots > 4)
    else:
        rows = {q.delta.shape[0] for q in quantizers}
        assert rows == ({1} if shared else {4}) and meta["quant"]["shared_tables"] == shared

    # distillation steps as configured: steps_per_block × blocks, method.steps for whole-model training
    if method in ("lsq_qat", "efficientdm"):
        expected_steps = WHOLE_MODEL_STEPS
    elif getattr(m, "bkd", True) and method not in ("ptq", "svdquant"):
        expected_steps = cfg.distill.steps_per_block * len(student.family.blocks(teacher, "block"))
    else:
        expected_steps = 0
    assert results["train"]["steps"] == expected_steps

    # scaling (WD / SmoothQuant) is reported per layer group exactly when the method scales
    scales = method in ("smoothquant_bkd", "svdquant") or getattr(m, "weight_dilation", False)
    assert bool(results["scaling"]) == scales
    if method in ("lsq_qat", "efficientdm"):
        assert any("method.steps" in n for n in results["notes"])

    # the student's quantized layers keep the teacher's weights unless the method changes them:
    # training (any step), SmoothQuant, or a Weight Dilation factor s > 1 somewhere
    differ = [name for name, layer in iter_quant_layers(student.denoiser)
              if not torch.equal(layer.weight, teacher.get_submodule(name).weight)]
    dilated = any(r["s_max"] > 1 for r in results["scaling"])
    if expected_steps > 0 or method in ("smoothquant_bkd", "svdquant") or dilated:
        assert differ, f"{method}: no quantized layer's weights differ from the teacher's"
    else:
        assert differ == [], f"{method} changed weights it should not: {differ[:3]}"
    if method == "efficientdm":
        assert results["train"]["lora_parameters"] > 0  # merged away: the checkpoint loaded strictly
    branched = [layer for _, layer in iter_quant_layers(student.denoiser) if layer.lowrank_rank]
    own = method == "svdquant" or method.startswith("dilatequant")  # the methods with a branch of their own
    assert results["lowrank"]["layers"] == len(branched) == (len(branched) if own else 0)
    assert own == any("quant.lowrank_rank unset: the method's" in n for n in results["notes"])
    if method.startswith("dilatequant"):  # rank 16 on the skip shortcuts: the tiny UNet's are too narrow
        assert any("fits no layer of this UNet2DModel (shortcuts too narrow): none built" in n for n in results["notes"])
    if method == "svdquant":  # the branches were split from the SVD and came back from the checkpoint
        assert branched and all(layer.lowrank_rank == m.rank and layer.lowrank_up.abs().sum() > 0 for layer in branched)

    # the saved student runs at the timesteps it was made for
    x = torch.randn(4, *student.sample_shape)
    t = torch.tensor(meta["quant"]["timesteps"])
    with torch.no_grad():
        assert torch.isfinite(student.family.forward(student.denoiser, x, t)).all()


@pytest.mark.e2e
def test_the_main_job_samples_the_students_export_on_a_fast_runtime_beside_the_reference(cfg_factory, tmp_path):
    """task.student_runtime=int8: the student row is the saved student's export on the integer kernels;
    task.compare_reference=true adds the fake-quant student on the same seeds."""
    from dq.quant.int8 import available
    from dq.tasks.quantize import run

    if not available():
        pytest.skip("no oneDNN int8 ops in this torch build")
    cfg = cfg_factory(*TINY[:-1], "method=dilatequant", "task.num_samples=8", "task.floor=false",
                      "task.student_runtime=int8", "task.compare_reference=true")
    run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["fp", "student", "student_reference"] and results["student_runtime"] == "int8"
    assert (tmp_path / "export" / "quantization_config.json").is_file()
    assert {"sampling_student", "sampling_student_reference"} <= set(results["timings"])
    assert (tmp_path / "samples_teacher_vs_student.png").is_file()
    # the same integers on both paths, up to float rounding: near-identical scores on the same seeds
    assert abs(rows["student"]["fid"] - rows["student_reference"]["fid"]) <= 0.1 * max(1.0, rows["student"]["fid"])


def test_compare_reference_needs_a_runtime_to_compare(cfg_factory):
    from dq.config import check
    from dq.errors import DQError

    with pytest.raises(DQError, match="task.compare_reference=true .* task.student_runtime=auto"):
        check(cfg_factory("task.compare_reference=true"))


def test_a_bad_student_runtime_fails_before_any_work(cfg_factory):
    from dq.config import check
    from dq.errors import DQError

    with pytest.raises(DQError, match="task.student_runtime.*'fast'.*auto.*reference.*int8.*compiled"):
        check(cfg_factory("task.student_runtime=fast"))
