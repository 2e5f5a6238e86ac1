"""The compiled integer runtime: a prepared int8 model's forward, traced once by ``torch.compile``
(inductor, weights frozen) with the table row of the call's timestep as a graph input. Torch only.

Why compile: an int8 layer is fast only if nothing around its kernel is slow. Eager PyTorch runs one
pass per elementwise op (GroupNorm, SiLU, the quantization x → x_q, residual adds) and one Python
call per op; inductor fuses the quantization into the kernel that produced x (one pass writes the
uint8 codes) and removes the Python, while the convolutions and matmuls stay on oneDNN's u8 × s8
kernels (the ops ``dq::qconv2d`` / ``dq::qlinear`` of dq.quant.int8, which inductor calls as they are).

Per-step (TPQ) parameters stay runtime inputs: the row is an argument of the graph and each layer
gathers its (Δx, zx) from its table in the graph, so one graph serves every step of every schedule the
tables were moved to. A call whose samples sit at different steps runs the same int8 layers eagerly,
each step's samples with their own row (the graph takes one row per call). Compiled graphs are kept by
inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``), so a second process compiles in seconds.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dq.quant import cpp_kernel, groupnorm, qattention
from dq.quant.groupnorm import use_channels_last_groupnorm
from dq.quant.int8 import Int8Layer, _Int8Base
from dq.quant.knots import KnotActQuantizer, hat_weights


# inductor's per-call checks of every buffer's size, stride and alignment in the graph's Python wrapper: ~780 lines
# run per digits call (a W4A4 digits b250 call 66.9 → 63.7 ms without them, AMX Xeon). dynamo's guards already
# check the graph's inputs, and the buffers inside are inductor's own.
# GroupNorm's statistics in two passes over each (sample, group) — mean, then Σ(x − mean)² — instead of Welford's
# one-pass update, which costs several times the arithmetic per element: inductor picks two passes only up to 1024
# elements per group on CPU, and a group of the digits UNet holds 3,072 (a group's values stay in L1 for the
# second pass). Both are exact to float rounding.
OPTIONS = {"size_asserts": False, "alignment_asserts": False, "cpp.use_two_step_variance_threshold": 1 << 24,
           # no guards on the modules' attributes (6,803 of a digits graph's 7,219): a runtime's model is not changed
           # once it runs. Each runtime, and each table version of it, has its own graph instead (_Step's token).
           "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
_TOKENS = itertools.count()


class _Step(nn.Module):
    """The traced unit: (row, the model's arguments) → its output. ``knots``: the knots every KnotActQuantizer
    of the model shares (their interpolation weights are computed once per call, not once per quantizer), or None."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any], knots: Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.eager = forward
        self.knots = knots

    def forward(self, row: Tensor, token: str, *args: Any, **kwargs: Any) -> Any:
        if not token:  # guarded on (a string, never made dynamic): without module guards, what tells models apart
            raise ValueError("a compiled step needs its runtime's token")
        si = self.model.dq_step_index
        si.current = row  # what the pre-forward hook set, now a graph input
        if self.knots is not None:
            si.hat = hat_weights(self.knots, si.timesteps[row])
        out = self.eager(*args, **kwargs)
        si.hat = None
        return out


def shared_knots(model: nn.Module) -> Tensor | None:
    """The knots of the model's KnotActQuantizers when they all have the same ones (then marked to read
    ``StepIndex.hat``); None otherwise (each computes its own weights)."""
    knotted = [m for m in model.modules() if isinstance(m, KnotActQuantizer)]
    shared = bool(knotted) and all(torch.equal(m.knot_t, knotted[0].knot_t) for m in knotted)
    for m in knotted:
        m.shared_hat = shared
    return knotted[0].knot_t if shared else None


def _as_float(out: Any) -> Any:
    """The model's output (a tensor, a tuple or a diffusers output with ``sample``) in float32."""
    if isinstance(out, Tensor):
        return out.float()
    if isinstance(out, tuple):
        return (out[0].float(), *out[1:])
    out.sample = out.sample.float()
    return out


class CompiledForward:
    """Replaces ``model.forward`` (a prepared model with int8 layers and ``dq_step_index``): single-row
    calls run the compiled graph, mixed-row calls the eager layers. Install with :func:`compile_int8`."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any], dtype: torch.dtype) -> None:
        self.model = model
        self.eager = forward
        self.dtype = dtype
        self._graph: Callable[..., Any] | None = None
        self._key: tuple | None = None
        self._token = ""

    def _compiled(self) -> Callable[..., Any]:
        t = self.model.dq_step_index.timesteps  # tables moved to another schedule (retarget): trace again
        key = (t.data_ptr(), t._version, t.numel())
        if self._graph is None or key != self._key:
            self._graph = torch.compile(_Step(self.model, self.eager, shared_knots(self.model)), options=OPTIONS)
            self._key = key
            self._token = f"dq-{next(_TOKENS)}"
        return self._graph

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows = self.model.dq_step_index.current
        if rows is not None and rows.numel() > 1:
            return _as_float(self.eager(*args, **kwargs))
        row = torch.zeros(1, dtype=torch.long) if rows is None else rows.reshape(1)
        try:
            with torch.no_grad():
                graph = self._compiled()
                return _as_float(graph(row, self._token, *args, **kwargs))
        finally:
            self.model.dq_step_index.hat = None  # also when the call failed: the next call must not read it


def compile_int8(model: nn.Module, dtype: torch.dtype = torch.float32) -> CompiledForward:
    """Run ``model`` (prepared, its quantized layers swapped by ``dq.quant.int8.to_int8``) through the
    compiled graph from its next call on; returns the installed forward. ``dtype``: what the integer
    kernels write, and so the dtype of the float work between them (bfloat16 halves its memory traffic
    where the CPU computes in it); inputs and the output stay float32."""
    for m in model.modules():
        if isinstance(m, _Int8Base):
            m.out_dtype = dtype
        if isinstance(m, Int8Layer) and m.lowrank:  # the float branch's weights in that dtype once, not per call
            m.down, m.up = m.down.to(dtype), m.up.to(dtype)
    use_channels_last_groupnorm(model)  # the integer kernels write channels-last: GroupNorm statistics for that layout
    cpp_kernel.prebuild(qattention.KERNEL, groupnorm.KERNEL)  # while the first call traces the graph
    fwd = CompiledForward(model, model.forward, dtype)
    model.forward = fwd
    return fwd
