"""dq's hand-written C++ kernels (dq/quant/*.cpp), built once per process by inductor's C++ toolchain — the compiler
``runtime=compiled`` already needs, with the flags of the CPU's vector ISA; its on-disk cache keeps the builds —
through ``CppPythonBindingsCodeCache``, a torch-internal API (fine while torch is pinned to one version). Torch only."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


@functools.cache
def load(name: str, args: tuple[str, ...]) -> Any:
    """The function ``kernel`` of dq/quant/<name>.cpp, its C argument types ``args``, as a Python callable."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache  # heavy: on first use

    return CppPythonBindingsCodeCache.load_pybinding(list(args), (Path(__file__).parent / f"{name}.cpp").read_text())
