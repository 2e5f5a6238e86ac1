"""Rows stored once per distinct value with an index per row: how a calibration set keeps its text
conditioning (dq.data.calibration)."""
from __future__ import annotations

import hashlib
from typing import Any

import torch


class IndexedRows:
    """N rows kept as the distinct ones plus an index: ``rows[i] == table[index[i]]``. A text-conditional
    calibration set repeats each prompt's encoding (77 × 768 floats for SD: 236 KB) over every input drawn
    from that prompt's trajectories; stored once per distinct encoding, 5,120 SD inputs hold the prompts'
    encodings and the empty prompt's instead of 1.2 GB."""

    def __init__(self, table: torch.Tensor, index: torch.Tensor) -> None:
        self.table, self.index = table, index

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return self.table[self.index[idx]]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.table.shape[1:])


class Dedup:
    """Collects rows, keeping each distinct one once (by content hash); ``rows()`` → IndexedRows."""

    def __init__(self) -> None:
        self.table: list[torch.Tensor] = []
        self.slot: dict[bytes, int] = {}
        self.index: list[int] = []

    def add(self, rows: torch.Tensor) -> None:
        for r in rows:
            key = hashlib.sha1(r.contiguous().numpy().tobytes()).digest() + str(tuple(r.shape)).encode()
            if key not in self.slot:
                self.slot[key] = len(self.table)
                self.table.append(r.clone())
            self.index.append(self.slot[key])

    def rows(self, order: torch.Tensor) -> IndexedRows:
        return IndexedRows(torch.stack(self.table), torch.tensor(self.index, dtype=torch.long)[order])
