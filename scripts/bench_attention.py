"""The fused quantized-attention kernel (dq::qattention) alone, on the attention shapes of the benchmark's models,
next to torch's SDPA in bfloat16 (which quantizes nothing) and, with --against, the kernel of another git
revision: interleaved round by round in one process, medians and the paired per-round ratio. Prints a table.

    python scripts/bench_attention.py                       # this checkout's kernel vs SDPA
    python scripts/bench_attention.py --against c523caa     # ... and vs the kernel at that revision (bitwise check)

Operands are random integers of 8-bit grids (the kernel's time does not depend on their values).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dq.quant.qattention as qa
from dq.errors import DQError, run_script
from dq.machine import cpu as cpu_info

ROOT = Path(__file__).resolve().parents[1]
# name → (batch, heads, queries, keys, head dim): the attention calls of the benchmark's cells
SHAPES = {"digits b250, 8×8": (250, 4, 64, 64, 16), "digits b250, 4×4": (250, 4, 16, 16, 16),
          "ddpm_cifar10 b16, 16×16": (16, 1, 256, 256, 256), "dit_xl2 b2": (2, 16, 256, 256, 72)}


def source_at(rev: str) -> str:
    """The kernel's C++ source at git revision ``rev`` (dq/quant/qattention.cpp, or the SOURCE string of
    qattention.py where it lived before)."""
    def show(path: str) -> str | None:
        r = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None
    if (cpp := show("dq/quant/qattention.cpp")) is not None:
        return cpp
    py = show("dq/quant/qattention.py")
    if py is None or 'SOURCE = r"""\n' not in py:
        raise DQError(f"--against {rev}: no qattention kernel at that revision (git show failed or no SOURCE)")
    return py.split('SOURCE = r"""\n', 1)[1].split('"""', 1)[0]


def runner(kernel, amx: bool):
    """Call a loaded kernel as the op does: bfloat16 out, per-head scales."""
    def run(q, k, v, sc, pd, pz):
        b, h, n, dk = q.shape
        out = qa._empty(q, v, torch.bfloat16)
        kernel(q, k, v, sc, sc, pd, pz, out, b * h, h, n, k.shape[2], dk, v.shape[3], 255.0, int(amx), 1)
        return out
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", metavar="REV", help="also time the kernel at this git revision")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    kernel, amx = qa._kernel()
    from torch._inductor.codecache import CppPythonBindingsCodeCache  # heavy: after the arguments are checked
    rows = {"dq kernel": runner(kernel, amx)}
    if a.against:
        rows[f"dq kernel @ {a.against}"] = runner(CppPythonBindingsCodeCache.load_pybinding(list(qa.ARGS), source_at(a.against)), amx)
    info = cpu_info()
    print(f"## dq::qattention on {info['model']} ({', '.join(info['flags'])}), {a.threads} threads, {'AMX tiles' if amx else 'float loops'}\n")
    head = list(rows) + ["SDPA bf16"]
    print("| shape [B, H, n, s, d] | " + " | ".join(f"{r} (ms)" for r in head) + " | paired ratios |")
    print("|---" * (len(head) + 2) + "|")
    g = torch.Generator().manual_seed(0)
    for name, (b, h, n, s, d) in SHAPES.items():
        q, k, v = (torch.randint(-127, 128, (b, h, m, d), generator=g).bfloat16() for m in (n, s, s))
        sc, pd, pz = torch.full((h,), 1e-4), torch.full((h,), 1 / 255), torch.zeros(h)
        calls = {r: (lambda f=f: f(q, k, v, sc, pd, pz)) for r, f in rows.items()}
        qf, kf, vf = (t / 64 for t in (q, k, v))
        calls["SDPA bf16"] = lambda: F.scaled_dot_product_attention(qf, kf, vf)
        outs = {r: c() for r, c in calls.items()}
        if a.against and not torch.equal(outs["dq kernel"], outs[f"dq kernel @ {a.against}"]):
            raise DQError(f"{name}: this kernel's output differs from the one at {a.against}")
        ts: dict[str, list[float]] = {r: [] for r in calls}
        for _ in range(a.rounds):
            for r, c in calls.items():
                t0 = time.perf_counter()
                c()
                ts[r].append((time.perf_counter() - t0) * 1e3)
        ratios = [f"{r} / dq kernel {statistics.median(x / y for x, y in zip(ts[r], ts['dq kernel'])):.2f}"
                  for r in head[1:]]
        print(f"| {name} {[b, h, n, s, d]} | " + " | ".join(f"{statistics.median(ts[r]):.3f}" for r in head)
              + " | " + ", ".join(ratios) + " |")
    return 0


if __name__ == "__main__":
    run_script(main)
