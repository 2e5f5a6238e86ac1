"""The machine a number came from: CPU model and the ISA flags that pick the kernels, torch's CPU capability,
the oneDNN implementation its int8 and bf16 kernels actually ran (ONEDNN_VERBOSE), threads, GPU.

Different vector units run different kernels, which round differently: the same seed-0 run is bit-identical
on the same machine and thread count, and can differ on another CPU (a different student, a different FID).
So results.json and every benchmark record this next to their numbers.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")

ISA_PROBE = """
import torch
from dq.quant.onednn_ops import qconv2d, qlinear
x = torch.randint(0, 16, (2, 64, 8, 8), dtype=torch.uint8)
w = torch.randint(-8, 8, (64, 64, 3, 3), dtype=torch.int8)
s, z = torch.tensor([0.1]), torch.tensor([3])
qconv2d(x, s, z, w, torch.rand(64), torch.zeros(64, dtype=torch.long), None, [1, 1], [1, 1], [1, 1],
        torch.float32)
qlinear(x.reshape(-1, 64), s, z, w[:, :, 0, 0].contiguous(), torch.rand(64), torch.zeros(64, dtype=torch.long), None,
        torch.float32)
with torch.autocast("cpu", dtype=torch.bfloat16):
    torch.nn.functional.conv2d(torch.randn(2, 64, 8, 8), torch.randn(64, 64, 3, 3), padding=1)
torch.nn.functional.conv2d(torch.randn(2, 64, 8, 8), torch.randn(64, 64, 3, 3), padding=1)
"""


def cpu() -> dict:
    """CPU model, the ISA flags that decide the kernels, torch's CPU capability and version."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = set((re.search(r"flags\s*:\s*(.*)", text) or re.search("()", "")).group(1).split())
    return {"model": model.group(1).strip() if model else platform.processor() or platform.machine(),
            "flags": [f for f in FLAGS if f in flags], "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def slug(info: dict) -> str:
    """A folder name for results of this CPU: its model and whether it has AMX."""
    amx = "amx" if "amx_int8" in info["flags"] else "noamx"
    return re.sub(r"[^a-z0-9]+", "-", f"{info['model']} {amx}".lower()).strip("-")


@functools.cache
def onednn_isa() -> dict:
    """The implementation oneDNN picked for an int8 conv / matmul and a bf16 / f32 conv on this machine, from
    ONEDNN_VERBOSE=1 of a fresh process (a few seconds), kept per CPU and torch version in the user's cache
    (``~/.cache/dq/onednn-<cpu>-<torch>.json``, plain JSON)."""
    info = cpu()
    cache = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dq"
             / f"onednn-{slug(info)}-{re.sub(r'[^a-z0-9.]+', '-', info['torch'].lower())}.json")
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    impl = _probe()
    if impl and "error" not in impl:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(impl))
        except OSError:
            pass
    return impl


def _probe() -> dict:
    try:
        out = subprocess.run([sys.executable, "-c", ISA_PROBE], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "ONEDNN_VERBOSE": "1"}).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e).splitlines()[0]}
    impl = {}
    for line in out.splitlines():
        f = line.split(",")
        if len(f) > 6 and f[0] == "onednn_verbose" and "exec" in f:
            i = f.index("exec")
            kind, name, src = f[i + 2], f[i + 3], f[i + 5] if len(f) > i + 5 else ""
            dt = "int8" if "u8" in src or "s8" in src else "bf16" if "bf16" in src else "f32"
            if kind in ("convolution", "matmul", "inner_product"):
                impl.setdefault(f"{kind} {dt}", name)
    return impl


def describe(with_onednn: bool = True) -> dict:
    """Everything above plus the thread count and the GPU, for results.json (``machine``)."""
    info = {**cpu(), "threads": torch.get_num_threads()}
    if with_onednn:
        info["onednn"] = onednn_isa()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def code_version() -> dict:
    """The dq source a result came from: git commit and whether the work tree had changes (``None`` outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        return {"commit": head.stdout.strip(), "dirty": tree_dirty(root)}
    except (OSError, subprocess.SubprocessError):  # no git, a timeout, a failed status
        return {"commit": None, "dirty": None}


def tree_dirty(root: Path) -> bool:
    """Whether tracked files under ``root`` differ from HEAD. Documentation (``docs/``, ``*.md``) does not count:
    it cannot change a result, and the benchmarks write their reports there (a chain of bench runs would
    otherwise mark every run after the first)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs",
                          ":(exclude)*.md"], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    return bool(out.stdout.strip())

