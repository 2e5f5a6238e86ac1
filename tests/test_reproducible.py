"""The guarantee dq makes about its numbers: the same command on the same machine, with the same thread
count, gives the same student and the same scores, bit for bit (another CPU may run other kernels and round
differently, so a seed's student can differ there: results.json names the machine)."""
import json

import pytest
from safetensors.torch import load_file

from conftest import make_cfg

TINY = ["model=tiny_unet", "sampler.steps=4", "calib.n_samples=32", "calib.n_trajectories=8",
        "calib.act_init_samples=32", "distill.steps_per_block=2", "task.num_samples=16", "task.floor=false",
        "task.grid=16"]


@pytest.mark.e2e
def test_the_same_command_twice_gives_the_same_student_and_scores_bitwise(tmp_path):
    from dq.tasks.quantize import run

    out = []
    for i in range(2):
        run(make_cfg(tmp_path / f"run{i}", overrides=[*TINY, "quant.split_concat=true", "quant.lowrank_rank=4"]))
        out.append((load_file(str(tmp_path / f"run{i}" / "student.safetensors")),
                    json.loads((tmp_path / f"run{i}" / "results.json").read_text())))
    (a, ra), (b, rb) = out
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert ra["train"]["steps"] > 0 and ra["lowrank"]["layers"] > 0
    rows = lambda r: {row["name"]: (row["fid"], row["kid"], row["is"]) for row in r["rows"]}  # noqa: E731
    assert rows(ra) == rows(rb) and "student" in rows(ra)
    assert ra["machine"]["model"] == rb["machine"]["model"] and ra["machine"]["threads"] == rb["machine"]["threads"]
    assert "commit" in ra["code"]
