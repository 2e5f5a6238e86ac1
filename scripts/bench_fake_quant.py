"""Forward-time overhead of the W4A4 fake-quantized student vs the float UNet (CPU, no grad).

Architecture: google/ddpm-cifar10-32 (UNet2DModel, ≈35.7M parameters) with random weights.
Student: prepare (TPQ, T = 100 DDIM steps) → WD → minmax calibration on a couple of batches; it is
timed on a batch mixing timesteps of the schedule.

    python scripts/bench_fake_quant.py [--batch 16] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

from dq.models.families.unet import DDPM_CIFAR10  # noqa: E402
from dq.models.student import calibrate, prepare, weight_dilation  # noqa: E402
from dq.quant.config import QuantConfig  # noqa: E402



def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache, weight fake-quant cache)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # two calibration batches cannot visit all 100 steps; the "copied from nearest step" warning is expected
    logging.getLogger("dq.quant.calibration").setLevel(logging.ERROR)
    torch.manual_seed(0)

    teacher = UNet2DModel(**DDPM_CIFAR10).eval()
    n_params = sum(p.numel() for p in teacher.parameters())
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(100)
    timesteps = tuple(sched.timesteps.tolist())
    b = args.batch

    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        t = torch.tensor(timesteps)[torch.randint(len(timesteps), (b,), generator=g)]
        return torch.randn(b, 3, 32, 32, generator=g), t

    rows = []
    x, t = batch(0)
    with torch.no_grad():
        fp_ms = median_ms(lambda: teacher(x, t), args.repeats)
        for label, wd in (("W4A4 TPQ", False), ("W4A4 TPQ + WD", True)):
            student = prepare(copy.deepcopy(teacher), QuantConfig(w_bits=4, a_bits=4, timesteps=timesteps))
            if wd:
                weight_dilation(student)
            calibrate(student, [(*batch(s), None) for s in (1, 2)])
            q_ms = median_ms(lambda: student(x, t), args.repeats)
            rows.append((label, q_ms))

    print(f"\nddpm-cifar10 UNet2DModel, {n_params / 1e6:.2f}M parameters, batch {b}, CPU, "
          f"{args.threads} thread(s), torch {torch.__version__}, median of {args.repeats}\n")
    print("| model | forward ms | ratio vs FP |")
    print("|---|---:|---:|")
    print(f"| FP32 | {fp_ms:.0f} | 1.00 |")
    for label, q_ms in rows:
        print(f"| {label} (T={len(timesteps)}) | {q_ms:.0f} | {q_ms / fp_ms:.2f} |")


if __name__ == "__main__":
    main()
