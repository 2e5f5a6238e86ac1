"""Move a student's per-step activation tables to another sampler schedule (torch only).

TPQ tables (method.md §3) hold one (Δ, z) per raw timestep the student was trained at. Sampling with
another step count or sampler calls the model at other raw timesteps; :func:`retarget` gives every
new timestep its parameters:

- **exact**: a trained timestep keeps its row, bit for bit;
- **interpolated**: between two trained timesteps t0 < t < t1, the quantization range endpoints
  lo = −zΔ and hi = (2^b − 1 − z)Δ are interpolated linearly in raw t, and (Δ, z) recomputed from
  them (interpolating Δ and z separately would move the range in a way neither neighbour had);
- **clamped**: outside the trained range, the nearest end row is copied.

Shared tables (one row for all steps) need nothing and are left as they are; the knot form
(``dq.quant.knots``) is defined at every t and only learns the new timesteps (clamped outside its knots).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dq.quant.act_quantizer import TemporalActQuantizer
from dq.quant.fake_quant import DELTA_MIN, qmax_of
from dq.quant.knots import KnotActQuantizer


@dataclass
class StepMapping:
    """How each new raw timestep got its parameters (recorded in results.json)."""

    trained: list[int]
    new: list[int]
    exact: list[int] = field(default_factory=list)
    interpolated: list[int] = field(default_factory=list)
    clamped: list[int] = field(default_factory=list)
    continuous: bool = False  # knot-form quantizers (dq.quant.knots) read the new timesteps directly

    def summary(self) -> str:
        return (("knot form read at the new timesteps; " if self.continuous else "") + f"tables moved from {len(self.trained)} to {len(self.new)} steps: {len(self.exact)} exact, "
                f"{len(self.interpolated)} interpolated in raw t, {len(self.clamped)} clamped to the trained range "
                f"{min(self.trained)}..{max(self.trained)}")


def plan(trained: Sequence[int], new: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, StepMapping]:
    """(lower row [T'], upper row [T'], weight of the upper row [T'] float64, mapping) for each new timestep."""
    tr = torch.as_tensor(list(trained), dtype=torch.long)
    nw = torch.as_tensor(list(new), dtype=torch.long)
    if tr.numel() == 0 or nw.numel() == 0:
        raise ValueError("both schedules need at least one timestep")
    if torch.unique(nw).numel() != nw.numel():
        raise ValueError(f"new timesteps must be unique, got {nw.tolist()}")
    sorted_t, order = torch.sort(tr)
    pos = torch.searchsorted(sorted_t, nw)                      # first trained t >= new t
    hi = pos.clamp(max=tr.numel() - 1)
    lo = (pos - 1).clamp(min=0)
    exact = sorted_t[hi] == nw
    lo = torch.where(exact, hi, lo)
    below, above = nw < sorted_t[0], nw > sorted_t[-1]
    lo = torch.where(below, 0, torch.where(above, tr.numel() - 1, lo))
    hi = torch.where(below, 0, torch.where(above, tr.numel() - 1, hi))
    span = (sorted_t[hi] - sorted_t[lo]).double()
    w = torch.where(span > 0, (nw - sorted_t[lo]).double() / span.clamp(min=1), torch.zeros_like(span))
    m = StepMapping([int(t) for t in tr], [int(t) for t in nw])
    for t, e, c in zip(nw.tolist(), exact.tolist(), (below | above).tolist()):
        (m.exact if e else m.clamped if c else m.interpolated).append(int(t))
    return order[lo], order[hi], w, m


@torch.no_grad()
def _resample(q: TemporalActQuantizer, lo: Tensor, hi: Tensor, w: Tensor) -> None:
    qmax = qmax_of(q.bits)
    d, z = q.delta.detach(), q.zero_point.detach()
    zc = torch.round(z).clamp(0, qmax)                          # the grid the forward pass uses
    lo_end, hi_end = (-zc * d).double(), ((qmax - zc) * d).double()
    wv = w.view(-1, *([1] * (d.ndim - 1)))
    a = lo_end[lo] * (1 - wv) + lo_end[hi] * wv
    b = hi_end[lo] * (1 - wv) + hi_end[hi] * wv
    nd = ((b - a) / qmax).clamp(min=DELTA_MIN)
    nz = (-a / nd).round().clamp(0, qmax)
    same = (lo == hi).view_as(wv).expand_as(nd)                 # exact or clamped: copy the row bit for bit
    new_d = torch.where(same, d[lo], nd.to(d.dtype))
    new_z = torch.where(same, z[lo], nz.to(z.dtype))
    q.delta = nn.Parameter(new_d.contiguous(), requires_grad=q.delta.requires_grad)
    q.zero_point = nn.Parameter(new_z.contiguous(), requires_grad=q.zero_point.requires_grad)
    q.num_steps = new_d.shape[0]


def retarget(model: nn.Module, new_timesteps: Sequence[int]) -> StepMapping | None:
    """Give a prepared student one table row per raw timestep of ``new_timesteps`` (in calling order),
    in place. Returns the mapping, or None for shared tables (nothing to move)."""
    si = getattr(model, "dq_step_index", None)
    if si is None:
        raise ValueError("retarget needs a prepared student (dq.models.student.prepare)")
    trained = [int(t) for t in si.timesteps]
    if not trained or not si.map_calls:  # shared tables: timestep-agnostic
        return None
    lo, hi, w, mapping = plan(trained, new_timesteps)
    for m in model.modules():
        if isinstance(m, KnotActQuantizer):  # the continuous form is defined at any t: nothing to resample
            m.num_steps = len(new_timesteps)
            mapping.continuous = True
        elif isinstance(m, TemporalActQuantizer) and m.num_steps > 1:
            if m.num_steps != len(trained):
                raise ValueError(f"a quantizer has {m.num_steps} rows but the step index {len(trained)}")
            _resample(m, lo, hi, w)
    si.timesteps = torch.as_tensor(list(new_timesteps), dtype=torch.long, device=si.timesteps.device)
    return mapping
