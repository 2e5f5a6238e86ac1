"""Multiply-accumulates per image of every Conv2d / Linear, and the share of the layer groups whose
precision docs/w4a4_gap.md discusses: the conditioning branch (``quant.quantize_embedding_acts``) and
the last up block's shortcut convs (``dilatequant_a8_shortcuts``), every up-path skip shortcut, and the
float low-rank branch DilateQuant puts on those by default (rank 16: r·(fan_in + C_out) per output position).

    python scripts/macs.py                 # the embedded digits teacher
    python scripts/macs.py --arch ddpm_cifar10

One float forward of one image at a mid timestep; attention's q·k and p·v matmuls are not Conv2d /
Linear and are not counted (the table says so). Prints a table; no files.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dq.errors import run_script  # noqa: E402
from dq.methods.dilatequant import BRANCH  # noqa: E402
from dq.quant.lowrank import branch_share, max_rank  # noqa: E402

ARCHS = ("digits", "ddpm_cifar10")


def layer_macs(model: nn.Module, *inputs) -> dict[str, int]:
    """{qualified name: MACs of that Conv2d / Linear} for one call ``model(*inputs)`` (float, no grad)."""
    macs: dict[str, int] = {}

    def hook(name):
        def count(mod, _inp, out):
            per_out = (mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                       if isinstance(mod, nn.Conv2d) else mod.in_features)
            macs[name] = macs.get(name, 0) + out.numel() * per_out
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


def main(argv: list[str] | None = None) -> int:
    from diffusers import UNet2DModel

    from dq.models.families import family_of
    from dq.models.families.unet import DDPM_CIFAR10
    from dq.models.load import ModelConfig, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="digits", choices=ARCHS,
                    help="digits: the embedded teacher; ddpm_cifar10: google/ddpm-cifar10-32's architecture, random init")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(ModelConfig()).denoiser if args.arch == "digits" else UNet2DModel(**DDPM_CIFAR10)
    c, s = model.config.in_channels, model.config.sample_size
    macs = layer_macs(model, torch.randn(1, c, s, s), 500)
    family = family_of(model)
    last_up = f"up_blocks.{len(model.up_blocks) - 1}."
    groups = {"all Conv2d / Linear": lambda n: True,
              "conditioning branch (embedding MLP + time_emb_proj)": family.embedding_branch,
              f"{last_up}*.conv_shortcut": lambda n: n.startswith(last_up) and n.endswith(".conv_shortcut")}
    shortcuts = set(family.skip_shortcuts(model))
    groups["up-path skip shortcuts (quant.lowrank_scope=skip_shortcuts)"] = shortcuts.__contains__
    total = sum(macs.values())
    print(f"{args.arch}: MACs per image (one denoiser call; attention matmuls not counted)\n")
    print("| layers | count | MACs | share |\n|---|---|---|---|")
    for label, pick in groups.items():
        names = [n for n in macs if pick(n)]
        v = sum(macs[n] for n in names)
        print(f"| {label} | {len(names)} | {v / 1e6:.3f} M | {100 * v / total:.2f} % |")
    r = BRANCH.rank
    weights = {n: model.get_submodule(n).weight for n in shortcuts}
    fits = [n for n, w in weights.items() if r <= max_rank(w)]
    branch = sum(macs[n] * branch_share(weights[n], r) for n in fits)
    print(f"| their float rank-{r} branch (DilateQuant's default; not in the total) | {len(fits)} | "
          f"{branch / 1e6:.3f} M | {100 * branch / total:.2f} % |")
    return 0


if __name__ == "__main__":
    run_script(main)
