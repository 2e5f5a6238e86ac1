"""Is the exported student the fastest thing its user can run? One denoiser call of each model a user of
this CPU could deploy instead — float32, bf16 autocast, bf16 + torch.compile, torch's own static int8
flow (PT2E X86InductorQuantizer W8A8 + compile, inductor freezing on), torchao's dynamic int8 — next to
every dq runtime of the W4A4 export (and the W4A8 / W8A8 exports at the main job's batch), interleaved
round by round in one process, median taken; plus export sizes, the CPU and the oneDNN ISA the kernels
used. Written to docs/runtime.md.

    python scripts/bench_runtime.py                        # every cell (arch:batch) not measured yet on this CPU
    python scripts/bench_runtime.py --cells digits:250     # one cell
    python scripts/bench_runtime.py --fid outputs/.../student.safetensors   # FID of each runtime, 1,000 images
    python scripts/bench_runtime.py --cells digits:250 --profile           # where a call's time goes, by kind of work
    python scripts/bench_runtime.py --cells digits:250 --ab groupnorm      # what one feature of `compiled` is worth

Cells are resumable: each runs in its own process and writes benchmarks/runtime/<cpu>/<arch>_b<batch>.json;
a cell already there is kept (--force measures it again), so an interrupted run continues where it stopped.
Students: random weights at the main job's quantization (W4A4 with DilateQuant's skip-shortcut branch,
continuous TPQ over 4 knots, DDIM 50 tables, Weight Dilation, min–max tables) — speed does not depend on
the values. The PT2E and torchao rows need torchao (pip install -r requirements-bench.txt).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers.models.activations import GELU

from dq import allocator, console
from dq.errors import DQError, run_script
from dq.machine import code_version, cpu as cpu_info, onednn_isa, slug as cpu_slug
from dq.models.conditioning import cond_fn_for
from dq.models.export import export_student, load_export
from dq.models.load import DiffusionModel, ModelConfig, build_arch, load_model
from dq.models.sampling import SamplerConfig, sampler_timesteps
from dq.methods.dilatequant import BRANCH
from dq.models.student import calibrate, prepare, shortcut_branch, weight_dilation
from dq.models.attention import QuantAttnProcessor
from dq.quant.config import LowRank, QuantConfig
from dq.quant.groupnorm import ChannelsLastGroupNorm
from dq.quant.lowrank import svd_init

ROOT = Path(__file__).resolve().parents[1]
CELLS = ("digits:250", "digits:1", "ddpm_cifar10:16", "ddpm_cifar10:1", "dit_xl2:2")
PEERS = ("FP bf16 + compile", "PT2E W8A8 + compile")  # the rows a user would pick instead of dq
# setting → its QuantConfig fields. "W4A4" is the main job's default student: DilateQuant's own float low-rank
# branch (dq.methods.dilatequant.BRANCH) on the skip shortcuts where the model has ones it fits, none elsewhere.
W4 = {"w_bits": 4, "a_bits": 4}
BITS = {"W4A4": {**W4, "lowrank": BRANCH}, "W4A8": {"w_bits": 4, "a_bits": 8, "lowrank": BRANCH},
        "W8A8": {"w_bits": 8, "a_bits": 8, "lowrank": BRANCH},
        "W4A4 no branch": W4, "W4A4 split": {**W4, "split_concat": True},
        "W4A4 low-rank 8": {**W4, "lowrank_rank": 8}, "W4A4 low-rank 16": {**W4, "lowrank_rank": 16}}
NEEDS_SKIPS = ("W4A4 no branch", "W4A4 split")  # rows that differ from W4A4 only where the model has skips


def student(teacher: DiffusionModel, bits: dict, folder: Path) -> Path:
    """The export folder of a random-weight student at the main job's quantization."""
    ts = tuple(sampler_timesteps(teacher, SamplerConfig(steps=50)))
    bits = dict(bits)
    if "lowrank" in bits:  # the method's own branch, as the main job resolves it
        branch = shortcut_branch(teacher.denoiser, bits.pop("lowrank")) or LowRank()
        bits.update(lowrank_rank=branch.rank, lowrank_scope=branch.scope)
    qcfg = QuantConfig(**bits, timesteps=ts, tpq_knots=4)
    s = prepare(copy.deepcopy(teacher.denoiser), qcfg)
    g = torch.Generator().manual_seed(0)
    shape = teacher.sample_shape
    batches = [(torch.randn(len(ts[i::25]), *shape, generator=g), torch.tensor(ts[i::25])) for i in range(25)]
    cond = cond_fn_for(teacher, 0)
    if cond is not None:
        batches = [(x, t, cond(torch.arange(len(t)))[0]) for x, t in batches]
    weight_dilation(s, batches[:4])
    svd_init(s)
    calibrate(s, batches, "minmax")
    meta = {"quant": json.loads(json.dumps(qcfg.__dict__, default=list)), "sampler": {"name": "ddim", "steps": 50},
            "method": {"name": "speed-only (random weights, min–max tables)"}, "teacher": teacher.name}
    return export_student(DiffusionModel(s, teacher.scheduler, "student"), meta, folder)


class _Call(torch.nn.Module):
    """(x, t[, cond]) → ε: the signature torch.export and the PT2E flow need."""

    def __init__(self, model: DiffusionModel) -> None:
        super().__init__()
        self.model, self.family = model.denoiser, model.family

    def forward(self, x, t, cond=None):
        return self.family.forward(self.model, x, t, cond)


def pt2e(model: DiffusionModel, args: tuple) -> torch.nn.Module:
    """torch's static int8 flow as its docs give it: export, X86InductorQuantizer defaults, calibrate, convert."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise DQError("the PT2E row needs torchao: pip install -r requirements-bench.txt (or --rows without it)") from None
    exported = torch.export.export(_Call(copy.deepcopy(model)).eval(), args).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for _ in range(2):
        prepared(*args)
    return torch.compile(convert_pt2e(prepared))


def torchao_dynamic(model: DiffusionModel) -> torch.nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    m = _Call(copy.deepcopy(model)).eval()
    quantize_(m, Int8DynamicActivationInt8WeightConfig())
    return m


def rows_for(teacher: DiffusionModel, batch: int, main_batch: bool, tmp: Path) -> tuple[dict, dict]:
    """{row name: () → callable(x, t, cond)} and {row name: disk MB} for one cell; each row is built when
    its builder is called, so a cell too large for memory can hold one row at a time."""
    fp = _Call(teacher).eval()
    x, t, cond = example(teacher, batch)
    float_args = (x, t.float(), cond) if cond is not None else (x, t.float())  # PT2E observes t: a float tensor

    def autocast(f):
        def run(*a):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return f(*a)
        return run

    def pt2e_frozen():
        quantized = pt2e(teacher, float_args)

        def frozen(*a):
            with torch._inductor.config.patch(freezing=True):
                return quantized(*a[:1], a[1].float(), *a[2:])
        return frozen

    rows = {"FP float32": lambda: fp, "FP bf16 autocast": lambda: autocast(fp),
            "FP bf16 + compile": lambda: autocast(torch.compile(copy.deepcopy(fp))),
            "PT2E W8A8 + compile": pt2e_frozen, "torchao dynamic int8": lambda: torchao_dynamic(teacher)}
    teacher.denoiser.save_pretrained(tmp / "fp")
    sizes = {"FP float32": folder_mb(tmp / "fp")}
    for name, bits in BITS.items():
        if name != "W4A4" and not main_batch or name in NEEDS_SKIPS and not teacher.family.concat_splits(teacher.denoiser):
            continue
        folder = student(teacher, bits, tmp / name)
        sizes[f"dq {name}"] = folder_mb(folder)
        for runtime in (("reference", "int8", "compiled") if name == "W4A4" else ("compiled",)):
            rows[f"dq {name} {runtime}"] = lambda folder=folder, runtime=runtime: _Call(load_export(folder, runtime)[0]).eval()
    return rows, sizes


def example(model: DiffusionModel, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    t = torch.full((batch,), int(sampler_timesteps(model, SamplerConfig(steps=50))[25]))
    cond = cond_fn_for(model, 0)
    return x, t, None if cond is None else cond(torch.arange(batch))[0]


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def teacher_of(arch: str) -> DiffusionModel:
    return load_model(ModelConfig()) if arch == "digits" else build_arch(arch)


SEQUENTIAL_BYTES = 1 << 30  # float32 weights above this: rows are measured one after another, not held together


def run_cell(cell: str, repeats: int, out: Path) -> None:
    """Measure one cell in this process and write its JSON.

    Rows are interleaved round by round (the machine's drift hits every row alike); a model whose float32
    weights exceed SEQUENTIAL_BYTES (DiT-XL/2: 2.7 GB) has eight copies in a cell, which do not fit in 24 GB,
    so there each row is built, measured and freed in turn, and float32 is measured again at the end so the
    drift over the cell shows (both recorded)."""
    arch, batch = cell.split(":")
    batch = int(batch)
    teacher = teacher_of(arch)
    x, t, cond = example(teacher, batch)
    args = (x, t) if cond is None else (x, t, cond)
    sequential = sum(p.numel() * p.element_size() for p in teacher.denoiser.parameters()) > SEQUENTIAL_BYTES
    first, times = {}, {}

    def warm(name, f):  # first call: compile, pack, first-call caches
        t0 = time.perf_counter()
        f(*args)
        first[name] = time.perf_counter() - t0
        print(f"{cell} {name}: first call {first[name]:.1f} s", file=sys.stderr, flush=True)

    def once(name, f):
        t0 = time.perf_counter()
        f(*args)
        times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        builders, sizes = rows_for(teacher, batch, cell == CELLS[0], Path(tmp))
        if sequential:
            for name, build in [*builders.items(), ("FP float32 (again, last)", builders["FP float32"])]:
                f = build()
                warm(name, f)
                for _ in range(repeats):
                    once(name, f)
                del f
                gc.collect()
                print(f"{cell} {name}: {statistics.median(times[name]):.1f} ms", file=sys.stderr, flush=True)
        else:
            rows = {name: build() for name, build in builders.items()}
            for name, f in rows.items():
                warm(name, f)
            for _ in range(repeats):
                for name, f in rows.items():
                    once(name, f)
    result = {"cell": cell, "arch": arch, "batch": batch, "threads": torch.get_num_threads(), "repeats": repeats,
              "order": "sequential" if sequential else "interleaved",
              "ms": {k: statistics.median(v) for k, v in times.items()}, "rounds_ms": times,
              "first_call_s": first, "sizes_mb": sizes,
              "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_version(),
              "allocator": allocator.STATE}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def report(ledger: dict, current: str, folder: Path) -> str:
    """docs/runtime.md: every CPU of the ledger (this one first), each with its machine facts, cells and FID rows."""
    where = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    lines = ["# Deployable students: speed against what a user would run instead", "",
             f"Written by `python scripts/bench_runtime.py` from the cells recorded in `docs/runtime_cells.json` "
             f"(this CPU's cells under `{where}/` written over it; one process per cell), one section per CPU: a "
             "ranking can flip with the CPU (AMX tiles or not). Each cell names when and on which dq commit it was "
             "measured (`abc1234`*: with uncommitted code changes; documentation changes do not count): compare "
             "rows within a cell, not across cells or CPUs. Cells measured from 2026-12-07 16:00 run with dq's glibc "
             "malloc settings (dq/allocator.py) for every row alike: freed memory is reused instead of page-faulted "
             "in afresh, which made a row's time depend on the heap's history.", "",
             "One denoiser call, median of interleaved rounds; × is float32's time over the row's, and 'vs best "
             "peer' is the faster of bf16 + compile and PT2E W8A8 + compile over the row's, in the same run "
             "(above 1: dq is faster); 'paired' is the median over rounds of that ratio taken within each round "
             "(the machine's drift between rounds cancels; cells from 2026-12-07 22:00 on). The first call of a compiled row includes its compile (inductor's disk "
             "cache may hold earlier compiles of the same graph). dq rows: random-weight students at the main "
             "job's quantization (continuous TPQ over 4 knots, DDIM-50 tables, Weight Dilation; `W4A4`, `W4A8` and "
             "`W8A8` with DilateQuant's rank-16 float branch on the skip shortcuts where the model has them, "
             "`no branch` without); `compiled` "
             "runs bfloat16 between the integer kernels where the CPU has bf16 instructions "
             "(`DQ_COMPILED_DTYPE=float32` to compare). Attention: under `compiled`, through dq's fused kernel "
             "(q·kᵀ, softmax, P on its grid, P·v per head with the scores in cache; from dq `cd2ac40` on the "
             "grid's integers, both products on AMX bf16 tiles where the CPU has them; dq/quant/qattention.cpp): "
             "heads of any width on the tiles (from dq `41b79df`; before, and without AMX, heads "
             "narrower than 32 only); wider heads elsewhere, and the other runtimes, as two batched matmuls in "
             "float on the grid's values (torchao 0.18's int8 SDPA op has no CPU kernel in its wheel). GroupNorm "
             "under `compiled`: statistics by dq's channels-last kernel (dq/quant/groupnorm.py; cells measured before "
             "`git log -1 dq/quant/groupnorm.py` ran inductor's own).", ""]
    order = [*CELLS, *sorted({c for cells in ledger["cells"].values() for c in cells} - set(CELLS))]
    for slug in sorted(ledger["cells"], key=lambda k: k != current):
        info, cells = ledger["machines"].get(slug, {}), ledger["cells"][slug]
        results = [cells[c] for c in order if c in cells]
        amx = "AMX" if any(f.startswith("amx") for f in info.get("flags", [])) else "no AMX"
        lines += [f"## {info.get('model', slug)} ({amx}){' — where this file was last written' if slug == current else ''}", "",
                  f"CPU flags: {', '.join(info.get('flags', []))}; torch CPU capability "
                  f"{info.get('torch_cpu_capability', '?')}, torch {info.get('torch', '?')}, "
                  f"{results[0]['threads'] if results else '?'} threads. oneDNN kernels used (ONEDNN_VERBOSE): "
                  + "; ".join(f"{k} → `{v}`" for k, v in info.get("onednn", {}).items()) + ".", ""]
        lines += _cell_tables(results)
        if ledger["fid"].get(slug):
            lines += _fid_table(ledger["fid"][slug])
    return "\n".join(lines) + "\n"


def _cell_tables(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        ms = r["ms"]
        best = min(ms[p] for p in PEERS if p in ms)
        order = ("" if r.get("order", "interleaved") == "interleaved" else
                 "Rows measured one after another (the model's copies do not fit in memory together), float32 "
                 "measured first and again last; ratios use the first. ")
        when = f"Measured {r['time']} at dq {_code(r)}. "
        lines += [f"### {r['arch']}, batch {r['batch']}", "", when + order, "", "| model | ms per call | × float32 | "
                  "vs best peer | paired | first call s | disk MB |", "|---|---|---|---|---|---|---|"]
        paired = paired_vs_peer(r)
        for name, v in ms.items():
            owners = [k for k in r["sizes_mb"] if name == k or name.startswith(k + " ")]  # the longest: its export
            size = f"{r['sizes_mb'][max(owners, key=len)]:.2f}" if owners else ""
            pair = f"{paired[name]:.2f}×" if name in paired else "–"
            lines.append(f"| {name} | {v:.1f} | {ms['FP float32'] / v:.2f}× | {best / v:.2f}× | {pair} | "
                         f"{r['first_call_s'][name]:.1f} | {size} |")
        lines.append("")
    return lines


def paired_vs_peer(record: dict) -> dict[str, float]:
    """Per row: the median over rounds of (the faster peer's time in that round / the row's), for cells whose rows
    ran interleaved and recorded their rounds (from 2026-12-07 22:00); {} otherwise. A drift of the machine between
    rounds cancels in each round's ratio, which the medians' ratio ('vs best peer') does not do."""
    rounds = record.get("rounds_ms")
    if not rounds or record.get("order", "interleaved") != "interleaved" or not all(p in rounds for p in PEERS):
        return {}
    best = [min(ts) for ts in zip(*(rounds[p] for p in PEERS))]
    return {name: statistics.median(b / t for b, t in zip(best, ts)) for name, ts in rounds.items()}


def _code(record: dict) -> str:
    """`commit` of a record (* where the tree had code changes), or "not recorded" (records before 2026-12-07)."""
    code = record.get("code") or {}
    return f"`{code['commit'][:7]}`{'*' if code.get('dirty') else ''}" if code.get("commit") else "not recorded"


def _fid_table(fid: list[dict]) -> list[str]:
    lines = ["### Quality: the main job's students through each runtime", "",
             f"{fid[0]['num_samples']} images per row, each student's own sampler, the same seeds and noise for "
             "every runtime, digits features; sampling time includes the first call's compile.", "",
             "| student | runtime | FID | KID | IS | sampling s | dq |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {f['bits']} `{f['student']}` | {r['name']} | {r['fid']:.3f} | {r['kid']:.4f} | {r['is']:.2f} | "
              f"{r['seconds']:.1f} | {_code(f)} |" for f in fid for r in f["rows"]]
    return lines + [""]


def fid_rows(student_path: Path, n: int, runtimes: list[str]) -> dict:
    """FID / KID / IS of one student through each runtime: its own sampler, the same seeds and noise."""
    from dq.data.digits import DataConfig
    from dq.evaluation import Protocol, evaluate_models
    from dq.metrics.image_metrics import MetricsConfig
    from dq.models.export import export_from_checkpoint
    from dq.models.checkpoint import read_meta

    meta = read_meta(student_path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_from_checkpoint(student_path, Path(tmp) / "export")
        for runtime in runtimes:
            model, _ = load_export(folder, runtime)
            p = Protocol(sampler=SamplerConfig(**meta["sampler"]), metrics=MetricsConfig(), data=DataConfig(),
                         cache_dir=str(ROOT / ".cache" / "dq"), num_samples=n, floor=False, grid=16)
            t0 = time.perf_counter()
            row = evaluate_models(p, model, {runtime: model.denoiser}, Path(tmp) / runtime)["rows"][0]
            rows.append({**row, "seconds": time.perf_counter() - t0})
    bits = f"W{meta['quant']['w_bits']}A{meta['quant']['a_bits']}"
    return {"student": str(student_path), "bits": bits, "num_samples": n, "rows": rows,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_version()}


# What a profiled call's self time is spent on, by kind: inductor's fused kernels (named after the ops they fuse)
# and the library ops the graph calls. Self time only, so nothing is counted twice.
KINDS = (("graph_", "group_norm", "fused kernels with a GroupNorm (norm, SiLU, quantize, adds)"),
         ("graph_", "softmax", "fused kernels with a softmax (attention scores, P quantizer)"),
         ("graph_", "", "other fused kernels (quantize, upsample, residual, ...)"),
         ("onednn::qconv", "", "int8 convolutions (oneDNN)"), ("onednn::qlinear", "", "int8 matmuls (oneDNN)"),
         ("aten::mkldnn_convolution", "", "float / bf16 convolutions (oneDNN)"),
         ("aten::_scaled_dot_product", "", "fused attention (SDPA)"), ("aten::bmm", "", "attention matmuls (bmm)"),
         ("dq::qattention", "", "fused quantized attention (dq)"), ("dq::gn_stats", "", "GroupNorm statistics (dq)"),
         ("aten::addmm", "", "float matmuls"), ("aten::mm", "", "float matmuls"))


TOP_KERNELS = 8


def profile_rows(cell: str, names: list[str], calls: int = 3) -> str:
    """Markdown tables: per row of ``cell``, ms per call by kind of work (torch.profiler over ``calls`` calls)."""
    torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's kernels show up by name
    arch, batch = cell.split(":")
    teacher = teacher_of(arch)
    x, t, cond = example(teacher, int(batch))
    args = (x, t) if cond is None else (x, t, cond)
    out = [f"## Where the time goes: {cell}, {cpu_info()['model']}, {torch.get_num_threads()} threads", ""]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        builders, _ = rows_for(teacher, int(batch), cell == CELLS[0], Path(tmp))
        unknown = [n for n in names if n not in builders]
        if unknown:
            raise DQError(f"--profile {unknown[0]!r}: not a row of {cell}; rows: {', '.join(builders)}")
        for name in names:
            f = builders[name]()
            for _ in range(2):
                f(*args)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    f(*args)
            spent: dict[str, float] = {}
            for e in prof.key_averages():
                kind = next((k for pre, sub, k in KINDS if e.key.startswith(pre) and sub in e.key),
                            "framework and other ops")
                spent[kind] = spent.get(kind, 0.0) + e.self_cpu_time_total / 1e3 / calls
            total = sum(spent.values())
            out += [f"### {name}: {total:.1f} ms of self time per call", "", "| kind of work | ms per call | share |",
                    "|---|---|---|"]
            out += [f"| {k} | {v:.1f} | {100 * v / total:.0f} % |" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])]
            top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:TOP_KERNELS]
            out += ["", f"Its {TOP_KERNELS} heaviest kernels and ops:", "", "| ms per call | calls | name |", "|---|---|---|"]
            out += [f"| {e.self_cpu_time_total / 1e3 / calls:.1f} | {e.count // calls} | `{e.key[:100]}` |" for e in top]
            out.append("")
            del f
            gc.collect()
    return "\n".join(out)


# A/B of one feature of runtime=compiled: the W4A4 student loaded twice, the feature on in one copy and off in the
# other, both compiled and measured interleaved in one process, paired per round; once with each copy loaded first,
# each order in its own process (a second compiled copy in a process runs a few % slower: docs/design.md).
FEATURES = {"groupnorm": "GroupNorm statistics by dq::gn_stats (off: inductor's own GroupNorm)",
            "attention": "attention through dq's fused kernel (off: the batched matmuls)",
            "wide-heads": "heads of 32 and wider through the fused kernel too (off: the narrower ones only)",
            "gelu": "an MLP's GELU as its int8 matmul's oneDNN post-op (off: inductor's GELU after the matmul)"}
ORDERS = (("on", "off"), ("off", "on"))


def feature_off(model: torch.nn.Module, feature: str) -> int:
    """Turn ``feature`` off in a student loaded on runtime=compiled, before its first call; how many modules."""
    changed = 0
    for m in model.modules():
        if feature == "groupnorm" and isinstance(m, ChannelsLastGroupNorm):
            m.__class__ = torch.nn.GroupNorm  # the same parameters; the compiled graph traces torch's GroupNorm
        elif feature == "attention" and isinstance(m, QuantAttnProcessor) and m.fused:
            m.fused = False
        elif feature == "wide-heads" and isinstance(m, QuantAttnProcessor) and m.wide:
            m.wide = False
        elif feature == "gelu" and isinstance(m, GELU) and "gelu" in m.__dict__:
            m.proj.fuse_post_op("none")
            del m.gelu  # the module's own GELU again
        else:
            continue
        changed += 1
    return changed


def run_ab(cell: str, feature: str, order: tuple[str, str], repeats: int, out: Path) -> None:
    """One order of an A/B (see FEATURES) in this process; writes its JSON."""
    arch, batch = cell.split(":")
    teacher = teacher_of(arch)
    x, t, cond = example(teacher, int(batch))
    args = (x, t) if cond is None else (x, t, cond)
    times: dict[str, list[float]] = {arm: [] for arm in order}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        folder = student(teacher, BITS["W4A4"], Path(tmp) / "W4A4")
        arms, changed = {}, 0
        for arm in order:
            model = load_export(folder, "compiled")[0]
            if arm == "off":
                changed = feature_off(model.denoiser, feature)
            arms[arm] = _Call(model).eval()
            arms[arm](*args)  # compile
        if not changed:
            raise DQError(f"--ab {feature}: the {arch} student has no module it applies to")
        for _ in range(repeats):
            for arm, f in arms.items():
                t0 = time.perf_counter()
                f(*args)
                times[arm].append((time.perf_counter() - t0) * 1e3)
    paired = statistics.median(off / on for on, off in zip(times["on"], times["off"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cell": cell, "feature": feature, "order": list(order), "modules": changed,
                               "rounds_ms": times, "ms": {k: statistics.median(v) for k, v in times.items()},
                               "paired_off_over_on": paired, "threads": torch.get_num_threads(),
                               "time": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_version()}, indent=1))


def ab_table(records: list[dict], info: dict) -> str:
    """Markdown: per cell, each order's medians and paired ratio (off / on: above 1, the feature pays), and the
    geometric mean of the two orders, which cancels the load-order effect to first order."""
    feature = records[0]["feature"]
    lines = [f"## A/B: {FEATURES[feature]}", "", f"{info['model']}, {records[0]['threads']} threads, dq "
             f"{_code(records[0])}, W4A4 compiled, {len(records[0]['rounds_ms']['on'])} rounds per order; "
             "paired: median over rounds of off / on (above 1: the feature makes the call faster).", "",
             "| cell | on first: on / off ms, paired | off first: on / off ms, paired | both orders |",
             "|---|---|---|---|"]
    cells = dict.fromkeys(r["cell"] for r in records)
    for cell in cells:
        by = {tuple(r["order"]): r for r in records if r["cell"] == cell}
        cols = [f"{r['ms']['on']:.1f} / {r['ms']['off']:.1f}, {r['paired_off_over_on']:.3f}" if r else "–"
                for r in (by.get(o) for o in ORDERS)]
        both = [r["paired_off_over_on"] for r in by.values()]
        mean = f"**{math.prod(both) ** (1 / len(both)):.3f}**" if len(both) == 2 else "–"
        lines.append(f"| {cell} | {cols[0]} | {cols[1]} | {mean} |")
    return "\n".join(lines + [""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="+", default=list(CELLS), help=f"arch:batch, default {' '.join(CELLS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--force", action="store_true", help="measure cells that already have a result again")
    ap.add_argument("--fid", type=Path, nargs="+", default=None,
                    help="student.safetensors files: FID through each runtime (the first also through int8)")
    ap.add_argument("--fid-samples", type=int, default=1000)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "runtime")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "runtime.md")
    ap.add_argument("--profile", nargs="*", metavar="ROW", default=None,
                    help="where the time goes: profile these rows of the first --cells cell (default: the two peers "
                         "and dq W4A4 compiled) and print ms per call by kind of work; measures nothing else")
    ap.add_argument("--ab", choices=sorted(FEATURES), default=None,
                    help="what one feature of runtime=compiled is worth on each --cells cell: the W4A4 student with "
                         "it on and off, paired per round, in both load orders; prints a table, measures nothing else")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: measure one cell in this process
    ap.add_argument("--ab-order", choices=["on,off", "off,on"], help=argparse.SUPPRESS)  # internal: one A/B order
    a = ap.parse_args()
    console.configure()  # what third-party libraries may print (dynamo's warnings while compiling a row)
    torch.set_num_threads(a.threads)
    # every row alike: freed memory is reused instead of page-faulted in afresh. Without it a row's time
    # depended on the heap's history (bf16 + compile on digits b250: 74 ms alone in a process, 56 ms as one row
    # of a cell) more than on its kernels
    allocator.tune()
    info = cpu_info()
    folder = a.results / cpu_slug(info)
    if a.cell and a.ab:
        order = tuple(a.ab_order.split(","))
        run_ab(a.cell, a.ab, order, a.repeats, folder / "ab" / f"{a.ab}_{a.cell.replace(':', '_b')}_{order[0]}_first.json")
        return 0
    if a.cell:
        run_cell(a.cell, a.repeats, folder / f"{a.cell.replace(':', '_b')}.json")
        return 0
    if a.profile is not None:
        print(profile_rows(a.cells[0], a.profile or [*PEERS, "dq W4A4 compiled"]))
        return 0
    for cell in a.cells:
        arch, _, batch = cell.partition(":")
        if arch not in ("digits", *CELLS_ARCHS) or not batch.isdigit():
            raise DQError(f"--cells {cell!r}: expected arch:batch with arch one of digits, {', '.join(CELLS_ARCHS)}")
    if a.ab:
        records = []
        for cell in a.cells:
            for order in ORDERS:
                out = folder / "ab" / f"{a.ab}_{cell.replace(':', '_b')}_{order[0]}_first.json"
                cmd = [sys.executable, __file__, "--cell", cell, "--ab", a.ab, "--ab-order", ",".join(order),
                       "--threads", str(a.threads), "--repeats", str(a.repeats), "--results", str(a.results)]
                if subprocess.run(cmd).returncode != 0:
                    print(f"{cell} ({order[0]} first): failed (see above); the others go on", file=sys.stderr)
                elif out.is_file():
                    records.append(json.loads(out.read_text()))
        if records:
            print(ab_table(records, info))
        return 0 if records else 1
    folder.mkdir(parents=True, exist_ok=True)
    info_file = folder / "machine.json"
    if a.force or not info_file.exists():
        info_file.write_text(json.dumps({**info, "onednn": onednn_isa()}, indent=1))
    for cell in a.cells:
        out = folder / f"{cell.replace(':', '_b')}.json"
        if out.exists() and not a.force:
            print(f"{cell}: kept {out}", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--cell", cell, "--threads", str(a.threads), "--repeats", str(a.repeats),
               "--results", str(a.results)]
        if subprocess.run(cmd).returncode != 0:
            print(f"{cell}: failed (see above); the other cells go on", file=sys.stderr)
    if a.fid is not None:
        for path in a.fid:
            if not path.is_file():
                raise DQError(f"--fid {path}: no such student.safetensors (python train.py writes one per run)")
        fid = [fid_rows(p, a.fid_samples, ["reference", "int8", "compiled"] if i == 0 else ["reference", "compiled"])
               for i, p in enumerate(a.fid)]
        (folder / "fid.json").write_text(json.dumps(fid, indent=1))
    slug = cpu_slug(info)
    ledger = merge_ledger(a.out.with_name("runtime_cells.json"), slug, folder)
    a.out.write_text(report(ledger, slug, folder))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


CELLS_ARCHS = ("ddpm_cifar10", "dit_xl2", "unet2d", "dit_tiny")


def merge_ledger(path: Path, slug: str, folder: Path) -> dict:
    """The committed record of every measured cell (docs/runtime_cells.json: per CPU, its machine facts,
    cells and FID rows), with this CPU's cells and FID rows under ``folder`` written over it (per cell, per
    student); written back, so cells outlive the machine that measured them and the report never drops a
    cell it once had."""
    ledger = json.loads(path.read_text()) if path.is_file() else {"machines": {}, "cells": {}, "fid": {}}
    if (folder / "machine.json").is_file():
        ledger["machines"][slug] = json.loads((folder / "machine.json").read_text())
    cells = ledger["cells"].setdefault(slug, {})
    for f in sorted(folder.glob("*_b*.json")):
        r = json.loads(f.read_text())
        cells[r["cell"]] = r
    if (folder / "fid.json").is_file():  # per student: a student measured again replaces its rows
        fresh = json.loads((folder / "fid.json").read_text())
        kept = [f for f in ledger["fid"].get(slug, []) if f["student"] not in {g["student"] for g in fresh}]
        ledger["fid"][slug] = kept + fresh
    path.write_text(json.dumps(ledger, indent=1) + "\n")
    return ledger


if __name__ == "__main__":
    run_script(main)
