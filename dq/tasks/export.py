"""``python export.py``: a trained student checkpoint → a deployable export folder (dq.models.export)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dq.models.checkpoint import attach_teacher_parts, load_student
from dq.models.export import export_student

log = logging.getLogger("dq")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run(cfg: DictConfig) -> dict[str, Any]:
    ckpt = Path(str(cfg.ckpt_path))
    student, meta = load_student(ckpt)
    if meta.get("teacher_parts"):  # the export carries the rest of the pipeline: from the teacher it was trained with
        attach_teacher_parts(student, meta, f"exporting {ckpt} with its {', '.join(meta['teacher_parts'])}")
    out = Path(str(cfg.out)) if cfg.get("out") else ckpt.parent / "export"
    export_student(student, meta, out)
    size = folder_bytes(out)
    float32 = sum(p.numel() for n, p in student.denoiser.state_dict().items() if "quant" not in n
                  and p.is_floating_point() and "input_scale" not in n) * 4
    parts = sum(folder_bytes(out / role) for role in meta.get("teacher_parts") or [] if (out / role).is_dir())
    size -= parts
    print(f"exported {ckpt} → {out}: the denoiser {size / 2**20:.2f} MB on disk, {size / float32:.3f}× its float32 "
          f"weights ({float32 / 2**20:.2f} MB)" + (f"; pipeline parts copied beside it: {parts / 2**20:.1f} MB"
                                                   if parts else ""))
    return {"export_dir": str(out), "bytes": size, "ratio_to_float32": size / float32, "pipeline_bytes": parts}
