"""Block inputs of the whole calibration set, computed once per block instead of once per step.

Training block k needs, for every batch, the teacher's state after blocks 0..k−1 (to compute the
target) and the student's (its input). Both prefixes are frozen while block k trains (finished
blocks never train again), so recomputing them every step — k − 1 extra block forwards per chain
per step — is waste. This cache holds both chains' states for all N calibration inputs and moves
them one block forward when the curriculum does: one pass over the set per block, in fixed chunks
(so a resumed run rebuilds exactly the same tensors). When the states would exceed ``budget_mb``,
the cache stays off and the caller recomputes the prefixes, as before.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from dq.models.blocks import Block, cat_states, index_state, state_nbytes
from dq.quant.prepare import rows_of

log = logging.getLogger("dq")
CHUNK = 256


class PrefixCache:
    def __init__(self, inputs: dict[str, torch.Tensor], initial_state: Any, student: torch.nn.Module,
                 student_blocks: list[Block], teacher_blocks: list[Block], with_student: bool,
                 budget_mb: float) -> None:
        """inputs: the whole calibration set ({"x", "t"(, "cond")}); initial_state(x, t, cond) → block 0's input."""
        self.inputs, self.initial_state, self.student = inputs, initial_state, student
        self.blocks = {"teacher": teacher_blocks, **({"student": student_blocks} if with_student else {})}
        self.budget = budget_mb * 2**20
        self.enabled = budget_mb > 0
        self.upto = -1                  # states are the outputs of blocks 0..upto
        self.states: dict[str, Any] = {}

    def _chunks(self) -> list[torch.Tensor]:
        return list(torch.arange(len(self.inputs["t"])).split(CHUNK))

    @torch.no_grad()
    def _advance(self, k: int, device: torch.device) -> None:
        """Make the states the outputs of blocks 0..k−1 (from scratch when the curriculum went back)."""
        if self.upto > k - 1:
            self.upto, self.states = -1, {}
        while self.upto < k - 1:
            j = self.upto + 1
            new: dict[str, Any] = {}
            for chain, blocks in self.blocks.items():
                parts = []
                for idx in self._chunks():
                    s = self._state(chain, idx, device)
                    t = self.inputs["t"][idx].to(device)
                    if chain == "student":
                        with self.student.dq_step_index.use(rows_of(self.student, t)):
                            s = blocks[j](s)
                    else:
                        s = blocks[j](s)
                    parts.append(s.detach())
                    if len(parts) == 1 and j == self.upto + 1:
                        need = state_nbytes(parts[0]) * len(self._chunks()) * len(self.blocks)
                        if need > self.budget:
                            log.info("prefix cache off from block %d: it would hold %.0f MB, over "
                                     "distill.cache_mb=%.0f; prefixes are recomputed every step", j, need / 2**20,
                                     self.budget / 2**20)
                            self.enabled, self.states = False, {}
                            return
                new[chain] = cat_states(parts)
            self.states, self.upto = new, j

    def _state(self, chain: str, idx: torch.Tensor, device: torch.device) -> Any:
        if self.upto < 0:
            cond = self.inputs.get("cond")
            return self.initial_state(self.inputs["x"][idx].to(device), self.inputs["t"][idx].to(device),
                                      None if cond is None else cond[idx].to(device))
        return index_state(self.states[chain], idx.to(device))

    def inputs_of(self, k: int, idx: torch.Tensor, device: torch.device) -> dict[str, Any] | None:
        """{"teacher": state, "student": state} at the input of block k for samples ``idx``, or None when off."""
        if not self.enabled:
            return None
        self._advance(k, device)
        if not self.enabled:
            return None
        return {chain: self._state(chain, idx, device) for chain in self.blocks}
