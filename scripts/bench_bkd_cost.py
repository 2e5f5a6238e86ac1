"""Cost of block-wise distillation vs full-model QAT: time per iteration and peak memory.

    python scripts/bench_bkd_cost.py [--batch 8] [--iters 2] [--arch ddpm_cifar10]

Both modes train the same W4A4 student (TPQ with T = 100 DDIM steps, WD) of the chosen random-init
architecture on CPU with the same batch. BKD: each block once for ``--iters`` iterations (teacher and
student prefixes without grad, the block with grad), with the paper's blocks (down/mid/up stages)
and with ``distill.granularity=module`` units (each ResNet / attention / resampler). Full-model QAT: the whole student against the
teacher's output. Each mode runs in its own process so its peak resident memory (ru_maxrss) is its
own. Columns: the process's peak RSS (calibration included); the peak RSS while training, sampled
every 2 ms; "tensors" = that minus the RSS after importing torch/diffusers (closest to a GPU's
allocated-memory figure, which counts weights, activations, gradients and optimizer state); and
that minus the RSS before the first iteration (teacher, student, data loaded), leaving activations,
gradients and optimizer state.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    """The process's peak resident set size so far (cannot be reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident set size now, after handing freed heap pages back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Peak of the current RSS while the ``with`` body runs, sampled from a thread every few ms."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE") / 2**20
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
                time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


MODES = {"bkd": "BKD, blocks (paper)", "bkd_module": "BKD, modules (distill.granularity=module)",
         "qat": "full-model QAT"}


def worker(mode: str, arch: str, batch: int, iters: int) -> dict:
    from diffusers import DDIMScheduler

    from dq.distill.bkd import BlockDistiller, DistillConfig, keep_optimizer_state, param_groups
    from dq.models.load import build_arch
    from dq.models.student import calibrate, prepare, weight_dilation
    from dq.quant.config import QuantConfig

    logging.getLogger("dq.quant.calibration").setLevel(logging.ERROR)
    libs = current_rss_mb()  # the interpreter and libraries: what a GPU's allocated-memory figure would not count
    torch.manual_seed(0)
    teacher = build_arch(arch).denoiser
    c = teacher.config
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(100)
    ts = sched.timesteps
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=tuple(ts.tolist()))
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size)
    t = ts[torch.randint(0, len(ts), (batch,))]
    student = prepare(copy.deepcopy(teacher), qcfg)
    weight_dilation(student, [(x, t, None)])
    calibrate(student, [(x, t, None)], "minmax")
    student.train().requires_grad_(True)
    gran = {"bkd": "block", "bkd_module": "module", "qat": "model"}[mode]
    module = BlockDistiller(student, teacher, DistillConfig(steps_per_block=iters, granularity=gran))
    opt = torch.optim.Adam(param_groups(student, module.cfg))
    batch_d = {"x": x, "t": t}  # table rows follow from t
    base = current_rss_mb()  # libraries + teacher + student + data
    times = []
    with PeakRSS() as train:
        for k in range(len(module.student_blocks)):
            keep_optimizer_state(opt, module.student_blocks[k].parameters())  # as BlockDistiller does
            for _ in range(iters):
                t0 = time.perf_counter()
                loss = module.block_loss(batch_d, k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
    return {"mode": mode, "blocks": len(module.student_blocks), "iters": len(times),
            "s_per_iter": statistics.mean(times[1:] or times),  # the first iteration warms up allocators
            "peak_mb": rss_mb(), "train_peak_mb": max(train.peak, base), "base_mb": base, "libs_mb": libs,
            "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--arch", default="ddpm_cifar10")
    ap.add_argument("--worker", choices=list(MODES))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.arch, args.batch, args.iters)))
        return
    rows = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--arch", args.arch, "--batch",
                              str(args.batch), "--iters", str(args.iters)], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    q = rows["qat"]
    print(f"{args.arch} ({q['params_m']:.1f}M params), W4A4 + TPQ(T=100) + WD, batch {args.batch}, CPU "
          f"{torch.get_num_threads()} threads\n")
    print("| method | units | s / iteration | process peak RSS (MB) | peak while training (MB) | "
          "tensors: training peak − libraries (MB) | training peak − models loaded (MB) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        name = MODES[mode]
        print(f"| {name} | {r['blocks']} | {r['s_per_iter']:.2f} | {r['peak_mb']:.0f} | {r['train_peak_mb']:.0f} | "
              f"{r['train_peak_mb'] - r['libs_mb']:.0f} | {r['train_peak_mb'] - r['base_mb']:.0f} |")

    def ratio(b: dict, key: str, minus: str | None = None) -> float:
        return (b[key] - (b[minus] if minus else 0)) / (q[key] - (q[minus] if minus else 0))

    for mode in ("bkd", "bkd_module"):
        b = rows[mode]
        print(f"\nratio {MODES[mode]} / full-model QAT: process peak {ratio(b, 'peak_mb'):.2f}, "
              f"peak while training {ratio(b, 'train_peak_mb'):.2f}, "
              f"tensors {ratio(b, 'train_peak_mb', 'libs_mb'):.2f}, "
              f"above models {ratio(b, 'train_peak_mb', 'base_mb'):.2f}, "
              f"time per iteration {b['s_per_iter'] / q['s_per_iter']:.2f}")


if __name__ == "__main__":
    main()
