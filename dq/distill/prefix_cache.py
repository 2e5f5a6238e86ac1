"""Block inputs of the whole calibration set, computed once per block instead of once per step.

Training block k needs, for every batch, the teacher's state after blocks 0..k−1 (to compute the
target) and the student's (its input). Both prefixes are frozen while block k trains (finished
blocks never train again), so recomputing them every step — k − 1 extra block forwards per chain
per step — is waste. This cache holds both chains' states for all N calibration inputs and moves
them one block forward when the curriculum does: one pass over the set per block, in fixed chunks
(so a resumed run rebuilds exactly the same tensors).

Where it is kept: in memory while both chains' states fit ``budget_mb``; beyond that, in memory-mapped
files within ``disk_mb`` (``distill.cache_disk_mb``: the same float32 values, so training is bitwise the
same; the kernel pages them in and out, so resident memory stays bounded by what the OS can spare);
beyond both, the cache goes off and the caller recomputes the prefixes every step (logged once).
At real size this decides the cost: DDPM CIFAR-10's 5,120 calibration inputs carry up to 3.5 MB of block
state each (the UNet's skip tensors), 35 GB for the two chains; SD-1.5's 352 GB (docs/scale.md).
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dq.models.blocks import Block, map_state, cat_states, index_state, state_nbytes
from dq.quant.prepare import rows_of

log = logging.getLogger("dq")
CHUNK = 256


class PrefixCache:
    """Student states after blocks 0..k−1 (the input of block k) and teacher states after blocks 0..k
    (their ``new`` outputs are block k's targets), for every calibration input. With
    ``teacher_input`` the student reads the teacher's states instead: teacher states after 0..k−1 are
    kept and targets are computed per step."""

    def __init__(self, inputs: dict[str, torch.Tensor], initial_state: Any, student: torch.nn.Module,
                 student_blocks: list[Block], teacher_blocks: list[Block], teacher_input: bool,
                 budget_mb: float, disk_mb: float = 0.0, spill_dir: str | None = None) -> None:
        """inputs: the whole calibration set ({"x", "t"(, "cond")}); initial_state(x, t, cond) → block 0's input."""
        self.inputs, self.initial_state, self.student = inputs, initial_state, student
        self.blocks = {"teacher": teacher_blocks, **({} if teacher_input else {"student": student_blocks})}
        self.ahead = {"teacher": 0 if teacher_input else 1, "student": 0}  # states after block k − 1 + ahead
        self.budget, self.disk_budget = budget_mb * 2**20, disk_mb * 2**20
        self.spill_dir = spill_dir
        self.on_disk: dict[str, bool] = {}
        self.enabled = budget_mb > 0 or disk_mb > 0
        self.upto = {chain: -1 for chain in self.blocks}  # each chain's states are the outputs of blocks 0..upto
        self.states: dict[str, Any] = {}
        self.reported = False

    def _chunks(self) -> list[torch.Tensor]:
        return list(torch.arange(len(self.inputs["t"])).split(CHUNK))

    @torch.no_grad()
    def _advance(self, chain: str, upto: int, device: torch.device) -> bool:
        """Make ``chain``'s states the outputs of blocks 0..upto (from scratch when the curriculum went
        back); False (and the cache off) when they would not fit the budget."""
        if self.upto[chain] > upto:
            self.upto[chain] = -1
            self.states.pop(chain, None)
        blocks = self.blocks[chain]
        while self.upto[chain] < upto:
            j = self.upto[chain] + 1
            chunks = self._chunks()
            parts, store = [], None
            for c, idx in enumerate(chunks):
                s = self._state(chain, idx, device)
                if chain == "student":
                    t = self.inputs["t"][idx].to(device)
                    with self.student.dq_step_index.use(rows_of(self.student, t)):
                        s = blocks[j](s)
                else:
                    s = blocks[j](s)
                s = s.detach()
                if c == 0:
                    where = self._where(chain, s, j)
                    if where is None:
                        return False
                    if where == "disk":
                        store = self._files(chain, j, s, len(self.inputs["t"]))
                if store is None:
                    parts.append(s)
                else:  # write this chunk's rows into the mapped files
                    lo = int(idx[0])
                    map_state(store, lambda v, lo=lo: v[0][lo:lo + len(v[1])].copy_(v[1].cpu()), [s])
            self.states[chain] = store if store is not None else cat_states(parts)
            self.upto[chain], self.on_disk[chain] = j, store is not None
        return True

    def _where(self, chain: str, first: Any, j: int) -> str | None:
        """"memory" or "disk" for both chains' states (estimated from this first chunk) plus the one being
        built, or None (and the cache off) when neither budget holds them."""
        need = state_nbytes(first) * len(self._chunks()) * (len(self.blocks) + 1)
        if need <= self.budget:
            return "memory"
        if need <= self.disk_budget:
            if not self.reported:
                log.info("prefix cache: %.0f MB of block states exceed distill.cache_mb=%.0f; kept in memory-mapped "
                         "files under %s (distill.cache_disk_mb=%.0f)", need / 2**20, self.budget / 2**20,
                         self.spill_dir or tempfile.gettempdir(), self.disk_budget / 2**20)
            return "disk"
        log.info("prefix cache off from block %d: it would hold %.0f MB, over distill.cache_mb=%.0f and "
                 "distill.cache_disk_mb=%.0f; prefixes are recomputed every step", j, need / 2**20,
                 self.budget / 2**20, self.disk_budget / 2**20)
        self.enabled, self.states = False, {}
        return None

    def _files(self, chain: str, j: int, first: Any, n: int) -> Any:
        """A state of ``n`` rows shaped like ``first``, each tensor in its own memory-mapped file. The file is
        unlinked at once: its space lives as long as the mapping, so nothing is left behind on a crash."""
        folder = Path(self.spill_dir or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)

        def alloc(v: list) -> torch.Tensor:
            fd, path = tempfile.mkstemp(prefix=f"dq-prefix-{chain}-{j}-", suffix=".bin", dir=folder)
            os.close(fd)
            shape = (n, *v[0].shape[1:])
            t = torch.from_file(path, shared=True, size=int(torch.Size(shape).numel()), dtype=v[0].dtype)
            os.unlink(path)
            return t.view(shape)
        return map_state(first, alloc)

    def _state(self, chain: str, idx: torch.Tensor, device: torch.device) -> Any:
        if self.upto[chain] < 0:
            cond = self.inputs.get("cond")
            return self.initial_state(self.inputs["x"][idx].to(device), self.inputs["t"][idx].to(device),
                                      None if cond is None else cond[idx].to(device))
        if self.on_disk.get(chain):
            return map_state(index_state(self.states[chain], idx.cpu()), lambda v: v[0].to(device))
        return index_state(self.states[chain], idx.to(device))

    def inputs_of(self, k: int, idx: torch.Tensor, device: torch.device) -> dict[str, Any] | None:
        """For block k and samples ``idx``: {"input": the student's input state, "target": the teacher's
        outputs of block k, or None (compute it)}; None when the cache is off."""
        if not self.enabled:
            return None
        for chain in self.blocks:
            if not self._advance(chain, k - 1 + self.ahead[chain], device):
                return None
        if not self.reported:
            total = sum(state_nbytes(s) for s in self.states.values())
            log.info("prefix cache: block inputs%s of %d calibration samples held in memory (%.0f MB)",
                     " and targets" if "student" in self.blocks else "", len(self.inputs["t"]), total / 2**20)
            self.reported = True
        teacher = self._state("teacher", idx, device)
        if "student" in self.blocks:
            return {"input": self._state("student", idx, device), "target": teacher.new}
        return {"input": teacher, "target": None}
