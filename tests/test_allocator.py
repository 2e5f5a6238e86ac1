"""dq.allocator: the glibc malloc tuning of the entry points, its opt-outs, and that it is recorded."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CODE = "from dq import allocator; import json; print(json.dumps(allocator.tune()))"


def tune_in_subprocess(**env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "DQ_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, env={**e, **env},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tuned_on_glibc_and_opt_outs_are_respected():
    if sys.platform.startswith("linux"):
        s = tune_in_subprocess()
        assert s["tuned"] and s["settings"]["M_MMAP_THRESHOLD"] == 32 << 20, s
    assert tune_in_subprocess(DQ_MALLOC_TUNING="0") == {"tuned": False, "reason": "skipped: DQ_MALLOC_TUNING=0"}
    s = tune_in_subprocess(MALLOC_ARENA_MAX="2")
    assert not s["tuned"] and "MALLOC_" in s["reason"]


@pytest.mark.e2e
def test_results_json_records_the_allocator(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "debug=tiny", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((tmp_path / "run" / "results.json").read_text())["allocator"]
    assert state["tuned"] == sys.platform.startswith("linux") and "reason" in state
