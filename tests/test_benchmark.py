"""The resumable benchmark: cells run once, finished cells are skipped, the report aggregates them."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TINY = ["--", "model=tiny_unet", "sampler.steps=4", "calib.n_samples=32", "calib.n_trajectories=8",
        "distill.steps_per_block=1", "task.num_samples=8", "task.floor=false"]


@pytest.mark.e2e
def test_sweep_skips_finished_cells_and_reports(tmp_path):
    args = [sys.executable, "scripts/benchmark.py", "--methods", "fp", "ptq", "--bits", "w4a4", "--seeds", "0", "1",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "results.md"), *TINY]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    first = subprocess.run([*args[:2], "--jobs", "2", *args[2:]], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = sorted(tmp_path.glob("runs/*/*/seed*/results.json"))
    assert len(cells) == 4
    mtimes = [c.stat().st_mtime_ns for c in cells]
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0
    assert "train.py" not in second.stdout  # nothing was launched again
    assert [c.stat().st_mtime_ns for c in cells] == mtimes
    md = (tmp_path / "results.md").read_text()
    assert "| ptq | W4A4 | 2 |" in md and "| fp | FP | 2 |" in md
    assert "Protocol (extra overrides on every cell): `model=tiny_unet" in md
    assert (tmp_path / "results_fid.png").stat().st_size > 1000
    # the committed ledger alone regenerates the same table once the cells' directories are gone
    import shutil
    ledger = json.loads((tmp_path / "results_cells.json").read_text())
    assert sorted((c["method"], c["seed"]) for c in ledger) == [("fp", 0), ("fp", 1), ("ptq", 0), ("ptq", 1)]
    shutil.rmtree(tmp_path / "runs")
    third = subprocess.run([*args, "--report-only"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert [ln for ln in (tmp_path / "results.md").read_text().splitlines() if ln.startswith("| ")] == table


def test_a_cell_running_in_another_live_process_is_left_to_it(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import running_elsewhere

    assert not running_elsewhere(tmp_path)  # no marker
    (tmp_path / "running.pid").write_text(str(os.getppid()))  # a live process that is not us
    assert running_elsewhere(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "running.pid").write_text(str(dead.pid))  # its runner died: the cell is free again
    assert not running_elsewhere(tmp_path)


def cell(*fids):
    """Cells of one method: FIDs of seeds 0, 1, …"""
    return [{"fid": f, "seed": i} for i, f in enumerate(fids)]


def test_comparison_verdicts_use_the_seed_spread():
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import comparison
    cells = {("dilatequant", "w4a4"): cell(2.0, 2.2, 2.1), ("ptq", "w4a4"): cell(6.0, 6.3, 5.9),
             ("dilatequant_no_wd", "w4a4"): cell(2.1, 2.0, 2.3), ("smoothquant_bkd", "w4a4"): cell(1.0, 1.1, 1.2),
             ("dilatequant_no_tpq", "w4a4"): cell(3.0)}  # one seed: no verdict
    rows = {line.split(" | ")[0].strip("| "): line for line in comparison(cells) if line.startswith("| ")}
    assert "beyond spread" in rows["ptq"] and "DilateQuant better" in rows["ptq"]
    assert "+4.00" in rows["ptq"] and "+4.00?, +4.10?, +3.80?" in rows["ptq"]  # cells without a CPU: "?"
    assert "within seed spread" in rows["dilatequant_no_wd"]
    assert "DilateQuant worse, beyond spread" in rows["smoothquant_bkd"]
    assert "dilatequant_no_tpq" not in rows


def test_scaling_effect_summarises_the_cells_scaling_reports():
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import scaling_effect

    from benchmark import _scaling_ratios

    layer = {"act_absmax_before": 4.0, "act_absmax_after": 2.0, "act_median_before": 1.0, "act_median_after": 1.0}
    ratios = _scaling_ratios([layer, layer, {"layers": ["conv_in"]}])  # a group without activation stats is skipped
    cells = {("smoothquant_bkd", "w4a4"): [{"scaling_ratios": ratios}, {"scaling_ratios": ratios}],
             ("ptq", "w4a4"): [{"scaling_ratios": []}]}  # no scaling: no row
    rows = [line for line in scaling_effect(cells) if line.startswith("| smoothquant") or line.startswith("| ptq")]
    assert rows == ["| smoothquant_bkd | W4A4 | 2 | 0.50 | 4.00 → 2.00 |"]


def test_levers_are_paired_against_their_own_base_and_kept_out_of_the_forms_table():
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import levers, tpq_forms
    cells = {("dilatequant", "w4a4"): cell(2.0, 2.2, 2.4), ("dilatequant_no_tpq", "w4a4"): cell(2.1, 2.1, 2.1),
             ("fp", "fp"): cell(1.0, 1.0, 1.0), ("ptq", "w4a4"): cell(6.0, 6.0, 6.0),
             ("dilatequant_a8_shortcuts", "w4a4"): cell(1.5, 1.6, 2.5),
             ("dilatequant_no_tpq_a8_shortcuts", "w4a4"): cell(1.6)}
    rows = {line.split(" | ")[0].strip("| "): line for line in levers(cells) if line.startswith("| ")}
    a8 = rows["dilatequant_a8_shortcuts"].split(" | ")
    assert a8[1] == "dilatequant" and a8[3] == "3" and a8[5] == "-0.33" and a8[6] == "-0.50, -0.60, +0.10"
    assert a8[7] == "2/3" and a8[8].rstrip(" |") == "83 %"  # (6 − 1.8667) / (6 − 1)
    shared = rows["dilatequant_no_tpq_a8_shortcuts"].split(" | ")
    assert shared[1] == "dilatequant_no_tpq" and shared[6] == "-0.50" and shared[8].rstrip(" |") == "–"  # 1 seed
    assert not any("a8_shortcuts" in line for line in tpq_forms(cells))


def test_pairs_whose_cells_ran_on_different_cpus_are_marked():
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import code_label, comparison
    epyc, xeon = "AMD EPYC, 2 threads", "Intel(R) Xeon(R) Processor, 2 threads"
    dq = [{"fid": 2.0, "seed": 0, "cpu": epyc, "commit": "a" * 40}, {"fid": 2.2, "seed": 1, "cpu": epyc, "commit": "a" * 40}]
    other = [{"fid": 3.0, "seed": 0, "cpu": xeon, "commit": "b" * 40}, {"fid": 3.0, "seed": 1}]
    rows = {line.split(" | ")[0].strip("| "): line for line in comparison({("dilatequant", "w4a4"): dq,
                                                                         ("ptq", "w4a4"): other}) if line.startswith("| ")}
    assert "+1.00†, +0.80? |" in rows["ptq"]
    assert code_label(other) == "bbbbbbb (Intel Xeon), earlier"
    assert "+1.00, +0.80 |" in comparison({("dilatequant", "w4a4"): dq, ("ptq", "w4a4"): [
        {**c, "cpu": epyc} for c in other]})[-1]  # the same CPU: no mark


def test_a_result_is_marked_dirty_by_changed_code_not_by_changed_docs(tmp_path):
    from dq.machine import tree_dirty
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "docs").mkdir()
    for f in ("docs/runtime.md", "README.md", "code.py"):
        (tmp_path / f).write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    assert not tree_dirty(tmp_path)
    (tmp_path / "docs/runtime.md").write_text("b\n")  # what a benchmark writes
    (tmp_path / "README.md").write_text("b\n")
    (tmp_path / "new.py").write_text("untracked\n")
    assert not tree_dirty(tmp_path)
    (tmp_path / "code.py").write_text("b\n")
    assert tree_dirty(tmp_path)
