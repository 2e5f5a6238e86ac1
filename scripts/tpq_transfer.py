"""Transfer of per-step activation parameters across samplers and step counts (docs/tpq_transfer.md).

For each target schedule (DDIM 20, 25, 100; DPM-Solver 20): a student trained at DDIM 50 and sampled
there (its tables moved by ``dq.quant.retarget``; for the knot form, read at the new timesteps) next to a
student trained at that schedule (matched), and the FP teacher at that schedule. Same protocol for all:
W4A4 DilateQuant, embedded digits teacher, 1,000 images, seed 0 noise, digits features.

Cells are resumable (a cell with results.json is not rerun) and live under --runs (default
benchmarks/transfer). The DDIM-50 students are the benchmark grid's cells
(``--grid`` benchmarks/<method>/w4a4/seed<seed>/student.safetensors: run scripts/benchmark.py first).

    python scripts/tpq_transfer.py [--seed 0] [--methods dilatequant dilatequant_table dilatequant_knots]
        [--matched dilatequant dilatequant_table]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [("ddim", 20), ("ddim", 25), ("ddim", 100), ("dpmsolver", 20)]


def run(cmd: list[str], out: Path) -> dict | None:
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
    with open(out / "cell.log", "w") as log:
        proc = subprocess.run([sys.executable, *cmd, f"hydra.run.dir={out}", "logger=none"], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(f"  FAILED (exit {proc.returncode}), see {out / 'cell.log'}", flush=True)
        return None
    return json.loads((out / "results.json").read_text())


def row(res: dict | None, name: str) -> dict:
    if res is None:
        return {}
    return next((r for r in res["rows"] if r["name"] == name), {})


def fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["dilatequant", "dilatequant_table", "dilatequant_knots"])
    ap.add_argument("--matched", nargs="+", default=["dilatequant", "dilatequant_table"],
                    help="methods that also get a student trained at each schedule (the others: moved only)")
    ap.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "transfer")
    ap.add_argument("--grid", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "tpq_transfer.md")
    a = ap.parse_args()
    lines = [f"W4A4, embedded digits teacher, 1,000 images, seed {a.seed}, digits-feature FID "
             f"(`python scripts/tpq_transfer.py --seed {a.seed}`).", "",
             "| schedule | FP | method | matched student (trained there) | DDIM-50 student moved there | "
             "how its parameters were mapped |", "|---|---|---|---|---|---|"]
    for name, steps in TARGETS:
        sampler = [f"sampler.name={name}", f"sampler.steps={steps}", f"seed={a.seed}"]
        fp = None
        for i, m in enumerate(a.methods):
            compare = f"task.compare_fp={'true' if i == 0 else 'false'}"  # the FP row once per schedule
            # the same 5,120 calibration inputs at every schedule: fewer steps need more trajectories
            traj = f"calib.n_trajectories={max(128, math.ceil(5120 / steps))}"
            matched = run(["train.py", f"method={m}", *sampler, compare, traj], a.runs / f"train_{m}_{name}{steps}") \
                if m in a.matched else None
            fp = fp or row(matched, "fp").get("fid")
            ckpt = a.grid / m / "w4a4" / f"seed{a.seed}" / "student.safetensors"
            moved = run(["eval.py", f"ckpt_path={ckpt}", *sampler], a.runs / f"move_{m}_ddim50_to_{name}{steps}") \
                if ckpt.is_file() else None
            mp = (moved or {}).get("tpq_mapping") or {}
            how = "knot form read at the new t" if mp.get("continuous") else \
                f"{len(mp.get('exact', []))} exact, {len(mp.get('interpolated', []))} interpolated, " \
                f"{len(mp.get('clamped', []))} clamped" if mp else ("no DDIM-50 checkpoint" if moved is None else "–")
            lines.append(f"| {name} {steps} | {fmt(fp)} | {m} | {fmt(row(matched, 'student').get('fid'))} | "
                         f"{fmt(row(moved, 'student').get('fid'))} | {how} |")
    a.out.write_text("# Per-step activation parameters on other schedules\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
