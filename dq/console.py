"""What reaches the console: the one place that decides what other libraries may print, and dq's
progress bars, which become one line per unit of work when the output is not a terminal (log files).

Third-party output, cause by cause:
- Lightning's rank-zero info ("GPU available: ...", "💡 Tip: ... litlogger/litmodels"): info-level
  chatter through the ``lightning.pytorch`` logger — raised to WARNING here.
- Lightning 2.6.6's ``utilities/_pytree.py`` calls torch's deprecated ``LeafSpec`` isinstance check; dq
  cannot change that code, so exactly that DeprecationWarning is filtered (drop it when Lightning does).
- diffusers' "install accelerate" notice: fixed at its cause (accelerate is a requirement).
- wandb's "anonymous setting has no effect": Lightning's WandbLogger always passes ``anonymous=None``;
  ``dq.tasks.common.make_logger`` removes that key before wandb starts. ``WANDB_SILENT`` keeps wandb's
  banner out of offline runs.
- Lightning's ModelCheckpoint warns about manual optimisation on every save; dq saves its own
  ``last.ckpt`` (dq.distill.callbacks.PeriodicCheckpoint), so that callback is not used at all.
- torch.compile tracing diffusers' Upsample2D (``runtime=compiled``) warns that it skips an ``lru_cache`` around
  a torch-version check: harmless there, not dq's to change, so exactly that UserWarning is filtered.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any

from tqdm import tqdm


def configure() -> None:
    """Apply the rules above (idempotent; entry points call it once hydra has set up logging)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function")
    os.environ.setdefault("WANDB_SILENT", "true")


def is_terminal() -> bool:
    return sys.stderr.isatty()


class LineProgress:
    """tqdm's interface, printing one line when closed: '<desc>: <n> <unit> in <s> s (<postfix>)'."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 per_update: bool = False, **_: Any) -> None:
        self.total, self.desc, self.unit, self.n, self.per_update = total, desc, unit, initial, per_update
        self.start, self.postfix, self.closed = time.time(), "", False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.per_update and (self.total is None or self.n < self.total):  # the last one prints at close
            print(f"{self.desc}: {self.n}/{self.total} {self.unit}, {time.time() - self.start:.1f} s", file=sys.stderr,
                  flush=True)

    def set_postfix(self, refresh: bool = False, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.n} {self.unit} in {time.time() - self.start:.1f} s{extra}", file=sys.stderr,
              flush=True)


def progress(total: int | None = None, desc: str = "", unit: str = "it", leave: bool = True,
             per_update: bool = False, **kw: Any) -> Any:
    """A tqdm bar on a terminal; otherwise a LineProgress: one line when the work is done (and one per
    ``update`` with ``per_update``, e.g. per sampling batch)."""
    if is_terminal():
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, **kw)
    return LineProgress(total=total, desc=desc, unit=unit, per_update=per_update, **kw)
