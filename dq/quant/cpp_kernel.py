"""dq's hand-written C++ kernels (dq/quant/*.cpp), built once per process by inductor's C++ toolchain — the compiler
``runtime=compiled`` already needs, with the flags of the CPU's vector ISA; its on-disk cache keeps the builds —
through ``CppPythonBindingsCodeCache``, a torch-internal API (fine while torch is pinned to one version). Torch only.

Builds run on one background thread, started by :func:`prebuild`: a build is mostly the C++ compiler in a child
process (and, on a cold cache, inductor's probes of the vector ISA, about 15 s on 2 cores), so it overlaps with what
the caller does next — tracing the graph that will call the kernels. :func:`load` waits for its build."""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

Kernel = tuple[str, tuple[str, ...]]  # (name of dq/quant/<name>.cpp, the C argument types of its ``kernel``)
_LOCK = threading.Lock()
_BUILDS: dict[Kernel, Future] = {}
_POOL: ThreadPoolExecutor | None = None


def _build(name: str, args: tuple[str, ...]) -> Any:
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    return CppPythonBindingsCodeCache.load_pybinding(list(args), (Path(__file__).parent / f"{name}.cpp").read_text())


def prebuild(*kernels: Kernel) -> None:
    """Start building ``kernels`` in the background, in order (each once per process)."""
    global _POOL
    # imported here, on the caller's thread: module imports running on two threads at once can deadlock
    import torch._inductor.codecache  # noqa: F401  (heavy: on first use)

    with _LOCK:
        for key in kernels:
            if key not in _BUILDS:
                _POOL = _POOL or ThreadPoolExecutor(1, thread_name_prefix="dq-cpp-build")
                _BUILDS[key] = _POOL.submit(_build, *key)


def load(name: str, args: tuple[str, ...]) -> Any:
    """The function ``kernel`` of dq/quant/<name>.cpp, its C argument types ``args``, as a Python callable."""
    prebuild((name, args))
    return _BUILDS[(name, args)].result()
