"""The comparison table: every method × bit-width × seed on one model and protocol, resumable.

    python scripts/benchmark.py                      # full grid → docs/results.md + docs/results_fid.png
    python scripts/benchmark.py --methods dilatequant ptq --bits w4a4 --seeds 0   # a slice

Each cell is one `python train.py method=M quant=B seed=S` run in its own directory under
``--runs`` (default benchmarks/), its output in that directory's cell.log; a cell whose results.json
exists is not recomputed, so an interrupted benchmark continues where it stopped; a cell that
another live invocation is running (its running.pid) is left to it, so several invocations can share
one grid. The report aggregates whatever cells exist and names the protocol (extra overrides) each was run with.
Quantized cells sample only the student; the FP reference is the ``fp`` row.
Extra hydra overrides after ``--`` apply to every cell (e.g. ``-- task.num_samples=2000``).
``--jobs N`` runs N cells at once, each with cores/N threads (two 2-thread jobs on 2 cores thrash:
10–30× slower). Running several invocations side by side, give each ``OMP_NUM_THREADS`` yourself.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["fp", "ptq", "lsq_qat", "efficientdm", "smoothquant_bkd", "svdquant", "dilatequant_no_wd",
           "dilatequant_no_tpq", "dilatequant_no_bkd", "dilatequant_table", "dilatequant_knots", "dilatequant"]
BITS = ["w4a4", "w4a8", "w6a6", "w8a8"]
SHORTCUTS = "up_blocks.2.resnets.0.conv_shortcut,up_blocks.2.resnets.1.conv_shortcut"
A8_SHORTCUTS = f"quant.a8_layers=[{SHORTCUTS}]"
# the conditioning branch (timestep embedding MLP, each resnet's time_emb_proj) reads float inputs (docs/w4a4_gap.md)
EMB_FP = "quant.quantize_embedding_acts=false"
# Named variants: a method with fixed overrides (the per-step activation forms of docs/tpq.md).
VARIANTS = {
    "dilatequant_table_pooled": ("dilatequant_table", ["method.tpq_init=pooled"]),
    "dilatequant_knots_pooled": ("dilatequant", ["method.tpq_knots=10"]),
    "dilatequant_knots_pooled_slow": ("dilatequant", ["method.tpq_knots=10", "distill.lr_act_knots=0.0002"]),
    "dilatequant_stratified": ("dilatequant", ["distill.stratify_steps=true"]),
    "dilatequant_table_smooth": ("dilatequant_table", ["distill.tpq_smooth=0.001"]),
    "dilatequant_no_tpq_long": ("dilatequant_no_tpq", ["distill.steps_per_block=800"]),
    "dilatequant_long": ("dilatequant", ["distill.steps_per_block=800"]),
    "dilatequant_model400": ("dilatequant", ["distill.model_steps=400"]),
    "dilatequant_no_tpq_model400": ("dilatequant_no_tpq", ["distill.model_steps=400"]),
    "dilatequant_traj1024": ("dilatequant", ["calib.n_trajectories=1024"]),
    "dilatequant_no_tpq_traj1024": ("dilatequant_no_tpq", ["calib.n_trajectories=1024"]),
    # the last up block's two shortcut inputs (the raw skip concatenation) at 8 bits (docs/w4a4_gap.md)
    "dilatequant_a8_shortcuts": ("dilatequant", [A8_SHORTCUTS]),
    "dilatequant_no_tpq_a8_shortcuts": ("dilatequant_no_tpq", [A8_SHORTCUTS]),
    "dilatequant_emb_fp": ("dilatequant", [EMB_FP]),
    "dilatequant_no_tpq_emb_fp": ("dilatequant_no_tpq", [EMB_FP]),
    "ptq_emb_fp": ("ptq", [EMB_FP]),
    "dilatequant_model400_own": ("dilatequant", ["distill.model_steps=400", "distill.model_trajectory=student"]),
    # issue 25's switches: one quantizer per part of a skip concatenation; SVDQuant's float low-rank branch
    "dilatequant_split": ("dilatequant", ["quant.split_concat=true"]),
    "dilatequant_lowrank16": ("dilatequant", ["quant.lowrank_rank=16"]),
    "dilatequant_split_lowrank16": ("dilatequant", ["quant.split_concat=true", "quant.lowrank_rank=16"]),
    "svdquant_split": ("svdquant", ["quant.split_concat=true"]),
    "dilatequant_lowrank8": ("dilatequant", ["quant.lowrank_rank=8"]),
    "svdquant_r8": ("svdquant", ["method.rank=8"]),
    # the branch only on the two layers that hold most of the W4A4 error (docs/w4a4_gap.md)
    "dilatequant_lowrank16_sc": ("dilatequant", ["quant.lowrank_rank=16", "quant.lowrank_layers=[" + SHORTCUTS + "]"]),
    "dilatequant_lowrank16_skip": ("dilatequant", ["quant.lowrank_rank=16", "quant.lowrank_scope=skip_shortcuts"]),
    # the default without its own branch (DilateQuant as the paper has it)
    "dilatequant_no_lowrank": ("dilatequant", ["quant.lowrank_rank=0"]),
    "dilatequant_no_tpq_model400_own": ("dilatequant_no_tpq", ["distill.model_steps=400",
                                                              "distill.model_trajectory=student"]),
}
METHODS += list(VARIANTS)
# Variants that change the training or the precision rather than the per-step form: reported against
# their own base method (section "Levers"), not in the forms-vs-shared table.
LEVERS = ("dilatequant_long", "dilatequant_no_tpq_long", "dilatequant_model400", "dilatequant_no_tpq_model400",
          "dilatequant_model400_own", "dilatequant_no_tpq_model400_own", "dilatequant_traj1024",
          "dilatequant_no_tpq_traj1024", "dilatequant_a8_shortcuts", "dilatequant_no_tpq_a8_shortcuts",
          "ptq_emb_fp", "dilatequant_emb_fp", "dilatequant_no_tpq_emb_fp", "dilatequant_split", "dilatequant_lowrank16",
          "dilatequant_split_lowrank16", "svdquant_split", "dilatequant_lowrank8", "svdquant_r8",
          "dilatequant_lowrank16_sc", "dilatequant_lowrank16_skip", "dilatequant_no_lowrank")


def cell_dir(runs: Path, method: str, bits: str, seed: int) -> Path:
    return runs / method / ("fp" if method == "fp" else bits) / f"seed{seed}"


def run_cell(runs: Path, method: str, bits: str, seed: int, extra: list[str], threads: int | None = None) -> bool:
    """Run one cell unless its results exist; True if it ran now. Output goes to the cell's cell.log."""
    out = cell_dir(runs, method, bits, seed)
    if (out / "results.json").is_file() or running_elsewhere(out):
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps({"extra": extra}))
    (out / "running.pid").write_text(str(os.getpid()))
    base, fixed = VARIANTS.get(method, (method, []))
    cmd = [sys.executable, "train.py", f"method={base}", *fixed, f"quant={bits}", f"seed={seed}", "logger=none",
           "task.compare_fp=false", f"hydra.run.dir={out}", *extra]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    print(f"[{time.strftime('%H:%M:%S')}] start {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(out / "cell.log", "w") as logf:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    (out / "running.pid").unlink(missing_ok=True)
    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out / 'cell.log'}); continuing"
    print(f"[{time.strftime('%H:%M:%S')}] {method}/{bits}/seed{seed} {status} in {time.time() - start:.0f} s",
          flush=True)
    return True


def running_elsewhere(out: Path) -> bool:
    """True while another live benchmark process runs this cell (so two invocations share the grid)."""
    try:
        pid = int((out / "running.pid").read_text())
        if pid == os.getpid():
            return False
        os.kill(pid, 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True


def mean_std(xs: list[float], digits: int = 2) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


SCORES = ("fid", "kid", "is", "n_fake", "n_real")


def _scaling_ratios(report: list[dict]) -> list[list[float]]:
    """Per scaled layer group: [range after / before, imbalance before, imbalance after] (see scaling_effect)."""
    return [[x["act_absmax_after"] / x["act_absmax_before"], x["act_absmax_before"] / x["act_median_before"],
             x["act_absmax_after"] / x["act_median_after"]] for x in report if "act_absmax_after" in x]


def collect(runs: Path, ledger: Path | None = None) -> dict[tuple[str, str], list[dict]]:
    """Every cell: those recorded in the committed ``ledger`` (docs/results_cells.json), overridden by the
    finished cells under ``runs``; the merged set is written back to the ledger, so a cell's numbers
    outlive the machine that ran it and the report can be regenerated from the repository alone."""
    merged: dict[tuple[str, str, int], dict] = {}
    if ledger is not None and ledger.is_file():
        for c in json.loads(ledger.read_text()):
            merged[(c["method"], c["bits"], c["seed"])] = c
    for f in sorted(runs.glob("*/*/seed*/results.json")):
        r = json.loads(f.read_text())
        row = next(x for x in r["rows"] if x["name"] == ("fp" if r["bits"] == "FP" else "student"))
        proto = f.with_name("protocol.json")
        extra = " ".join(json.loads(proto.read_text())["extra"]) if proto.is_file() else ""
        method, bits, seed = f.parts[-4], f.parts[-3], int(f.parts[-2].removeprefix("seed"))
        merged[(method, bits, seed)] = {
            "method": method, "bits": bits, "seed": seed, **{k: row.get(k) for k in SCORES},
            "wall_seconds": r["wall_seconds"], "peak_memory_mb": r["peak_memory_mb"], "extra": extra or "defaults",
            "command": r.get("command"), "scaling_ratios": _scaling_ratios(r.get("scaling") or []),
            "commit": (r.get("code") or {}).get("commit"), "dirty": (r.get("code") or {}).get("dirty"),
            "cpu": machine_label(r.get("machine")), "lowrank": r.get("lowrank")}
    if ledger is not None and merged:
        ledger.write_text(json.dumps(sorted(merged.values(), key=lambda c: (c["method"], c["bits"], c["seed"])),
                                     indent=1) + "\n")
    cells: dict[tuple[str, str], list[dict]] = {}
    for (method, bits, _), c in sorted(merged.items()):
        cells.setdefault((method, bits), []).append(c)
    return cells


def machine_label(m: dict | None) -> str | None:
    """'AMD EPYC, 2 threads' from a results.json ``machine`` (None where the cell did not record it)."""
    return None if not m else f"{m['model']}, {m['threads']} threads"


def branch_label(lowrank: dict | None) -> str:
    """'r16 · 62 layers · 33 % MACs' for a student with SVDQuant low-rank branches, '–' without."""
    if not lowrank or not lowrank.get("layers"):
        return "–"
    return (f"r{lowrank['rank']} · {lowrank['layers']} layers · {100 * lowrank['branch_macs_share']:.1f} % MACs · "
            f"{lowrank['branch_params'] / 1e3:.0f}k params")


def code_label(rs: list[dict]) -> str:
    """The dq commits a row's cells ran (short hashes, * = uncommitted changes), or 'earlier' where unrecorded,
    each with the CPU it ran on where recorded."""
    def one(c: dict) -> str:
        code = (c["commit"][:7] + ("*" if c.get("dirty") else "")) if c.get("commit") else "earlier"
        return f"{code} ({cpu_name(c)})" if c.get("cpu") else code
    return ", ".join(sorted({one(c) for c in rs}))


def cpu_name(cell: dict) -> str:
    """The cell's CPU model, short ('AMD EPYC', 'Intel Xeon'), or '' where unrecorded."""
    return (cell.get("cpu") or "").split(",")[0].replace("(R)", "").replace(" Processor", "")


def paired_deltas(other: dict[int, dict], ref: dict[int, dict]) -> str:
    """Per-seed FID differences other − ref; † marks a pair whose two cells ran on different CPUs, ? one where a
    cell did not record its CPU."""
    def mark(a: dict, b: dict) -> str:
        return "?" if not (cpu_name(a) and cpu_name(b)) else "†" if cpu_name(a) != cpu_name(b) else ""
    return ", ".join(f"{other[k]['fid'] - ref[k]['fid']:+.2f}{mark(other[k], ref[k])}" for k in sorted(other.keys() & ref.keys()))


def comparison(cells: dict[tuple[str, str], list[dict]]) -> list[str]:
    """DilateQuant against every other method, per bit-width, where both have two or more seeds.

    "beyond spread": the means differ by more than the sum of the two seed standard deviations.
    Per-seed differences are paired (same seed = same calibration set and the same sampling noise).
    """
    lines = []
    for b in BITS:
        ref = {r["seed"]: r for r in cells.get(("dilatequant", b), [])}
        if len(ref) < 2:
            continue
        lines += ["", f"### DilateQuant vs the others at {b.upper()} (FID; positive Δ = DilateQuant better)", "",
                  "| method | FID | DilateQuant FID | Δ mean | per-seed Δ (paired) | verdict |", "|---|---|---|---|---|---|"]
        for m in METHODS:
            if m in ("dilatequant", "fp") or m in LEVERS:
                continue
            other = {r["seed"]: r for r in cells.get((m, b), [])}
            if len(other) < 2:
                continue
            a, d = [r["fid"] for r in other.values()], [r["fid"] for r in ref.values()]
            delta = statistics.mean(a) - statistics.mean(d)
            spread = statistics.stdev(a) + statistics.stdev(d)
            verdict = ("DilateQuant better, beyond spread" if delta > spread else
                       "DilateQuant worse, beyond spread" if delta < -spread else "within seed spread")
            lines.append(f"| {m} | {mean_std(a)} | {mean_std(d)} | {delta:+.2f} | {paired_deltas(other, ref)} "
                         f"| {verdict} |")
    if lines:
        lines.insert(0, "\n## DilateQuant against each baseline and ablation\n\n\"Beyond spread\": the means "
                        "differ by more than the sum of the two seed standard deviations. `dilatequant` (and its "
                        "no_wd / no_tpq / no_bkd / table ablations) carries DilateQuant's own float low-rank branch "
                        "on the skip shortcuts, svdquant its branch on every layer, the other methods none; the "
                        "same recipe without the branch is `dilatequant_no_lowrank` (section Levers). † after a "
                        "per-seed Δ: its two cells ran on different CPUs, so the pair shares its seed but not its "
                        "rounding (another CPU gives another student for a seed); ? : one of the two cells did not record its CPU.")
    return lines


def tpq_forms(cells: dict[tuple[str, str], list[dict]], shared: str = "dilatequant_no_tpq") -> list[str]:
    """Every per-step form of the activation parameters against the shared table, paired by seed, and
    the share of the PTQ → FP FID gap each closes (mean FIDs of the ``ptq`` and ``fp`` rows)."""
    lines = []
    for b in BITS:
        ref = {r["seed"]: r["fid"] for r in cells.get((shared, b), [])}
        if len(ref) < 2:
            continue
        fp, ptq = cells.get(("fp", "fp")), cells.get(("ptq", b))
        lo = statistics.mean(r["fid"] for r in fp) if fp else None
        hi = statistics.mean(r["fid"] for r in ptq) if ptq else None
        closure = lambda x: "–" if lo is None or hi is None else f"{100 * (hi - x) / (hi - lo):.0f} %"  # noqa: E731
        lines += ["", f"### W{b[1]}A{b[3]}: each form vs the shared table (positive Δ = the form is worse)", "",
                  "| form | seeds | FID | Δ mean vs shared | per-seed Δ (paired) | seeds ≤ shared | PTQ→FP gap closed |",
                  "|---|---|---|---|---|---|---|",
                  f"| {shared} (shared) | {len(ref)} | {mean_std(list(ref.values()))} | – | – | – | "
                  f"{closure(statistics.mean(ref.values()))} |"]
        for m in METHODS:
            if not m.startswith("dilatequant") or m in (shared, "dilatequant_no_bkd", "dilatequant_no_wd") \
                    or "no_tpq" in m or m in LEVERS:
                continue
            other = {r["seed"]: r["fid"] for r in cells.get((m, b), [])}
            common = sorted(other.keys() & ref.keys())
            if not common:
                continue
            d = [other[k] - ref[k] for k in common]
            lines.append(f"| {m} | {len(other)} | {mean_std(list(other.values()))} | {statistics.mean(d):+.2f} | "
                         f"{', '.join(f'{x:+.2f}' for x in d)} | {sum(x <= 0 for x in d)}/{len(d)} | "
                         f"{closure(statistics.mean(other.values())) if len(other) == len(ref) else '–'} |")
        if lo is not None and hi is not None:
            lines.append(f"\nGap: PTQ {hi:.2f} (mean of {len(ptq)} seeds) → FP {lo:.2f} (mean of {len(fp)}); "
                         f"closed = (PTQ − FID) / (PTQ − FP), on mean FIDs.")
    if lines:
        lines.insert(0, "\n## Per-step activation parameters: the forms against one shared table\n\n"
                        "Variants are named runs of one method with fixed overrides (`VARIANTS` in "
                        "scripts/benchmark.py; docs/tpq.md says what each is).")
    return lines


def levers(cells: dict[tuple[str, str], list[dict]]) -> list[str]:
    """Each lever variant against its base method (same seeds, paired), with the PTQ → FP gap it closes."""
    lines = []
    for b in BITS:
        fp, ptq = cells.get(("fp", "fp")), cells.get(("ptq", b))
        lo = statistics.mean(r["fid"] for r in fp) if fp else None
        hi = statistics.mean(r["fid"] for r in ptq) if ptq else None
        rows = []
        for v in LEVERS:
            base, fixed = VARIANTS[v]
            mine = {r["seed"]: r["fid"] for r in cells.get((v, b), [])}
            ref = {r["seed"]: r["fid"] for r in cells.get((base, b), [])}
            common = sorted(mine.keys() & ref.keys())
            if not common:
                continue
            d = [mine[k] - ref[k] for k in common]
            # a precision variant's gap is measured from PTQ at the same precision, when that cell exists
            same = [p for p, (pb, pf) in VARIANTS.items() if pb == "ptq" and pf == fixed]
            top = statistics.mean(r["fid"] for r in cells[(same[0], b)]) if same and (same[0], b) in cells else hi
            gap = "–" if lo is None or top is None or len(mine) < 3 or base == "ptq" else \
                f"{100 * (top - statistics.mean(mine.values())) / (top - lo):.0f} %" + (f" (from {same[0]})" if same
                                                                                           and top != hi else "")
            rows.append(f"| {v} | {base} | `{' '.join(fixed)}` | {len(mine)} | {mean_std(list(mine.values()))} | "
                        f"{statistics.mean(d):+.2f} | {', '.join(f'{x:+.2f}' for x in d)} | "
                        f"{sum(x <= 0 for x in d)}/{len(d)} | {gap} |")
        if rows:
            lines += ["", f"### W{b[1]}A{b[3]} (positive Δ = the variant is worse than its base)", "",
                      "| variant | base | overrides | seeds | FID | Δ mean vs base | per-seed Δ (paired) | "
                      "seeds ≤ base | PTQ→FP gap closed |", "|---|---|---|---|---|---|---|---|---|", *rows]
    if lines:
        lines.insert(0, "\n## Levers: training and precision variants against their base method\n\n"
                        "docs/w4a4_gap.md says what each is for. `a8_shortcuts` keeps two layers' input "
                        "activations at 8 bits: not strict W4A4, reported only here. `emb_fp` keeps the "
                        "inputs of the layers that read only the timestep embedding in float (weights "
                        "4-bit); its gap is measured from PTQ with the same setting (`ptq_emb_fp`).")
    return lines


def scaling_effect(cells: dict[tuple[str, str], list[dict]]) -> list[str]:
    """What WD / SmoothQuant did to the activations, from the cells' per-layer scaling reports.

    Per layer: per-tensor range after / before, and the channel imbalance (largest per-channel range
    over the median one) before → after; medians over layers and over every seed of the cell.
    """
    rows = []
    for (m, b), rs in sorted(cells.items()):
        layers = [x for r in rs for x in r["scaling_ratios"]]
        if not layers:
            continue
        shrink = statistics.median(x[0] for x in layers)
        before = statistics.median(x[1] for x in layers)
        after = statistics.median(x[2] for x in layers)
        rows.append(f"| {m} | {b.upper()} | {len(layers) // len(rs)} | {shrink:.2f} | {before:.2f} → {after:.2f} |")
    if not rows:
        return []
    return ["", "## What the scaling did to the activations", "",
            "Medians over layers (and seeds) of the per-tensor activation range after / before scaling, "
            "and of the channel imbalance (largest per-channel range / median per-channel range).", "",
            "| method | bits | layer groups | range after / before | channel imbalance before → after |",
            "|---|---|---|---|---|", *rows]


def report(runs: Path, out_md: Path, command: str) -> None:
    cells = collect(runs, out_md.with_name("results_cells.json"))
    where = runs.relative_to(ROOT) if runs.is_relative_to(ROOT) else runs
    lines = ["# DilateQuant vs baselines on the embedded digits teacher", "",
             "`python scripts/benchmark.py` runs the whole grid (resumable; slices with `--methods/--bits/--seeds`) "
             f"and writes this file; this copy was written by `{command}` from the cells under `{where}` and those "
             "recorded in `results_cells.json` (every finished cell's numbers, committed). "
             "Each cell: `python train.py method=M quant=B seed=S`; FID/KID/IS of the student's samples "
             "against the held-out digits (digits feature network), mean ± std over seeds; wall time covers "
             "calibration, training and evaluation, and grows with whatever else shared the machine "
             "(cells run side by side: compare it only roughly); peak memory is the process's peak RSS. "
             "'float branch': SVDQuant's low-rank branch where the student has one — its rank, the layers that "
             "carry it, its multiply-accumulates over those layers' own (per output position) and its float "
             "parameters (the quantized weights of the digits UNet: 1.1M).", "",
             "| method | bits | seeds | FID | KID | IS | float branch | wall s | peak MB | code (CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        for b in (["fp"] if m == "fp" else BITS):
            rs = cells.get((m, b))
            if not rs:
                continue
            lines.append(f"| {m} | {b.upper()} | {len(rs)} | {mean_std([r['fid'] for r in rs])} | "
                         f"{mean_std([r['kid'] for r in rs], 3)} | {mean_std([r['is'] for r in rs])} | "
                         f"{branch_label(rs[0].get('lowrank'))} | {statistics.mean(r['wall_seconds'] for r in rs):.0f} | "
                         f"{max(r['peak_memory_mb'] for r in rs):.0f} | {code_label(rs)} |")
    cpus = sorted({r.get("cpu") or "not recorded" for rs in cells.values() for r in rs})
    lines += ["", "Code: the dq commit each row's cells ran (`*`: with uncommitted changes; `earlier`: cells run "
                  "before results.json recorded its commit — older code, kept for history, not current). "
                  f"Machines: {'; '.join(cpus)}. The same command on the same machine and thread count gives the "
                  "same student bit for bit (tests/test_reproducible.py); another CPU can round differently and "
                  "give another student for a seed, which is why rows are means over seeds."]
    protocols = sorted({r["extra"] for rs in cells.values() for r in rs})
    if len(protocols) > 1:
        lines += ["", "**Cells were run with different protocols** (extra overrides): "
                  + "; ".join(f"`{p}`" for p in protocols) + " — rows mixing them are not comparable."]
    else:
        lines += ["", f"Protocol (extra overrides on every cell): `{protocols[0] if protocols else 'defaults'}`."]
    lines += comparison(cells) + tpq_forms(cells) + levers(cells) + scaling_effect(cells)
    used = [f"`{k}` = `method={v[0]} {' '.join(v[1])}`" for k, v in VARIANTS.items() if any(m == k for m, _ in cells)]
    if used:
        lines += ["", "Variants: " + "; ".join(used) + "."]
    earlier = out_md.with_name("results_earlier.md")
    if earlier.is_file():
        lines += ["", f"History only, not current: [{earlier.name}]({earlier.name}) holds numbers measured with code "
                      "that no longer exists (raw cells not kept)."]
    png = out_md.with_name("results_fid.png")
    plot(cells, png)
    lines += ["", f"![FID vs bits per method]({png.name})"]
    out_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_md} and {png}")


def plot(cells: dict, png: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(BITS)))
    quantized = [m for m in METHODS if m != "fp"]
    for m in METHODS:
        if m == "fp":
            if ("fp", "fp") in cells:
                ax.axhline(statistics.mean(r["fid"] for r in cells[("fp", "fp")]), color="k", ls="--", label="fp")
            continue
        pts = [(i, [r["fid"] for r in cells[(m, b)]]) for i, b in enumerate(BITS) if (m, b) in cells]
        if pts:
            dx = 0.06 * (quantized.index(m) - (len(quantized) - 1) / 2)  # side by side, not on top
            ax.errorbar([i + dx for i, _ in pts], [statistics.mean(v) for _, v in pts],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts], marker="o", capsize=3,
                        label=m)
    ax.set_xticks(xs, [b.upper() for b in BITS])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylabel("FID (digits features, log scale)")
    ax.set_title("FID vs bit-width per method (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--bits", nargs="+", default=BITS, choices=BITS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "benchmarks")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--report-only", action="store_true", help="aggregate existing cells, run nothing")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs}: give 1 or more")
    if not args.report_only:
        grid = [(m, bits, seed) for seed in args.seeds for bits in args.bits for m in args.methods
                if not (m == "fp" and bits != args.bits[0])]  # fp does not depend on bits
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda c: run_cell(args.runs.resolve(), *c, extra, threads), grid))
    report(args.runs.resolve(), args.out, "python scripts/benchmark.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
