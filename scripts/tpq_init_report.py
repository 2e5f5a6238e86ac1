"""Per-step (TPQ) vs shared activation tables right after initialisation, before any training.

    OMP_NUM_THREADS=1 python scripts/tpq_init_report.py      # about 4 min on one core

W4A4 + WD student of the embedded teacher; activation tables initialised (percentile or min–max)
from N calibration inputs, then the relative ε error vs FP on 1,024 other inputs of the same
DDIM-50 trajectories: ‖ε_student − ε_fp‖² / ‖ε_fp‖². Separates what TPQ does at initialisation
from what distillation later does with it (docs/results.md).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dq.data.calibration import CalibConfig, load_or_generate  # noqa: E402
from dq.models.load import ModelConfig, load_model  # noqa: E402
from dq.models.sampling import SamplerConfig, sampler_timesteps  # noqa: E402
from dq.quant.config import QuantConfig  # noqa: E402
from wd_report import batches, build_student, rel_mse  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    teacher = load_model(ModelConfig(source="embedded"))
    sampler = SamplerConfig(name="ddim", steps=50, eta=0.0)
    calib = load_or_generate(teacher, sampler, CalibConfig(n_samples=5120, n_trajectories=128, batch_size=128,
                                                           guidance_scale=1.0, seed=0), Path(".cache/dq"))
    perm = torch.randperm(len(calib), generator=torch.Generator().manual_seed(0))
    held = batches(calib, perm[-1024:])
    timesteps = tuple(sampler_timesteps(teacher, sampler))
    print("| tables | init inputs | init | rel. ε MSE |\n|---|---|---|---|")
    for shared in (False, True):
        for n_init in (1024, 4096):
            for method in ("percentile", "minmax"):
                qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=timesteps, shared_tables=shared)
                student, _ = build_student(copy.deepcopy(teacher.denoiser), qcfg, batches(calib, perm[:n_init]),
                                           "wd", calib_method=method)
                err = rel_mse(student.eval(), teacher.denoiser, held)
                print(f"| {'shared (1 row)' if shared else 'per step (TPQ, 50 rows)'} | {n_init} | {method} | "
                      f"{err:.5f} |", flush=True)


if __name__ == "__main__":
    main()
