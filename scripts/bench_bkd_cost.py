"""Cost of block-wise distillation vs full-model QAT: time per iteration and peak memory.

    python scripts/bench_bkd_cost.py [--batch 8] [--iters 2] [--arch ddpm_cifar10] [--unit-stride 1]
                                     [--modes bkd bkd_module qat] [--reuse OUTPUT_OF_AN_EARLIER_RUN]

Both modes train the same W4A4 student (TPQ with T = 100 DDIM steps, WD) of the chosen random-init
architecture (any ``dq.models.families.archs()`` entry: UNets, ``dit_xl2``, ...) on CPU with the same
batch; conditional models get random class labels / text states as the family's conditioning says.
BKD: each block once for ``--iters`` iterations (teacher and student prefixes without grad, the
block with grad), with the family's blocks (UNet: down/mid/up stages; DiT: each transformer block)
and with ``distill.granularity=module`` units (UNet: each ResNet / attention / resampler; DiT: each
block's adaLN, attention and MLP). ``--unit-stride k`` trains only every k-th unit (and the last)
to bound the run time of deep models: the s / iteration mean is then over those units. Full-model
QAT: the whole student against the teacher's output. ``--modes`` runs a subset; ``--reuse FILE``
takes the per-mode JSON lines an earlier run printed for the modes not run now (long runs in parts).
Each mode runs in its own process so its
peak resident memory (ru_maxrss) is its own. Columns: the process's peak RSS (calibration included);
the peak RSS while training, sampled every 2 ms; "tensors" = that minus the RSS after importing
torch/diffusers (closest to a GPU's allocated-memory figure, which counts weights, activations,
gradients and optimizer state); and that minus the RSS before the first iteration (teacher,
student, data loaded), leaving activations, gradients and optimizer state.
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


def random_cond(family, model, batch: int):
    """Conditioning input of the family's kind: class labels [B], text states [B, 8, D], or None."""
    spec = family.conditioning(model)
    if spec is None:
        return None
    if spec.kind == "class":
        return torch.randint(0, spec.num_classes, (batch,))
    return torch.randn(batch, 8, spec.dim)


def worker(mode: str, arch: str, batch: int, iters: int, stride: int = 1) -> dict:
    from diffusers import DDIMScheduler

    from dq.distill.bkd import BlockDistiller, DistillConfig, keep_optimizer_state, param_groups
    from dq.models.load import build_arch
    from dq.models.student import calibrate, prepare, weight_dilation
    from dq.quant.config import QuantConfig

    logging.getLogger("dq.quant.calibration").setLevel(logging.ERROR)
    libs = current_rss_mb()  # the interpreter and libraries: what a GPU's allocated-memory figure would not count
    torch.manual_seed(0)
    built = build_arch(arch)
    teacher = built.denoiser
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(100)
    ts = sched.timesteps
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=tuple(ts.tolist()))
    x = torch.randn(batch, *built.sample_shape)
    t = ts[torch.randint(0, len(ts), (batch,))]
    cond = random_cond(built.family, teacher, batch)
    student = prepare(copy.deepcopy(teacher), qcfg)
    weight_dilation(student, [(x, t, cond)])
    calibrate(student, [(x, t, cond)], "minmax")
    student.train().requires_grad_(True)
    gran = {"bkd": "block", "bkd_module": "module", "qat": "model"}[mode]
    module = BlockDistiller(student, teacher, DistillConfig(steps_per_block=iters, granularity=gran))
    opt = torch.optim.Adam(param_groups(student, module.cfg))
    batch_d = {"x": x, "t": t, **({} if cond is None else {"cond": cond})}  # table rows follow from t
    n_units = len(module.student_blocks)
    units = sorted(set(range(0, n_units, stride)) | {n_units - 1})
    base = current_rss_mb()  # libraries + teacher + student + data
    times = []
    with PeakRSS() as train:
        for k in units:
            keep_optimizer_state(opt, module.student_blocks[k].parameters())  # as BlockDistiller does
            for _ in range(iters):
                t0 = time.perf_counter()
                loss = module.block_loss(batch_d, k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
    return {"mode": mode, "blocks": n_units, "trained_units": len(units), "iters": len(times),
            "s_per_iter": statistics.mean(times[1:] or times),  # the first iteration warms up allocators
            "peak_mb": rss_mb(), "train_peak_mb": max(train.peak, base), "base_mb": base, "libs_mb": libs,
            "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--arch", default="ddpm_cifar10")
    ap.add_argument("--unit-stride", type=int, default=1, help="train every k-th unit (and the last) only")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--reuse", help="a file with the JSON lines of an earlier run (rows of modes not run now)")
    ap.add_argument("--worker", choices=list(MODES))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.arch, args.batch, args.iters, args.unit_stride)))
        return
    rows = {}
    if args.reuse:
        for line in Path(args.reuse).read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("mode") not in args.modes:
                rows[json.loads(line)["mode"]] = json.loads(line)
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--arch", args.arch, "--batch",
                              str(args.batch), "--iters", str(args.iters), "--unit-stride", str(args.unit_stride)],
                             capture_output=True, text=True)
        if out.returncode != 0:  # e.g. killed for memory: report it, keep the other modes' numbers
            last = (out.stderr.strip().splitlines() or ["(no output; killed?)"])[-1]
            print(f"{mode}: worker failed (exit {out.returncode}): {last}", flush=True)
            continue
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[mode]), flush=True)  # raw numbers as each mode finishes
    if not rows:
        sys.exit("no mode finished")
    q = rows.get("qat")
    any_row = next(iter(rows.values()))
    print(f"{args.arch} ({any_row['params_m']:.1f}M params), W4A4 + TPQ(T=100) + WD, batch {args.batch}, "
          f"{args.iters} iterations per unit, unit stride {args.unit_stride}, CPU {torch.get_num_threads()} threads\n")
    print("| method | units (trained) | s / iteration | process peak RSS (MB) | peak while training (MB) | "
          "tensors: training peak − libraries (MB) | training peak − models loaded (MB) |")
    print("|---|---|---|---|---|---|---|")
    for mode in [m for m in MODES if m in rows]:
        r, name = rows[mode], MODES[mode]
        print(f"| {name} | {r['blocks']} ({r['trained_units']}) | {r['s_per_iter']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['train_peak_mb']:.0f} | {r['train_peak_mb'] - r['libs_mb']:.0f} | "
              f"{r['train_peak_mb'] - r['base_mb']:.0f} |")

    if q is None:
        sys.exit("full-model QAT did not finish: no ratios")

    def ratio(b: dict, key: str, minus: str | None = None) -> float:
        return (b[key] - (b[minus] if minus else 0)) / (q[key] - (q[minus] if minus else 0))
    for mode in [m for m in ("bkd", "bkd_module") if m in rows]:
        b = rows[mode]
        print(f"\nratio {MODES[mode]} / full-model QAT: process peak {ratio(b, 'peak_mb'):.2f}, "
              f"peak while training {ratio(b, 'train_peak_mb'):.2f}, "
              f"tensors {ratio(b, 'train_peak_mb', 'libs_mb'):.2f}, "
              f"above models {ratio(b, 'train_peak_mb', 'base_mb'):.2f}, "
              f"time per iteration {b['s_per_iter'] / q['s_per_iter']:.2f}")


if __name__ == "__main__":
    main()
