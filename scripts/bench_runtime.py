"""Is the exported student smaller and faster? Disk size, speed of FP / reference / int8, and the FID of
the int8 runtime next to the reference runtime — one table, written to docs/runtime.md.

    python scripts/bench_runtime.py                                  # size + speed on ddpm-cifar10 (random init)
    python scripts/bench_runtime.py --student outputs/quantize/<run>/student.safetensors --fid-samples 1000

Speed: one denoiser call on a batch (default 16 images at one DDIM step), the three models interleaved
round by round and the median taken, so the ratios come from one run on one machine state.
Student: W4A4 (first/last layers 8-bit), TPQ tables for DDIM 100, Weight Dilation, min–max tables from
a few random batches (speed does not depend on the values). int8 runs every quantized conv / linear on
oneDNN's u8 × s8 kernels; the attention matmuls (q·kᵀ, P·v) stay fake-quantized in float.
FID: the student's own sampler, the same seeds and noise for both runtimes, digits features.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dq.models.export import export_student, load_export  # noqa: E402
from dq.models.load import DiffusionModel, build_arch  # noqa: E402
from dq.models.sampling import SamplerConfig, sampler_timesteps  # noqa: E402
from dq.models.student import calibrate, prepare, weight_dilation  # noqa: E402
from dq.quant.config import QuantConfig  # noqa: E402


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def random_student(arch: str, steps: int) -> tuple[DiffusionModel, DiffusionModel, dict]:
    teacher = build_arch(arch)
    ts = tuple(sampler_timesteps(teacher, SamplerConfig(steps=steps)))
    qcfg = QuantConfig(w_bits=4, a_bits=4, timesteps=ts)
    s = prepare(copy.deepcopy(teacher.denoiser), qcfg)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(len(ts[i::4]), *teacher.sample_shape, generator=g), torch.tensor(ts[i::4]))
               for i in range(4)]
    weight_dilation(s, batches)
    calibrate(s, batches, "minmax")
    meta = {"quant": {**qcfg.__dict__, "timesteps": list(ts), "skip": []}, "sampler": {"name": "ddim", "steps": steps},
            "method": {"name": "speed-only (random weights, min–max tables)"}, "teacher": teacher.name}
    return teacher, DiffusionModel(s, teacher.scheduler, "student"), meta


def speed(models: dict[str, DiffusionModel], batch: int, repeats: int, t: int) -> dict[str, float]:
    """Median ms per call of each model, interleaved round by round."""
    m0 = next(iter(models.values()))
    x = torch.randn(batch, *m0.sample_shape, generator=torch.Generator().manual_seed(1))
    tt = torch.full((batch,), t)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up: oneDNN primitive caches, packed weights, weight fake-quant cache
            m.family.forward(m.denoiser, x, tt)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m.family.forward(m.denoiser, x, tt)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def profile_int8(model: DiffusionModel, batch: int, t: int) -> str:
    x = torch.randn(batch, *model.sample_shape)
    with torch.no_grad(), torch.profiler.profile() as p:
        model.family.forward(model.denoiser, x, torch.full((batch,), t))
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def fid_rows(student_path: Path, n: int, out: Path) -> list[dict]:
    from dq.data.digits import DataConfig
    from dq.evaluation import Protocol, evaluate_models
    from dq.metrics.image_metrics import MetricsConfig
    from dq.models.checkpoint import load_student, read_meta

    meta = read_meta(student_path)
    student, _ = load_student(student_path)
    folder = export_student(student, meta, out / "export")
    rows = []
    for runtime in ("reference", "int8"):
        model, _ = load_export(folder, runtime)
        p = Protocol(sampler=SamplerConfig(**meta["sampler"]), metrics=MetricsConfig(), data=DataConfig(),
                     cache_dir=str(ROOT / ".cache" / "dq"), num_samples=n, floor=False, grid=16)
        ev = evaluate_models(p, model, {runtime: model.denoiser}, out)
        rows.append(ev["rows"][0])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="ddpm_cifar10")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=100, help="DDIM steps of the student's tables")
    ap.add_argument("--student", type=Path, default=None, help="a student.safetensors for the FID rows")
    ap.add_argument("--fid-samples", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "runtime.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lines = ["# Deployable students: size, speed, quality", "", f"Written by `python scripts/bench_runtime.py "
             f"{' '.join(sys.argv[1:])}` on {torch.get_num_threads()} CPU threads, torch {torch.__version__}.", ""]
    teacher, student, meta = random_student(a.arch, a.steps)
    with tempfile.TemporaryDirectory() as tmp:
        teacher.denoiser.save_pretrained(Path(tmp) / "fp")
        folder = export_student(student, meta, Path(tmp) / "export")
        fp_mb, ex_mb = folder_mb(Path(tmp) / "fp"), folder_mb(folder)
        ref, _ = load_export(folder, "reference")
        i8, _ = load_export(folder, "int8")
    t_mid = meta["quant"]["timesteps"][len(meta["quant"]["timesteps"]) // 2]
    ms = speed({"FP float32": teacher, "reference (fake-quant)": ref, "int8": i8}, a.batch, a.repeats, t_mid)
    fp = ms["FP float32"]
    lines += [f"## Size and speed: {a.arch} architecture (random weights), W4A4, batch {a.batch}", "",
              f"Disk: float32 `save_pretrained` folder {fp_mb:.2f} MB; export folder {ex_mb:.2f} MB "
              f"(**{ex_mb / fp_mb:.3f}×**; 4/32 bits = 0.125 before tables and float tensors).", "",
              "| model | ms per call | images·steps / s | speed vs FP |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {a.batch / v * 1e3:.1f} | {fp / v:.2f}× |" for k, v in ms.items()]
    ratio = fp / ms["int8"]
    print("\n".join(lines))
    if ratio < 1.5:
        lines += ["", "int8 is below 1.5× FP; where its time goes (one call):", "", "```",
                  profile_int8(i8, a.batch, t_mid), "```"]
    if a.student is not None:
        with tempfile.TemporaryDirectory() as tmp:
            rows = fid_rows(a.student, a.fid_samples, Path(tmp))
        lines += ["", f"## Quality: `{a.student}` through both runtimes ({a.fid_samples} images, digits features)",
                  "", "| runtime | FID | KID | IS | images/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['fid']:.3f} | {r['kid']:.4f} | {r['is']:.2f} | {r['images_per_second']:.1f} |"
                  for r in rows]
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
