"""How much finer a 4-bit grid could make one layer's input: relative quantization error of the inputs of
named layers of a trained student, along its own DDIM trajectories, under several activation grids.

    python scripts/grid_error.py --student benchmarks/dilatequant/w4a4/seed0/student.safetensors \\
        --layers up_blocks.2.resnets.0.conv_shortcut=64 up_blocks.2.resnets.1.conv_shortcut=32

``LAYER=SPLIT``: SPLIT is the channel where the input's two concatenated parts meet (the UNet up block's
hidden state, then the skip connection); the input is taken after the layer's input_scale (WD), as its
quantizer sees it. Per layer, ‖Q(x) − x‖² / ‖x‖² over all steps and images for:

    learned     the student's own trained quantizer (its per-step Δ, z)
    mse         one 4-bit range per step, clipped to minimise the error (33 ratios of the min–max)
    split       the same for each of the two parts separately (Q-Diffusion's shortcut splitting)
    rotated     the same after a random orthogonal rotation of the channels (QuaRot-style)
    8-bit       the mse grid at 8 bits

Prints a table and writes ``--out`` (JSON, default next to the student: grid_error.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dq.errors import DQError, name_error, run_script  # noqa: E402
from dq.quant.fake_quant import fake_quant_nograd, minmax_params  # noqa: E402

GRIDS = ("learned", "mse", "split", "rotated", "8-bit")


def mse_error(x: torch.Tensor, bits: int = 4, ratios: int = 33) -> float:
    """Σ (Q(x) − x)² with one asymmetric uniform grid over the clipped range [r·min, r·max], best r ∈ [0.2, 1]."""
    lo, hi = x.min().reshape(1), x.max().reshape(1)
    best = float("inf")
    for r in torch.linspace(0.2, 1.0, ratios).tolist():
        d, z = minmax_params(lo * r, hi * r, bits)
        best = min(best, float((fake_quant_nograd(x, d, z, bits) - x).pow(2).sum()))
    return best


def grid_errors(steps: list[torch.Tensor], learned: list[torch.Tensor], split: int, seed: int = 0) -> dict:
    """Relative error per grid (GRIDS) of the inputs ``steps`` (one [B, C, ...] tensor per sampling step),
    with ``learned`` the student's own quantized inputs of the same steps."""
    c = steps[0].shape[1]
    if not 0 < split < c:
        raise DQError(f"split {split} must lie inside the layer's {c} input channels (1..{c - 1})")
    rot, _ = torch.linalg.qr(torch.randn(c, c, generator=torch.Generator().manual_seed(seed)))
    err = dict.fromkeys(GRIDS, 0.0)
    total = 0.0
    for x, q in zip(steps, learned):
        total += float(x.pow(2).sum())
        err["learned"] += float((q - x).pow(2).sum())
        err["mse"] += mse_error(x)
        err["split"] += mse_error(x[:, :split]) + mse_error(x[:, split:])
        err["rotated"] += mse_error(torch.einsum("dc,bc...->bd...", rot, x))
        err["8-bit"] += mse_error(x, bits=8)
    return {k: v / total for k, v in err.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, help="a student.safetensors written by train.py")
    ap.add_argument("--layers", nargs="+", required=True, metavar="LAYER=SPLIT")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    path = Path(args.student)
    if not path.is_file():
        raise DQError(f"--student {str(path)!r} does not exist; give a student.safetensors written by train.py")
    specs = {}
    for spec in args.layers:
        name, eq, split = spec.partition("=")
        if not eq or not split.isdigit():
            raise DQError(f"--layers {spec!r} is not LAYER=SPLIT (e.g. up_blocks.2.resnets.0.conv_shortcut=64)")
        specs[name] = int(split)

    from dq.models.checkpoint import load_student
    from dq.models.sampling import SamplerConfig, denoise, initial_noise, make_sampler

    student, meta = load_student(path)
    modules = dict(student.denoiser.named_modules())
    for name in specs:
        if name not in modules or getattr(modules[name], "act_quant", None) is None:
            quantized = [n for n, m in modules.items() if getattr(m, "act_quant", None) is not None]
            raise name_error("--layers", name, "layer with quantized inputs", quantized)
    seen = {n: ([], []) for n in specs}

    def record(name):
        def pre(mod, args):
            x = args[0] * mod.input_scale.view(1, -1, *([1] * (args[0].ndim - 2)))
            seen[name][0].append(x.detach())
            seen[name][1].append(mod.act_quant(x).detach())  # the step's rows are set during the call
        return pre

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in specs]
    sampler = SamplerConfig(**meta["sampler"])
    noise = initial_noise(torch.arange(args.images), student.sample_shape, args.seed)
    with torch.no_grad():
        denoise(student.denoiser, make_sampler(student, sampler), noise, eta=sampler.eta)
    for h in handles:
        h.remove()
    rows = {n: grid_errors(seen[n][0], seen[n][1], specs[n], args.seed) for n in specs}
    print(f"relative quantization error of the input, {args.images} images × {len(seen[next(iter(specs))][0])} steps\n")
    print("| layer | " + " | ".join(GRIDS) + " |\n|---|" + "---|" * len(GRIDS))
    for n, r in rows.items():
        print(f"| {n} | " + " | ".join(f"{100 * r[g]:.2f} %" for g in GRIDS) + " |")
    out = Path(args.out) if args.out else path.parent / "grid_error.json"
    out.write_text(json.dumps({"command": "python " + shlex.join(sys.argv), "student": str(path), "images": args.images,
                               "seed": args.seed, "splits": specs, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_script(main)
