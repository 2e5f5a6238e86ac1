"""Cost of block-wise distillation vs full-model QAT: time per iteration and peak memory.

    python scripts/bench_bkd_cost.py [--batch 8] [--iters 2] [--arch ddpm_cifar10]

Both modes train the same W4A4 student (TPQ with T = 100 DDIM steps, WD) of the chosen random-init
architecture on CPU with the same batch. BKD: each block once for ``--iters`` iterations (teacher and
student prefixes without grad, the block with grad). Full-model QAT: the whole student against the
teacher's output. Each mode runs in its own process so its peak resident memory (ru_maxrss) is its
own; "train peak" subtracts the memory held before the first iteration (models, data).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(mode: str, arch: str, batch: int, iters: int) -> dict:
    from diffusers import DDIMScheduler

    from dq.distill.bkd import BlockDistiller, DistillConfig, param_groups
    from dq.models.load import build_tiny
    from dq.models.quantize import QuantConfig, build_student

    logging.getLogger("dq.models.quantize").setLevel(logging.ERROR)
    torch.manual_seed(0)
    teacher = build_tiny(arch).unet
    c = teacher.config
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(100)
    ts = sched.timesteps
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=tuple(ts.tolist()))
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size)
    t = ts[torch.randint(0, len(ts), (batch,))]
    student, _ = build_student(copy.deepcopy(teacher), qcfg, [(x, t, None)], scaling="wd")
    student.train().requires_grad_(True)
    gran = "block" if mode == "bkd" else "model"
    module = BlockDistiller(student, teacher, DistillConfig(steps_per_block=iters, granularity=gran))
    opt = torch.optim.Adam(param_groups(student, module.cfg))
    batch_d = {"x": x, "t": t, "row": student.dq_step_index.rows(t)}
    base = rss_mb()
    times = []
    for k in range(len(module.student_blocks)):
        for _ in range(iters):
            t0 = time.perf_counter()
            loss = module.block_loss(batch_d, k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    return {"mode": mode, "blocks": len(module.student_blocks), "iters": len(times),
            "s_per_iter": statistics.mean(times[1:] or times),  # the first iteration warms up allocators "peak_mb": rss_mb(), "base_mb": base,
            "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--arch", default="ddpm_cifar10")
    ap.add_argument("--worker", choices=["bkd", "qat"])
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.arch, args.batch, args.iters)))
        return
    rows = {}
    for mode in ("bkd", "qat"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--arch", args.arch, "--batch",
                              str(args.batch), "--iters", str(args.iters)], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    b, q = rows["bkd"], rows["qat"]
    print(f"{args.arch} ({b['params_m']:.1f}M params), W4A4 + TPQ(T=100) + WD, batch {args.batch}, CPU "
          f"{torch.get_num_threads()} threads\n")
    print("| method | units | s / iteration | peak RSS (MB) | train peak above base (MB) |")
    print("|---|---|---|---|---|")
    for name, r in (("BKD (block-wise)", b), ("full-model QAT", q)):
        print(f"| {name} | {r['blocks']} | {r['s_per_iter']:.2f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} |")
    print(f"\nratio BKD / full-model QAT: peak RSS {b['peak_mb'] / q['peak_mb']:.2f}, "
          f"train peak {(b['peak_mb'] - b['base_mb']) / (q['peak_mb'] - q['base_mb']):.2f}, "
          f"time per iteration {b['s_per_iter'] / q['s_per_iter']:.2f}")


if __name__ == "__main__":
    main()
