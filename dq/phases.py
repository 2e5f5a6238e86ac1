"""Wall time and peak memory per phase of a run, for results.json (``phases``) and docs/scale.md.

    phases = Phases()
    with phases("calibration_data"):
        ...
    phases.records  # {"calibration_data": {"seconds": 12.3, "peak_rss_mb": 5120.0}, ...}

Peak memory of a phase is the highest resident set size of the process *during that phase*: Linux keeps
the process's high-water mark (VmHWM) and resets it when "5" is written to /proc/self/clear_refs, so each
phase starts from the current RSS. Phases nest (the enclosing phase's peak includes its children's) and
repeat (seconds add up, the peak is the max). Where the reset is not possible (not Linux, or a kernel that
forbids it), peaks are the process's peak so far and ``peak_scope`` says "process" instead of "phase".
On CUDA the device's peak allocated memory per phase is recorded too (``peak_cuda_mb``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def rss_hwm_mb() -> float | None:
    """The process's resident-set high-water mark in MB (None where /proc is not there)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _marks() -> tuple[float, float]:
    """(RSS high-water mark, CUDA peak allocated) in MB since the last reset; 0 where not available."""
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return rss_hwm_mb() or 0.0, cuda


def _reset() -> bool:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return reset_hwm()


class Phases:
    """Context-manager factory recording seconds and peak memory per named phase."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, float]] = {}
        self._open: list[list] = []  # [start time, rss peak, cuda peak] of the phases in progress
        self.peak_scope = "phase"

    def _fold(self, rss: float, cuda: float) -> None:
        for entry in self._open:
            entry[1], entry[2] = max(entry[1], rss), max(entry[2], cuda)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._fold(*_marks())  # what the enclosing phases reached before this one resets the marks
        if not _reset():
            self.peak_scope = "process"
        entry = [time.time(), 0.0, 0.0]
        self._open.append(entry)
        try:
            yield
        finally:
            self._open.pop()
            rss, cuda = _marks()
            rss, cuda = max(entry[1], rss), max(entry[2], cuda)
            rec = self.records.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0})
            rec["seconds"] = round(rec["seconds"] + time.time() - entry[0], 2)
            rec["peak_rss_mb"] = max(rec["peak_rss_mb"], round(rss, 1))
            if torch.cuda.is_available():
                rec["peak_cuda_mb"] = max(rec.get("peak_cuda_mb", 0.0), round(cuda, 1))
            self._fold(rss, cuda)

    def summary(self) -> dict:
        """{"peak_scope": "phase" | "process", name: {seconds, peak_rss_mb[, peak_cuda_mb]}, ...}."""
        return {"peak_scope": self.peak_scope, **self.records}
