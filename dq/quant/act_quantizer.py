"""Temporal Parallel activation quantizer (method.md §3): one (Δ, z) per sampling step, and per head.

Every parameter is created in ``__init__``; calibration statistics and the step-index reference are
plain attributes, never in the state_dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dq.quant.fake_quant import DELTA_MIN, check_bits, fake_quant, fake_quant_nograd, minmax_params, qmax_of
from dq.quant.steps import StepIndex

CALIBRATION_METHODS = ("minmax", "percentile", "mse")


@dataclass
class _CalibState:
    """Streaming per-row statistics. Rows are flattened (step, head) pairs: r = t·H + h."""

    count: Tensor  # [T] samples seen per step
    lo: Tensor  # [T·H] running min
    hi: Tensor  # [T·H] running max
    k: int  # K: values kept per row for percentile / mse (0: min/max only)
    cands: list  # per observed batch: [B·H, K] values drawn uniformly from each (sample, head)
    cand_rows: list  # per observed batch: [B·H] their flattened rows
    generator: torch.Generator
    pooled: bool = False  # one row for all steps: every row is set to the statistics of all steps


class TemporalActQuantizer(nn.Module):
    """Activation fake quantizer with one (Δ, z) per sampling step — and per head if ``heads`` (TPQ).

    Tables ``delta`` and ``zero_point`` (both nn.Parameter) are [T] or [T, H]. Each sample of a batch
    is quantized with the row of its own step, read from the model's :class:`StepIndex`
    (``step_index.current``, LongTensor [B] or [1]); ``num_steps=1`` is the shared mode (one
    per-tensor quantizer, rows ignored).

    Args:
        bits: 2..8.
        num_steps: T (1 = shared tables).
        heads: H for per-head tables; then ``x.shape[head_axis] == H``.
        head_axis: axis of the heads in x (1 for the [B, H, N, d] layout).
        lsq_grad_scale: scale gradients of Δ, z by 1/sqrt(numel_per_row · qmax).
    """

    def __init__(
        self,
        bits: int,
        num_steps: int = 1,
        heads: int | None = None,
        head_axis: int = 1,
        lsq_grad_scale: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be a positive int (1 = shared tables)")
        if heads is not None and (not isinstance(heads, int) or heads < 1):
            raise ValueError(f"heads={heads!r} must be a positive int or None")
        if head_axis < 1:
            raise ValueError(f"head_axis={head_axis!r} must be ≥ 1 (axis 0 is the batch)")
        self.num_steps = num_steps
        self.heads = heads
        self.head_axis = head_axis
        self.lsq_grad_scale = lsq_grad_scale
        self.enabled = True
        shape = (num_steps,) if heads is None else (num_steps, heads)
        self.delta = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.zero_point = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self._calib: _CalibState | None = None
        object.__setattr__(self, "_step_index", None)  # plain reference: not a submodule, not in state_dict

    # ---------------------------------------------------------------- set-up
    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.delta.fill_(1.0)
            self.zero_point.zero_()

    def set_step_index(self, step_index: StepIndex | None) -> None:
        """Attach the model's single StepIndex (kept as a plain reference)."""
        object.__setattr__(self, "_step_index", step_index)

    @property
    def calibrating(self) -> bool:
        return self._calib is not None

    @property
    def has_observations(self) -> bool:
        """True while calibrating once at least one batch was recorded."""
        return self._calib is not None and bool((self._calib.count > 0).any())

    def cancel_calibration(self) -> None:
        """Leave calibration mode without touching the tables."""
        self._calib = None

    # ---------------------------------------------------------------- forward
    def _rows(self, x: Tensor) -> Tensor | None:
        """Rows of the batch: LongTensor [B] or [1]; None in shared mode."""
        if self.num_steps == 1 or (self._calib is not None and self._calib.pooled):
            return None
        si = self._step_index
        rows = si.current if si is not None else None
        if rows is None:
            raise RuntimeError(
                f"TemporalActQuantizer with {self.num_steps} per-step tables called with no step rows set: "
                "call the prepared UNet (its pre-forward hook maps `timestep` to rows) or wrap the call in "
                "`with unet.dq_step_index.use(rows):`"
            )
        if rows.numel() not in (1, x.shape[0]):
            raise ValueError(f"batch of {x.shape[0]} samples but {rows.numel()} step rows (expected {x.shape[0]} or 1)")
        return rows

    def _row_params(self, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """(Δ, z) of this batch's rows: [B'] or [B', H], B' ∈ {1, B} (a subclass may compute them)."""
        delta = self.delta.clamp_min(DELTA_MIN)
        if rows is None:
            return delta[:1], self.zero_point[:1]
        return delta[rows], self.zero_point[rows]

    def roughness(self) -> Tensor:
        """Σ of squared second differences along the steps of log Δ and of z (in steps of the integer grid):
        0 for curves linear in the step (and for shared tables). A smoothness penalty for training."""
        log_d, z = self._log_curve()
        if log_d.shape[0] < 3:
            return log_d.new_zeros(())
        return sum((v[2:] - 2 * v[1:-1] + v[:-2]).pow(2).sum() for v in (log_d, z))

    def _log_curve(self) -> tuple[Tensor, Tensor]:
        """The trainable per-step curves (log Δ, z) along the steps (a subclass: along its knots)."""
        return self.delta.clamp_min(DELTA_MIN).log(), self.zero_point

    def _table_shape(self) -> tuple[int, ...]:
        """Shape of the per-step tables calibration produces: [T] or [T, H]."""
        return (self.num_steps,) if self.heads is None else (self.num_steps, self.heads)

    def _load_tables(self, delta: Tensor, zero_point: Tensor) -> None:
        """Take calibrated per-step tables (shaped :meth:`_table_shape`)."""
        self.delta.copy_(delta)
        self.zero_point.copy_(zero_point)

    def _check_heads(self, x: Tensor) -> None:
        if self.heads is not None and (x.ndim <= self.head_axis or x.shape[self.head_axis] != self.heads):
            raise ValueError(
                f"expected {self.heads} heads on axis {self.head_axis}, got input of shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, ...] ([B, H, ...] with heads on ``head_axis``) → fake-quantized x, same shape.

        Disabled: identity. Calibrating: records per-row statistics and returns x unchanged.
        """
        if not self.enabled and self._calib is None:
            return x
        self._check_heads(x)
        rows = self._rows(x)
        if self._calib is not None:
            self._observe(x.detach(), rows)
            return x
        delta, zp = self._row_params(rows)
        shape = [delta.shape[0]] + [1] * (x.ndim - 1)
        if self.heads is not None:
            shape[self.head_axis] = self.heads
        delta, zp = delta.reshape(shape), zp.reshape(shape)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.delta.requires_grad or self.zero_point.requires_grad
        )
        if not needs_grad:
            return fake_quant_nograd(x, delta, zp, self.bits)
        g = None
        if self.lsq_grad_scale:
            per_row = x.numel() / x.shape[0] / (self.heads or 1)
            g = 1.0 / math.sqrt(per_row * qmax_of(self.bits))
        return fake_quant(x, delta, zp, self.bits, grad_scale=g)

    # ---------------------------------------------------------------- calibration
    def start_calibration(self, samples_per_row: int = 0, seed: int = 0, pooled: bool = False) -> None:
        """Enter calibration mode: forward records statistics per row and returns x unchanged.

        Args:
            samples_per_row: K, size of the uniform random subsample of values kept per row
                (per (step, head)) for ``percentile``/``mse``; 0 keeps only min/max.
                Memory: 2·T·H·K floats.
            seed: seed of the private generator drawing the subsample (the global RNG is untouched).
            pooled: pool the statistics of all steps into one row and give every row its parameters
                (per-step parameters that start as the shared table; training then separates them).
        """
        if samples_per_row < 0:
            raise ValueError(f"samples_per_row={samples_per_row} must be ≥ 0")
        dev, shape = self.delta.device, self._table_shape()
        shape = (1, *shape[1:]) if pooled else shape
        r = math.prod(shape)
        self._calib = _CalibState(
            count=torch.zeros(shape[0], dtype=torch.long, device=dev),
            lo=torch.full((r,), math.inf, device=dev),
            hi=torch.full((r,), -math.inf, device=dev),
            k=samples_per_row, cands=[], cand_rows=[],
            generator=torch.Generator(device=dev).manual_seed(seed), pooled=pooled,
        )

    @torch.no_grad()
    def _observe(self, x: Tensor, rows: Tensor | None) -> None:
        c = self._calib
        assert c is not None
        b = x.shape[0]
        h = self.heads or 1
        step = torch.zeros(b, dtype=torch.long, device=x.device) if rows is None else rows.expand(b)
        if self.heads is None:
            xs = x.reshape(b, 1, -1).float()
        else:
            xs = x.movedim(self.head_axis, 1).reshape(b, h, -1).float()
        flat = (step[:, None] * h + torch.arange(h, device=x.device)).reshape(-1)  # [B·H] flattened rows
        lo, hi = torch.aminmax(xs, dim=-1)
        c.lo.scatter_reduce_(0, flat, lo.reshape(-1), "amin")
        c.hi.scatter_reduce_(0, flat, hi.reshape(-1), "amax")
        c.count.index_add_(0, step, torch.ones_like(step))
        if c.k:
            pick = torch.randint(xs.shape[-1], (b, h, c.k), generator=c.generator, device=x.device)
            c.cands.append(xs.gather(-1, pick).reshape(b * h, c.k))
            c.cand_rows.append(flat)

    @staticmethod
    def _subsample(c: _CalibState, rows: int) -> Tensor:
        """[rows, K]: per row, K values drawn uniformly without replacement from all its candidates.

        Every (sample, head) contributed K values drawn uniformly from itself; each candidate gets an
        iid U(0,1) key and the K smallest keys of a row are kept — one sort by (row, key) at the end,
        not one per batch. Rows never observed stay 0 (the caller refills them from a nearest step).
        """
        out = torch.zeros(rows, c.k)
        if not c.cands:
            return out
        vals = torch.cat(c.cands).reshape(-1)
        row_id = torch.cat(c.cand_rows).repeat_interleave(c.k)
        keys = torch.rand(vals.numel(), generator=c.generator, device=vals.device, dtype=torch.float64)
        order = torch.argsort(row_id.double() + keys)  # grouped by row, random order within a row
        sorted_rows = row_id[order]
        counts = torch.bincount(sorted_rows, minlength=rows)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=vals.device) - starts[sorted_rows]
        keep = rank < c.k  # an observed row has >= K candidates (one sample gives K)
        out = out.to(vals.device)
        out[sorted_rows[keep], rank[keep]] = vals[order][keep]
        return out

    @torch.no_grad()
    def finish_calibration(
        self, method: str = "minmax", percentile: float = 99.99, mse_grid: int = 81
    ) -> Tensor:
        """Set the tables from the recorded statistics and leave calibration mode.

        Args:
            method: "minmax" (running min/max per row), "percentile" (the (100−p)-th and p-th
                percentiles of the kept subsample), or "mse" (clipping ratio r ∈ [0.2, 1] of the
                running min/max minimising ||Q(x) − x||² on the kept subsample, per row).
            percentile: p in (50, 100] for "percentile".
            mse_grid: number of clipping ratios tried by "mse".

        Returns:
            LongTensor of the steps never observed; their rows were filled from the nearest
            observed step (lower one on ties). The caller should report them.
        """
        c = self._calib
        if c is None:
            raise RuntimeError("finish_calibration called without start_calibration")
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"method={method!r}; valid choices are {CALIBRATION_METHODS}")
        observed = c.count > 0
        if not bool(observed.any()):
            raise RuntimeError("this quantizer observed no data during calibration (was its layer ever run?)")
        if method != "minmax" and c.k == 0:
            raise ValueError(f"method={method!r} needs start_calibration(samples_per_row > 0)")
        lo, hi = c.lo, c.hi
        values = self._subsample(c, c.lo.numel()) if method != "minmax" else None
        if method == "percentile":
            if not 50.0 < percentile <= 100.0:
                raise ValueError(f"percentile={percentile} must be in (50, 100]")
            q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], device=values.device)
            lo, hi = torch.quantile(values, q, dim=1)
        elif method == "mse":
            lo, hi = self._mse_range(values, lo, hi, mse_grid)
        delta, zp = minmax_params(lo, hi, self.bits)
        shape = self._table_shape()
        if c.pooled:  # the one pooled row, for every step
            delta, zp = delta.view(1, *shape[1:]).expand(shape), zp.view(1, *shape[1:]).expand(shape)
        delta, zp = delta.reshape(shape), zp.reshape(shape)
        missing = (~observed).nonzero().squeeze(1)
        if missing.numel():
            obs = observed.nonzero().squeeze(1)
            t = torch.arange(shape[0], device=obs.device)
            nearest = obs[(t[:, None] - obs[None, :]).abs().argmin(dim=1)]
            delta, zp = delta[nearest], zp[nearest]
        self._load_tables(delta, zp)
        self._calib = None
        return missing

    def _mse_range(self, values: Tensor, lo: Tensor, hi: Tensor, grid: int) -> tuple[Tensor, Tensor]:
        """Per row, the clipped range [r·lo, r·hi] minimising ||Q(x) − x||² (vectorised over rows)."""
        best_err = torch.full_like(lo, math.inf)
        best_r = torch.ones_like(lo)
        finite = torch.isfinite(lo)  # unobserved rows hold ±inf; they are refilled afterwards anyway
        lo0, hi0 = torch.where(finite, lo, 0.0), torch.where(finite, hi, 0.0)
        for r in torch.linspace(0.2, 1.0, grid).tolist():
            d, z = minmax_params(lo0 * r, hi0 * r, self.bits)
            err = (fake_quant_nograd(values, d[:, None], z[:, None], self.bits) - values).pow(2).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, r, best_r)
        return lo0 * best_r, hi0 * best_r

    def extra_repr(self) -> str:
        table = f"[{self.num_steps}]" if self.heads is None else f"[{self.num_steps}, {self.heads}]"
        return f"bits={self.bits}, table={table}, enabled={self.enabled}"
