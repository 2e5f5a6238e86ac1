"""Continuous per-step activation parameters: Δ_x(t) = Δ_shared · exp(r(t)), z_x(t) = z_shared + o(t),
with r and o piecewise linear in the raw timestep t over K knots (torch only).

The paper's TPQ (method.md §3) learns a free table row per sampler step; with a batch spread over T
steps each row sees few samples per update. Here every sample of a batch trains the shared
parameters and the two knots around its timestep, so the form learns from fewer samples, and it is
defined at any t — a student sampled with another schedule reads it at the new timesteps
(``dq.quant.retarget``), no table interpolation needed.

K = T (knots at the trained timesteps) reproduces the calibrated per-step table (up to float
rounding of exp/log); K = 1 calibrates and behaves exactly as one shared table. Knots lie evenly in
raw t between the smallest and the largest trained timestep; outside, r and o are constant.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dq.quant.act_quantizer import TemporalActQuantizer
from dq.quant.fake_quant import DELTA_MIN


def knot_positions(timesteps: Tensor, k: int) -> Tensor:
    """K knot positions in raw t (float64, ascending): the timesteps themselves for K = T, else evenly spaced."""
    t = torch.sort(timesteps.double()).values
    if k == t.numel():
        return t
    if k == 1:
        return t[:1].clone()
    return torch.linspace(float(t[0]), float(t[-1]), k, dtype=torch.float64)


def hat_weights(knots: Tensor, t: Tensor) -> Tensor:
    """[len(t), K] weights of the piecewise-linear interpolation at ``t`` (each row sums to 1; clamped ends)."""
    k = knots.numel()
    if k == 1:
        return torch.ones(t.numel(), 1, dtype=knots.dtype, device=t.device)
    tc = t.to(knots.dtype).clamp(knots[0], knots[-1])
    hi = torch.searchsorted(knots, tc).clamp(1, k - 1)
    lo = hi - 1
    w = (tc - knots[lo]) / (knots[hi] - knots[lo])
    out = torch.zeros(t.numel(), k, dtype=knots.dtype, device=t.device)
    out.scatter_(1, lo[:, None], (1 - w)[:, None])
    out.scatter_add_(1, hi[:, None], w[:, None])
    return out


class KnotActQuantizer(TemporalActQuantizer):
    """A TemporalActQuantizer whose rows come from the knot form instead of free table rows.

    Parameters: ``delta``, ``zero_point`` [1] or [1, H] (the shared part), ``log_scale`` and
    ``zp_offset`` [K] or [K, H] (r and o at the knots); buffer ``knot_t`` [K] (raw t of the knots).
    Rows of a batch are turned into raw timesteps through the model's StepIndex.
    """

    def __init__(self, bits: int, num_steps: int, knots: Tensor, heads: int | None = None, head_axis: int = 1,
                 lsq_grad_scale: bool = False) -> None:
        super().__init__(bits, 1, heads=heads, head_axis=head_axis, lsq_grad_scale=lsq_grad_scale)
        self.num_steps = num_steps  # rows of the step index (the sampler's steps)
        k = knots.numel()
        shape = (k,) if heads is None else (k, heads)
        self.register_buffer("knot_t", knots.double().clone())
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.zp_offset = nn.Parameter(torch.zeros(shape))
        # whether this quantizer's knots are those of ``StepIndex.hat`` (set by a runtime that computes the
        # weights once per call for every quantizer; dq.quant.compiled)
        self.shared_hat = False

    @property
    def num_knots(self) -> int:
        return self.knot_t.numel()

    def _raw_t(self, rows: Tensor) -> Tensor:
        si = self._step_index
        if si is None or si.timesteps.numel() == 0:
            raise RuntimeError("KnotActQuantizer needs the model's StepIndex with the sampler's timesteps")
        return si.timesteps[rows]

    def start_calibration(self, samples_per_row: int = 0, seed: int = 0, pooled: bool = False) -> None:
        super().start_calibration(samples_per_row, seed, pooled or self.num_knots == 1)  # K = 1: one shared table

    def _row_params(self, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        base_d = self.delta.clamp_min(DELTA_MIN)
        if rows is None:
            return base_d[:1], self.zero_point[:1]
        si = self._step_index  # the call's weights, when a runtime computed them once for every quantizer
        shared = si.hat if self.shared_hat and si is not None else None
        w = hat_weights(self.knot_t, self._raw_t(rows)) if shared is None else shared
        w = w.to(self.log_scale.dtype)  # [B', K]
        return base_d * torch.exp(w @ self.log_scale), self.zero_point + w @ self.zp_offset  # [B'] or [B', H]

    def _log_curve(self) -> tuple[Tensor, Tensor]:
        return self.log_scale, self.zp_offset  # r and o at the evenly spaced knots

    @torch.no_grad()
    def _load_tables(self, delta: Tensor, zero_point: Tensor) -> None:
        """Fit the knot form to calibrated per-step tables: Δ_shared = their geometric mean, z_shared the
        mean; r and o by least squares at the trained timesteps (exact interpolation for K = T)."""
        same = all(torch.equal(v, v[:1].expand_as(v)) for v in (delta, zero_point))
        if same:  # one pooled table (always for K = 1): take it as is, r = o = 0 exactly
            self.delta.copy_(delta[:1])
            self.zero_point.copy_(zero_point[:1])
            self.log_scale.zero_()
            self.zp_offset.zero_()
            return
        log_d = delta.clamp_min(DELTA_MIN).double().log()
        shared_log, shared_z = log_d.mean(0, keepdim=True), zero_point.double().mean(0, keepdim=True)
        rows = torch.arange(self.num_steps, device=delta.device)
        a = hat_weights(self.knot_t, self._raw_t(rows))  # [T, K]
        flat = lambda v: v.reshape(v.shape[0], -1)  # noqa: E731
        r = torch.linalg.lstsq(a, flat(log_d - shared_log)).solution
        o = torch.linalg.lstsq(a, flat(zero_point.double() - shared_z)).solution
        self.delta.copy_(shared_log.exp().reshape(self.delta.shape))
        self.zero_point.copy_(shared_z.reshape(self.zero_point.shape))
        self.log_scale.copy_(r.reshape(self.log_scale.shape))
        self.zp_offset.copy_(o.reshape(self.zp_offset.shape))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, knots={self.num_knots}, steps={self.num_steps}, enabled={self.enabled}"


def use_knots(model: nn.Module, k: int) -> int:
    """Replace every per-step TemporalActQuantizer of a prepared model by a KnotActQuantizer with ``k``
    knots over the model's trained timesteps (in place, before calibration). Returns how many."""
    si = getattr(model, "dq_step_index", None)
    if si is None or not si.map_calls:
        raise ValueError("use_knots needs a prepared model with per-step tables (not shared tables)")
    steps = si.timesteps.numel()
    if not 1 <= k <= steps:
        raise ValueError(f"tpq_knots={k} must be in 1..{steps} (the number of sampler steps)")
    knots = knot_positions(si.timesteps, k)
    swaps = [(name, m) for name, m in model.named_modules()
             if type(m) is TemporalActQuantizer and m.num_steps > 1]
    for name, old in swaps:
        parent_name, _, attr = name.rpartition(".")
        new = KnotActQuantizer(old.bits, old.num_steps, knots, old.heads, old.head_axis, old.lsq_grad_scale)
        new.to(device=old.delta.device)  # knot_t stays float64 (raw timesteps exact in any model dtype)
        for p in (new.delta, new.zero_point, new.log_scale, new.zp_offset):
            p.data = p.data.to(old.delta.dtype)
        new.set_step_index(si)
        new.enabled = old.enabled
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return len(swaps)
