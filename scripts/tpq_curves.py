"""Learned per-step activation step sizes Δ_x(t) of saved students, per layer: curves, heatmaps, roughness.

    OMP_NUM_THREADS=1 python scripts/tpq_curves.py --students \\
        table=benchmarks/dilatequant/w4a4/seed0/student.safetensors \\
        knots=benchmarks/dilatequant_knots/w4a4/seed0/student.safetensors \\
        shared=benchmarks/dilatequant_no_tpq/w4a4/seed0/student.safetensors      # about 15 s

For every activation quantizer (``TemporalActQuantizer``, incl. ``KnotActQuantizer``) of each student,
Δ_x(t) is read at the student's trained raw timesteps (``meta["quant"]["timesteps"]``, row i ↔
timesteps[i]) through the quantizer's own ``_row_params`` — a free table row (paper's TPQ), the knot
form Δ·exp(r(t)), or one shared value (constant in t). The curves are the *learned* (trained)
parameters: the calibrated initial tables are not stored in a checkpoint, so they cannot be shown.
Per-head tables ([T, H]) are reduced to one curve per layer by averaging log Δ over the heads
(i.e. the geometric mean of the heads' Δ). Only Δ is plotted; z_x(t) is not.

Outputs:
  --out-png (docs/tpq_curves.png): one panel per selected layer (``--layers N`` spread evenly over
      the network, after the optional name filter ``--match REGEX``); x = raw t, y = Δ(t)/mean_t Δ
      (log scale), one line per student.
  <out-png stem>_heat.png (docs/tpq_curves_heat.png): per student, log(Δ(t)/mean_t Δ) of every
      (matched) layer; rows = layers in network order, columns = steps by ascending raw t; colours
      clipped at the 99th percentile of |log ratio| over all students.
  --out-json (docs/tpq_curves.json) and a printed table: per student and layer, with d2 = the second
      difference of log Δ over consecutive trained steps (ascending t):
        roughness     = mean|d2| / (max_t log Δ − min_t log Δ + 1e-12)  (scale-free; smooth → small)
        roughness_abs = mean|d2|
        range         = max_t log Δ − min_t log Δ
      The table lists the selected layers; the JSON every matched layer; the summary line of a
      student is the median of each metric over every matched layer.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dq.errors import DQError, run_script  # noqa: E402
from dq.models.checkpoint import load_student  # noqa: E402
from dq.quant.act_quantizer import TemporalActQuantizer  # noqa: E402
from dq.quant.knots import KnotActQuantizer  # noqa: E402

EPS = 1e-12
METRICS = ("roughness", "roughness_abs", "range")


def parse_students(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DQError(f"--students entry {item!r} is not NAME=path (e.g. table=benchmarks/.../student.safetensors)")
        if name in out:
            raise DQError(f"--students name {name!r} given twice; names must be unique")
        out[name] = Path(path)
    return out


@torch.no_grad()
def log_delta_curves(path: Path) -> tuple[list[int], dict[str, torch.Tensor], str]:
    """(trained raw timesteps ascending, {quantizer name: log Δ(t) [T] float64 at those t}, kind)."""
    model, meta = load_student(path)
    ts = [int(t) for t in meta["quant"]["timesteps"]]
    if not ts:
        raise DQError(f"{str(path)!r} stores no trained timesteps (meta['quant']['timesteps'] is empty); "
                      f"its Δ(t) cannot be placed on a raw-t axis")
    order = sorted(range(len(ts)), key=lambda i: ts[i])
    rows = torch.tensor(order)
    curves: dict[str, torch.Tensor] = {}
    kinds = set()
    for name, m in model.denoiser.named_modules():
        if not isinstance(m, TemporalActQuantizer):
            continue
        if isinstance(m, KnotActQuantizer):
            kinds.add(f"knots K={m.num_knots}")
            delta, _ = m._row_params(rows)
        elif m.num_steps == 1:
            kinds.add("shared")
            delta, _ = m._row_params(None)
            delta = delta.expand(len(ts), *delta.shape[1:])
        else:
            kinds.add("per-step table")
            if m.num_steps != len(ts):
                raise DQError(f"{name} in {str(path)!r} has {m.num_steps} table rows but the checkpoint lists "
                              f"{len(ts)} trained timesteps")
            delta, _ = m._row_params(rows)
        log_d = delta.double().log()
        if log_d.ndim == 2:  # [T, H]: geometric mean over the heads
            log_d = log_d.mean(dim=1)
        curves[name] = log_d
    if not curves:
        raise DQError(f"{str(path)!r} holds no activation quantizer (TemporalActQuantizer)")
    return sorted(ts), curves, ", ".join(sorted(kinds))


def metrics(log_d: torch.Tensor) -> dict[str, float]:
    rng = float(log_d.max() - log_d.min())
    d2 = (log_d[2:] - 2 * log_d[1:-1] + log_d[:-2]).abs().mean()
    return {"roughness": float(d2) / (rng + EPS), "roughness_abs": float(d2), "range": rng}


def network_order(names: list[str]) -> list[str]:
    """Quantizer names in data-flow order: diffusers registers ``mid_block`` after ``up_blocks``, so its
    quantizers move to just before the first ``up_blocks`` one (no-op for models without them)."""
    mid = [n for n in names if n.startswith("mid_block.")]
    rest = [n for n in names if not n.startswith("mid_block.")]
    up = next((i for i, n in enumerate(rest) if n.startswith("up_blocks.")), None)
    return names if not mid or up is None else rest[:up] + mid + rest[up:]


def block_of(name: str) -> str:
    """Top-level block of a quantizer name: 'down_blocks.1', 'mid_block', 'conv_in', ..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def select(names: list[str], match: str | None, n: int) -> tuple[list[str], list[str]]:
    """(matched layers in network order, the n of them spread evenly over the network)."""
    if match is not None:
        try:
            pat = re.compile(match)
        except re.error as e:
            raise DQError(f"--match {match!r} is not a valid regular expression ({e})") from None
        matched = [x for x in names if pat.search(x)]
        if not matched:
            raise DQError(f"--match {match!r} matches no quantizer; names look like {names[:3]} ... {names[-2:]}")
    else:
        matched = list(names)
    if n < 1:
        raise DQError(f"--layers {n} must be ≥ 1")
    if n >= len(matched):
        return matched, matched
    idx = sorted({round(i * (len(matched) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [len(matched) // 2]
    return matched, [matched[i] for i in idx]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", nargs="+", required=True, metavar="NAME=PATH",
                    help="students to compare, each NAME=path/to/student.safetensors")
    ap.add_argument("--layers", type=int, default=12, help="panels: N layers spread evenly over the network")
    ap.add_argument("--match", default=None, help="regex on quantizer names: only layers whose name matches")
    ap.add_argument("--out-png", type=Path, default=Path("docs/tpq_curves.png"))
    ap.add_argument("--out-json", type=Path, default=Path("docs/tpq_curves.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    students = parse_students(args.students)
    data = {}
    for sname, path in students.items():
        ts, curves, kind = log_delta_curves(path)
        if len(ts) < 3:
            raise DQError(f"student {sname!r} has {len(ts)} trained timesteps; the second difference needs ≥ 3")
        data[sname] = {"path": str(path), "kind": kind, "timesteps": ts, "curves": curves}
        print(f"{sname}: {path} — {kind}, {len(curves)} activation quantizers, {len(ts)} steps "
              f"(t = {ts[0]}..{ts[-1]})")
    first = next(iter(data))
    names = network_order(list(data[first]["curves"]))
    for sname, d in data.items():
        if set(d["curves"]) != set(names):
            diff = sorted(set(d["curves"]) ^ set(names))
            raise DQError(f"students {first!r} and {sname!r} have different activation quantizers, e.g. {diff[:3]}")
    matched, selected = select(names, args.match, args.layers)
    print(f"layers: {len(matched)} matched of {len(names)}, {len(selected)} in the panels")

    # ------------------------------------------------------------------ metrics
    result = {"students": {}}
    for sname, d in data.items():
        per_layer = {n: metrics(d["curves"][n]) for n in matched}
        summary = {k: float(torch.tensor([v[k] for v in per_layer.values()]).median()) for k in METRICS}
        result["students"][sname] = {"path": d["path"], "kind": d["kind"], "timesteps": d["timesteps"],
                                     "median_over_layers": summary, "layers": per_layer}
    print("\n| layer | student | roughness | roughness_abs | range log Δ |\n|---|---|---|---|---|")
    for n in selected:
        for sname in data:
            m = result["students"][sname]["layers"][n]
            print(f"| {n} | {sname} | {m['roughness']:.4f} | {m['roughness_abs']:.4f} | {m['range']:.4f} |")
    print(f"\nmedian over {len(matched)} layers:")
    for sname in data:
        s = result["students"][sname]["median_over_layers"]
        print(f"  {sname:>10}: roughness={s['roughness']:.4f}  roughness_abs={s['roughness_abs']:.4f}  "
              f"range={s['range']:.4f}")
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=1) + "\n")

    # ------------------------------------------------------------------ curves
    cols = min(4, len(selected))
    nrows = -(-len(selected) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
    for ax, n in zip(axes.flat, selected):
        for sname, d in data.items():
            delta = d["curves"][n].exp()
            ax.plot(d["timesteps"], (delta / delta.mean()).numpy(), lw=1.1, label=sname)
        ax.set_yscale("log")
        ax.set_title(n if len(n) <= 40 else "…" + n[-39:], fontsize=7)
        ax.tick_params(labelsize=6, which="both")
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(selected):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("raw timestep t", fontsize=8)
    fig.supylabel("Δ_x(t) / mean_t Δ_x", fontsize=8)
    fig.tight_layout()
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out_png, dpi=130)
    plt.close(fig)

    # ------------------------------------------------------------------ heatmaps
    heat_png = args.out_png.with_name(f"{args.out_png.stem}_heat{args.out_png.suffix}")
    mats = {s: torch.stack([d["curves"][n] - d["curves"][n].exp().mean().log() for n in matched])
            for s, d in data.items()}
    # colour limit: 99th percentile of |log ratio| (a few collapsed rows would wash out the rest; they saturate)
    vmax = float(torch.cat([m.abs().flatten() for m in mats.values()]).quantile(0.99)) or 1.0
    fig, axes = plt.subplots(1, len(mats), figsize=(4.0 * len(mats) + 1, 0.06 * len(matched) + 2), squeeze=False)
    for j, (ax, (sname, mat)) in enumerate(zip(axes[0], mats.items())):
        ts = data[sname]["timesteps"]
        im = ax.imshow(mat.numpy(), aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ticks = sorted({round(i * (len(ts) - 1) / 4) for i in range(5)})
        ax.set_xticks(ticks, [str(ts[i]) for i in ticks], fontsize=6)
        ax.set_title(f"{sname} ({data[sname]['kind']})", fontsize=8)
        ax.set_xlabel("raw timestep t", fontsize=7)
        starts = [i for i, n in enumerate(matched) if i == 0 or block_of(n) != block_of(matched[i - 1])]
        ax.set_yticks(starts, [block_of(matched[i]) for i in starts] if j == 0 else [], fontsize=5)
        if j == 0:
            ax.set_ylabel(f"{len(matched)} layers, network order (tick = first layer of a block)", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), extend="both", label="log(Δ(t) / mean_t Δ)  (clipped at 99th pct.)")
    fig.savefig(heat_png, dpi=130, bbox_inches="tight")
    plt.close(fig)
    print(f"\nwrote {args.out_png}, {heat_png}, {args.out_json}")


if __name__ == "__main__":
    run_script(main)
