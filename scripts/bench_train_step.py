"""Compute time of one block-wise distillation step (forward + backward of the student block) per block
of the W4A4 student — the part of a BKD step that is the model itself, to hold against the per-step
wall time of the main job (docs/speed.md: whatever is left is loop, optimizer and data overhead).

    python scripts/bench_train_step.py [--batch 32] [--repeats 7] [--threads 2] [--clock wall|cpu]

Model: the embedded digits teacher (or --arch ddpm_cifar10 with random weights), prepared W4A4 with
50 per-step tables and min–max tables; timesteps mixed in the batch as in BKD. ``--clock cpu`` reports
process CPU time, which with ``--threads 1`` stays meaningful on a machine busy with other work.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dq.models.load import ModelConfig, build_arch, load_model  # noqa: E402
from dq.models.student import calibrate, prepare  # noqa: E402
from dq.quant.config import QuantConfig  # noqa: E402
from dq.quant.prepare import rows_of  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="embedded")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    model = load_model(ModelConfig()) if a.arch == "embedded" else build_arch(a.arch)
    steps = 50
    timesteps = list(range(999, -1, -1000 // steps))[:steps]
    student = model.denoiser
    prepare(student, QuantConfig(w_bits=4, a_bits=4, timesteps=timesteps))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, *model.sample_shape, generator=g)
    t = torch.tensor(timesteps)[torch.randint(0, steps, (a.batch,), generator=g)]
    calibrate(student, [(x, t, None)])
    student.requires_grad_(True)
    blocks = model.family.blocks(student)
    with torch.no_grad(), student.dq_step_index.use(rows_of(student, t)):
        states, s = [], model.family.initial_state(x, t)
        for b in blocks:
            states.append(s.detach())
            s = b(s)
    print(f"{a.arch}, W4A4, batch {a.batch}, {a.threads} threads, median of {a.repeats} "
          f"({a.clock} ms per step, forward + backward)")
    print("| block | ms |\n|---|---|")
    total = 0.0
    for b, s_in in zip(blocks, states):
        times = []
        for rep in range(a.repeats + 1):
            with student.dq_step_index.use(rows_of(student, t)):
                t0 = clock()
                out = b(s_in)
                sum(o.float().pow(2).mean() for o in out.new).backward()
                if rep:  # the first run warms up
                    times.append(clock() - t0)
            student.zero_grad(set_to_none=True)
        ms = statistics.median(times) * 1e3
        total += ms
        print(f"| {b.name} | {ms:.1f} |")
    print(f"| total | {total:.1f} |")


if __name__ == "__main__":
    main()
