"""glibc malloc settings for dq's entry points: keep freed memory for reuse instead of handing it back.

Every PyTorch op on CPU allocates its output. glibc serves blocks above its mmap threshold with fresh
mmap()s and trims the heap top eagerly, so a 16 MB activation is page-faulted in (and zeroed by the
kernel) on every call: 30,000–80,000 minor page faults per denoiser call of the embedded UNet at batch
250 (scripts/bench_allocator.py prints them). Raising the mmap threshold to glibc's maximum (32 MB) and
keeping freed memory (trim threshold 1 GiB, top pad 64 MB) makes them 0 and the FP teacher and the
fake-quant student 15–25% faster here (docs/speed.md). The cost: the process keeps up to ~1 GiB of freed
memory instead of returning it to the OS. This is the tuning PyTorch's CPU performance guide does with
jemalloc / tcmalloc, done with the allocator already in the process.

Applied by ``dq.cli.run`` (train.py, eval.py, export.py), not at import: a library user's process is
theirs. Skipped where a MALLOC_* variable is set (the user tuned it) or off glibc; ``DQ_MALLOC_TUNING=0``
turns it off. What was done is logged once and recorded in results.json (``allocator``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, 32 << 20), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 1 << 30),
            "M_TOP_PAD": (M_TOP_PAD, 64 << 20)}
STATE: dict = {"tuned": False, "reason": "not applied (dq.cli.run was not used)"}


def tune() -> dict:
    """Apply SETTINGS through mallopt once; returns (and keeps in STATE) what was done and why."""
    global STATE
    if STATE.get("tuned") or STATE.get("reason", "").startswith("skipped"):
        return STATE
    if os.environ.get("DQ_MALLOC_TUNING", "1") == "0":
        STATE = {"tuned": False, "reason": "skipped: DQ_MALLOC_TUNING=0"}
    elif any(k.startswith("MALLOC_") for k in os.environ):
        STATE = {"tuned": False, "reason": "skipped: MALLOC_* environment variables are set"}
    elif not sys.platform.startswith("linux") or not ctypes.util.find_library("c"):
        STATE = {"tuned": False, "reason": f"skipped: no glibc on {sys.platform}"}
    else:
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
        except (OSError, AttributeError):
            STATE = {"tuned": False, "reason": "skipped: this C library has no mallopt (not glibc)"}
        else:
            done = {name: value for name, (param, value) in SETTINGS.items() if mallopt(param, value) == 1}
            STATE = {"tuned": bool(done), "settings": done,
                     "reason": "glibc mallopt: reuse freed memory instead of page-faulting fresh mmaps (dq/allocator.py)"}
    return STATE


def release() -> bool:
    """Give freed memory back to the OS between phases: gc, then glibc's malloc_trim(0), which returns every
    free page of every arena (not only the heap top). With the settings above, the memory a phase freed would
    otherwise stay resident for the next one: the SD-1.5 dry run sat at 19.5 GB after distillation with
    ~8 GB of live models, and was killed in the scoring that followed (docs/scale.md). A no-op off glibc."""
    import gc

    gc.collect()
    if not sys.platform.startswith("linux") or not ctypes.util.find_library("c"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0))
    except (OSError, AttributeError):
        return False
