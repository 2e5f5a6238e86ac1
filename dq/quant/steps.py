"""Map raw sampler timesteps to rows of the per-step quantization tables (TPQ, method.md §3).

There is no hidden counter: the caller states the step of every sample of a batch, either with
``with step_index.use(rows):`` or through the model pre-forward hook of ``dq.quant.prepare.attach_step_index`` that
derives the rows from the ``timestep`` argument.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class StepIndex(nn.Module):
    """Lookup table raw timestep → row, plus the rows of the batch being computed.

    Args:
        timesteps: the raw timesteps of the sampler schedule, in row order (row i ↔ timesteps[i]);
            unique integers. May be empty for shared (timestep-agnostic) tables.
        map_calls: whether a model call must map its timestep to rows (False for shared tables,
            which are timestep-agnostic: the UNet hook then neither looks up nor checks timesteps).

    Attributes:
        timesteps: buffer LongTensor [T].
        current: LongTensor [B] (or [1], broadcast over the batch) of rows for the forward pass
            in progress, or None outside of one. Not part of the state_dict.
        hat: the interpolation weights [1, K] of ``current`` at the knots every KnotActQuantizer of the
            model shares, when a runtime computed them once for the call (dq.quant.compiled); else None.
    """

    def __init__(self, timesteps: Sequence[int] | Tensor, map_calls: bool = True) -> None:
        super().__init__()
        self.map_calls = map_calls
        t = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1)
        uniq, counts = torch.unique(t, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"timesteps must be unique, got duplicates {uniq[counts > 1].tolist()}; pass e.g. "
                "sorted(set(scheduler.timesteps.tolist()), reverse=True) — one table row per raw timestep"
            )
        self.register_buffer("timesteps", t)
        self.current: Tensor | None = None
        self.hat: Tensor | None = None
        self._saved: list[Tensor | None] = []

    def __len__(self) -> int:
        return self.timesteps.numel()

    def rows(self, raw_t: Tensor | int | float | Sequence[int]) -> Tensor:
        """Rows (LongTensor shaped like ``raw_t``, on the buffer's device) of the raw timesteps.

        Raises ValueError naming the raw timesteps not in the schedule (a silent row 0 would
        quantize that step with another step's parameters).
        """
        known = self.timesteps
        raw = torch.as_tensor(raw_t, device=known.device)
        if raw.is_floating_point():
            if not torch.equal(raw, raw.round()):
                raise ValueError(f"raw timesteps must be integers, got {raw.flatten().tolist()[:16]}")
            raw = raw.round()
        raw = raw.to(torch.long).contiguous()  # (a pipeline may pass an expanded view)
        if known.numel() == 0:
            raise ValueError("this StepIndex holds no timesteps (shared tables); there are no rows to look up")
        sorted_t, order = torch.sort(known)
        pos = torch.searchsorted(sorted_t, raw).clamp(max=known.numel() - 1)
        found = sorted_t[pos] == raw
        if not bool(found.all()):  # the one host sync per lookup; it is what makes the check possible
            bad = torch.unique(raw[~found]).tolist()
            raise ValueError(
                f"raw timestep(s) {bad} are not in the schedule of {known.numel()} steps "
                f"(known range {int(sorted_t[0])}..{int(sorted_t[-1])}); tables are tied to the sampler "
                "schedule given at prepare time"
            )
        return order[pos]

    def push(self, rows: Tensor | None) -> None:
        """Set ``current`` to ``rows``, remembering the previous value for :meth:`pop`."""
        self._saved.append(self.current)
        self.current = rows

    def pop(self) -> None:
        """Restore the value of ``current`` from before the matching :meth:`push`."""
        self.current = self._saved.pop() if self._saved else None

    @contextmanager
    def use(self, rows: Tensor) -> Iterator[Tensor]:
        """Context in which quantizers read ``rows`` (LongTensor [B] or [1]); restored on exit, also on error."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.timesteps.device).reshape(-1)
        n = max(len(self), 1)
        if bool(((rows < 0) | (rows >= n)).any()):  # one host sync; a bad index on GPU is a device assert
            raise ValueError(f"rows {rows.tolist()[:16]} out of range 0..{n - 1}")
        self.push(rows)
        try:
            yield rows
        finally:
            self.pop()

    def extra_repr(self) -> str:
        t = self.timesteps
        return (f"T={t.numel()}" + (f", timesteps={int(t[0])}..{int(t[-1])}" if t.numel() else "")
                + ("" if self.map_calls else ", map_calls=False"))
