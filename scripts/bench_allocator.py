"""Denoiser call time and minor page faults with and without dq's malloc tuning (dq/allocator.py).

Each setting runs in its own process (mallopt must act before the first large allocation), the two
alternate ``--rounds`` times, and each reports the median over calls of: process CPU time per call and
minor page faults per call, for the FP teacher and the W4A4 fake-quant student (embedded digits teacher,
batch 250, one timestep for the whole batch as in sampling, 1 thread: CPU time stays meaningful on a
busy machine).

    python scripts/bench_allocator.py [--rounds 2] [--batch 250] [--calls 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import copy, json, resource, statistics, sys, time
from dq import allocator
if TUNE:
    allocator.tune()
import torch
from dq.models.load import ModelConfig, load_model
from dq.models.student import calibrate, prepare
from dq.quant.config import QuantConfig
torch.set_num_threads(1)
model = load_model(ModelConfig())
fp = copy.deepcopy(model.denoiser)
ts = list(range(999, -1, -20))[:50]
student = prepare(model.denoiser, QuantConfig(w_bits=4, a_bits=4, timesteps=ts))
g = torch.Generator().manual_seed(0)
x = torch.randn(BATCH, *model.sample_shape, generator=g)
calibrate(student, [(x[:64], torch.tensor(ts)[torch.randint(0, 50, (64,), generator=g)], None)])
t = torch.full((BATCH,), ts[10])
out = {}
with torch.no_grad():
    for name, m in (("fp", fp), ("student", student)):
        m(x, t)  # warm-up
        cpu, faults = [], []
        for _ in range(CALLS):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
            m(x, t)
            cpu.append(time.process_time() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        out[name] = (statistics.median(cpu) * 1e3, statistics.median(faults))
print(json.dumps(out))
"""


def run(tune: bool, batch: int, calls: int) -> dict:
    code = WORKER.replace("ROOT", repr(str(ROOT))).replace("TUNE", str(tune)).replace("BATCH", str(batch)) \
        .replace("CALLS", str(calls))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args()
    print(f"embedded digits UNet, batch {a.batch}, 1 thread; per call: median CPU ms, median minor page faults")
    print("| round | allocator | FP ms | FP faults | student ms | student faults | student / FP |")
    print("|---|---|---|---|---|---|---|")
    for r in range(a.rounds):
        for tune in (False, True):
            res = run(tune, a.batch, a.calls)
            (fm, ff), (sm, sf) = res["fp"], res["student"]
            label = "dq tuning" if tune else "glibc default"
            print(f"| {r} | {label} | {fm:.0f} | {ff:.0f} | {sm:.0f} | {sf:.0f} | {sm / fm:.2f} |")


if __name__ == "__main__":
    main()
