"""Which quantizers cost the FID: one trained student sampled with its weight or activation quantizers off.

    python scripts/quant_ablation.py --student benchmarks/dilatequant/w4a4/seed0/student.safetensors

Rows (same sampler, noise and reference for all; the cells' protocol: DDIM 50, 1,000 images, seed 0,
digits features):

    fp            the FP teacher
    (--float-acts up.2[:conv_shortcut]: the student with that block's, or that layer kind's in it,
    activations float — what perfect activations there would buy; --float-acts embedding: the inputs of
    the layers that read only the timestep embedding, as quant.quantize_embedding_acts=false has them)
    student       the student as trained (weights and activations quantized)
    weights_only  activation quantizers off: the student's quantized weights on float activations
    acts_only     weight quantizers off: the student's float (trained) weights, quantized activations
    float         both off: only what distillation did to the float weights

The student's FID minus ``weights_only`` is what its activation quantization costs after training,
and so on. Writes a table and ``--out`` (JSON) with every row and the command.

``--per-block`` instead locates the activation error: for each distillation block (stem, down.i, mid,
up.i, head) a copy of the student with that block's activation quantizers off, sampled from the same
noise as the teacher (``--per-block-images`` images, DDIM as trained); the table gives each copy's x_0
error ‖x_S − x_T‖²/‖x_T‖² (scripts/step_error.py's accumulated error at the last step) and the share
of the student's error that block's activations account for. ``--within BLOCK`` breaks one block down
further, by layer kind (the quantized layer's own name: conv1, conv_shortcut, time_emb_proj, to_q, …;
every layer of that kind in the block goes float together) — and, for comparison, that kind in the
whole model.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dq.errors import DQError, run_script  # noqa: E402

EMBEDDING = "embedding"  # --float-acts spec: the conditioning branch (quant.quantize_embedding_acts)
ROWS = ("fp", "student", "weights_only", "acts_only", "float")
STATES = {"student": (True, True), "weights_only": (True, False), "acts_only": (False, True), "float": (False, False)}


def ablate(denoiser, row: str):
    """A copy of a quantized ``denoiser`` with the quantizers of ``row`` (a key of STATES) switched off."""
    from dq.quant.quantizers import set_quant_state

    if row not in STATES:
        raise DQError(f"row {row!r} is not a student row; valid choices: {', '.join(STATES)}")
    m = copy.deepcopy(denoiser)
    set_quant_state(m, weight=STATES[row][0], act=STATES[row][1])
    return m


def block_ablations(denoiser) -> dict:
    """{"student": a copy, "weights_only": …, "<block>": a copy with that block's activation quantizers off}."""
    from dq.models.families import family_of

    out = {"student": ablate(denoiser, "student"), "weights_only": ablate(denoiser, "weights_only")}
    for b in family_of(denoiser).blocks(denoiser, "block"):
        out[b.name] = _off(denoiser, _in_block(denoiser, b))
    return out


def _kind(name: str) -> str:
    """Layer kind of an activation quantizer's name: "up_blocks.2.resnets.0.conv1.act_quant" → "conv1"; the
    attention matmul inputs keep their own name: "….attentions.0.processor.q_quant" → "q_quant"."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return parts[-1] if parts[-1] != "act_quant" or len(parts) == 1 else parts[-2]


def _in_block(denoiser, block):
    """A predicate on module names: inside one of ``block``'s modules."""
    prefixes = {n for n, q in denoiser.named_modules() if any(q is mod for mod in block.modules)}
    return lambda n: any(n == p or n.startswith(p + ".") for p in prefixes)


def _off(denoiser, pick):
    from dq.quant.quantizers import TemporalActQuantizer

    m = copy.deepcopy(denoiser)
    for n, q in m.named_modules():
        if isinstance(q, TemporalActQuantizer) and pick(n):
            q.enabled = False
    return m


def kind_ablations(denoiser, block: str) -> dict:
    """{"student", "<kind> in <block>", "<kind> everywhere"}: copies with those activation quantizers off."""
    from dq.models.families import family_of
    from dq.quant.quantizers import TemporalActQuantizer

    blocks = {b.name: b for b in family_of(denoiser).blocks(denoiser, "block")}
    if block not in blocks:
        raise DQError(f"--within {block!r} is not a block of this model; valid choices: {', '.join(blocks)}")
    inside = _in_block(denoiser, blocks[block])
    names = [n for n, q in denoiser.named_modules() if isinstance(q, TemporalActQuantizer)]
    out = {"student": ablate(denoiser, "student")}
    for kind in sorted({_kind(n) for n in names if inside(n)}):
        out[f"{kind} in {block}"] = _off(denoiser, lambda n, k=kind: inside(n) and _kind(n) == k)
        out[f"{kind} everywhere"] = _off(denoiser, lambda n, k=kind: _kind(n) == k)
    return out


def float_acts_row(denoiser, spec: str):
    """("acts float: <what>", a copy of the student) for ``spec`` = BLOCK, BLOCK:KIND, or ``embedding``
    (the family's conditioning branch: the layers that read only the timestep embedding)."""
    if spec == EMBEDDING:
        from dq.models.families import family_of

        branch = family_of(denoiser).embedding_branch
        return "acts float: embedding branch", _off(denoiser, lambda n: branch(n.rsplit(".", 1)[0]))
    block, _, kind = spec.partition(":")
    copies = kind_ablations(denoiser, block) if kind else block_ablations(denoiser)
    key = f"{kind} in {block}" if kind else block
    if not kind and key not in copies:
        raise DQError(f"--float-acts {spec!r} is not a block of this model; valid choices: "
                      f"{', '.join(k for k in copies if k not in ('student', 'weights_only'))}")
    if key not in copies:
        kinds = sorted({k.split(" in ")[0] for k in copies if " in " in k})
        raise DQError(f"--float-acts {spec!r}: no layer kind {kind!r} in {block}; valid kinds: {', '.join(kinds)}")
    return f"acts float: {key}", copies[key]


def plot_rows(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of the x_0 error per row, the student's as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["student (all quantized)" if r["name"] == "student" else "all activations float"
             if r["name"] == "weights_only" else f"{r['name']} float" for r in rows]
    vals = [r["x0_rel_err"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), vals, color=["0.4" if r["name"] == "student" else "tab:blue" for r in rows])
    ax.axvline(vals[0], color="0.4", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel("x_0 relative error vs the FP teacher (same noise)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def per_block(student, meta: dict, path: Path, args) -> int:
    from step_error import measure
    from dq.models.load import ModelConfig, load_model
    from dq.models.sampling import SamplerConfig

    if meta.get("teacher") != "embedded_digits":
        raise DQError(f"--per-block compares against the embedded digits teacher, but {str(path)!r} was distilled "
                      f"from {meta.get('teacher')!r}")
    sampler = SamplerConfig(**meta["sampler"])
    models = kind_ablations(student.denoiser, args.within) if args.within else block_ablations(student.denoiser)
    start = time.time()
    res = measure(load_model(ModelConfig()), models, sampler, args.per_block_images, args.seed, batch_size=64,
                  log=print)
    err = {k: v["x0_rel_err"] for k, v in res["students"].items()}
    base = err["student"]
    print("\n| activations in float | x_0 rel. error | share of the student's error removed |\n|---|---|---|")
    rows = []
    for k, e in err.items():
        share = (base - e) / base if k != "student" else 0.0
        rows.append({"name": k, "x0_rel_err": e, "share_removed": share})
        print(f"| {'none (the student)' if k == 'student' else 'all' if k == 'weights_only' else k} | {e:.4f} | "
              f"{'–' if k == 'student' else f'{100 * share:.0f} %'} |")
    default = f"quant_ablation_{args.within}.json" if args.within else "quant_ablation_blocks.json"
    out = Path(args.out) if args.out else path.parent / default
    plot_rows(rows, out.with_suffix(".png"), f"{path.parent.parent.parent.name} {path.parent.name}: x_0 error with "
              f"activations in float ({args.within or 'per block'})")
    out.write_text(json.dumps({"command": "python " + shlex.join(sys.argv), "student": str(path),
                               "sampler": sampler.__dict__, "images": args.per_block_images, "seed": args.seed,
                               "rows": rows, "seconds": time.time() - start}, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, help="a student.safetensors written by train.py")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help=f"which rows (of {', '.join(ROWS)})")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "dq"))
    ap.add_argument("--float-acts", nargs="+", default=[], metavar="BLOCK[:KIND]",
                    help="extra FID rows: the student with one block's (or one layer kind's in it) activations "
                         "float; 'embedding': the inputs of the layers that read only the timestep embedding")
    ap.add_argument("--per-block", action="store_true", help="x_0 error with each block's activations in float")
    ap.add_argument("--per-block-images", type=int, default=128)
    ap.add_argument("--within", default=None, metavar="BLOCK", help="with --per-block: one block, by layer kind")
    ap.add_argument("--out", default=None, help="JSON of the rows (default: next to the student, quant_ablation.json)")
    args = ap.parse_args(argv)
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        raise DQError(f"--rows {bad[0]!r} is not a row; valid choices: {', '.join(ROWS)}")
    path = Path(args.student)
    if not path.is_file():
        raise DQError(f"--student {str(path)!r} does not exist; give a student.safetensors written by train.py")

    from dq.evaluation import Protocol, evaluate_models, format_table
    from dq.models.checkpoint import load_student
    from dq.models.load import ModelConfig, load_model
    from dq.models.sampling import SamplerConfig

    student, meta = load_student(path)
    if args.per_block:
        return per_block(student, meta, path, args)
    if "fp" in args.rows and meta.get("teacher") != "embedded_digits":
        raise DQError(f"the fp row loads the embedded digits teacher, but {str(path)!r} was distilled from "
                      f"{meta.get('teacher')!r}; drop fp from --rows")
    sampler = SamplerConfig(**meta["sampler"]) if isinstance(meta.get("sampler"), dict) else SamplerConfig()
    models = {}
    for row in args.rows:
        if row == "fp":
            models[row] = load_model(ModelConfig()).denoiser
            continue
        models[row] = ablate(student.denoiser, row)
    for spec in args.float_acts:
        name, model = float_acts_row(student.denoiser, spec)
        models[name] = model
    p = Protocol(sampler=sampler, cache_dir=args.cache_dir, num_samples=args.num_samples, seed=args.seed, floor=False)
    out = Path(args.out) if args.out else path.parent / "quant_ablation.json"
    start = time.time()
    result = evaluate_models(p, student, models, out.parent / "quant_ablation")
    print(format_table(result["rows"]))
    rows = [{k: r[k] for k in ("name", "fid", "kid", "is") if k in r} for r in result["rows"]]
    out.write_text(json.dumps({"command": "python " + shlex.join(sys.argv), "student": str(path),
                               "sampler": sampler.__dict__, "num_samples": args.num_samples, "seed": args.seed,
                               "rows": rows, "seconds": time.time() - start}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_script(main)
