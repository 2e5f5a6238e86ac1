"""Per-step error of quantized students against the FP teacher along the DDIM sampling trajectory.

For N images (noise ``initial_noise(arange(N), shape, seed)``) and each student checkpoint:

1. Local error, on the teacher's own DDIM trajectory: at step i (raw t) ε_T = teacher(x_t) and
   ε_S = student(x_t) on the same x_t; e = ε_S − ε_T. Per step, pooled over all N images and pixels:
     rel MSE      ‖e‖² / ‖ε_T‖²
     bias         e's per-channel mean b_c; its share b of ‖e‖² (Σ_c n·b_c² / ‖e‖²)
     scale        e ≈ b_c + k·ε_T fitted by least squares (a per-channel intercept and one slope k);
                  share s = the k·(ε_T − mean_c ε_T) part of ‖e‖². Bias, scale and rest are orthogonal,
                  so b + s + rest = 1. (``k_raw`` in the JSON: the slope without intercept, e ≈ k·ε_T.)
2. Accumulated error, on the student's own trajectory: teacher and student each sample from the same
   noise; the row of step i gives ‖x_S − x_T‖² / ‖x_T‖² of the sample step i produces (the last row is
   x_0; the summary also gives x_0 clamped to [−1, 1], i.e. the images).

Prints a table per student and a summary (local rel MSE averaged over the steps with t ≤ --split-t and
t > --split-t, pooled bias/scale shares, x_0 error), writes a figure (local rel MSE vs raw t, log y;
accumulated error vs step) and a JSON of all numbers. The embedded digits teacher, DDIM η = 0. Reproduce
docs/step_error.png / docs/step_error.json (one CPU thread: 3.7 min beside a running benchmark):

    python scripts/step_error.py --students \\
        per_step=benchmarks/dilatequant/w4a4/seed0/student.safetensors \\
        shared=benchmarks/dilatequant_no_tpq/w4a4/seed0/student.safetensors \\
        knots=benchmarks/dilatequant_knots/w4a4/seed0/student.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dq.errors import DQError, run_script  # noqa: E402
from dq.models.families import family_of  # noqa: E402
from dq.models.sampling import SamplerConfig, denoise, initial_noise, make_sampler  # noqa: E402


# ------------------------------------------------------------------------------------------ statistics
class Moments:
    """Running sums (float64) from which one step's local-error decomposition is computed; sums over
    batches give the same numbers as one batch of all images."""

    def __init__(self, channels: int) -> None:
        z = lambda: torch.zeros(channels, dtype=torch.float64)  # noqa: E731
        self.n = 0  # elements per channel
        self.sum_e, self.sum_t = z(), z()
        self.ee = self.tt = self.et = 0.0

    def add(self, e: torch.Tensor, eps_t: torch.Tensor) -> None:
        """``e`` = ε_S − ε_T and ``eps_t`` = ε_T, both [B, C, ...]."""
        e, eps_t = e.double(), eps_t.double()
        dims = [d for d in range(e.dim()) if d != 1]
        self.n += e.numel() // e.shape[1]
        self.sum_e += e.sum(dims)
        self.sum_t += eps_t.sum(dims)
        self.ee += float((e * e).sum())
        self.tt += float((eps_t * eps_t).sum())
        self.et += float((e * eps_t).sum())

    def result(self) -> dict[str, float]:
        mean_e, mean_t = self.sum_e / self.n, self.sum_t / self.n
        bias = self.n * float((mean_e ** 2).sum())
        cov_et = self.et - self.n * float((mean_e * mean_t).sum())  # centred per channel
        var_t = self.tt - self.n * float((mean_t ** 2).sum())
        k = cov_et / var_t if var_t > 0 else 0.0
        scale = k * cov_et
        ee = max(self.ee, 1e-300)
        return {"local_rel_mse": self.ee / self.tt, "bias_share": bias / ee, "scale_k": k,
                "scale_share": scale / ee, "rest_share": max(self.ee - bias - scale, 0.0) / ee,
                "scale_k_raw": self.et / self.tt, "bias_per_channel": mean_e.tolist()}


class RelErr:
    """Σ‖a − b‖² / Σ‖b‖² over batches."""

    def __init__(self) -> None:
        self.num = self.den = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.num += float(((a.double() - b.double()) ** 2).sum())
        self.den += float((b.double() ** 2).sum())

    @property
    def value(self) -> float:
        return self.num / self.den


# ------------------------------------------------------------------------------------------ measurement
def _eps_fn(denoiser: torch.nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    family = family_of(denoiser)
    return lambda x, t: family.forward(denoiser, x, torch.full((x.shape[0],), t, dtype=torch.long), None)


@torch.no_grad()
def measure(teacher, students: dict[str, torch.nn.Module], sampler: SamplerConfig, n: int, seed: int,
            batch_size: int, log: Callable[[str], None] = lambda s: None) -> dict:
    """Local and accumulated per-step errors of each student denoiser against ``teacher`` (a
    DiffusionModel, unconditional) on ``n`` images; returns {"timesteps", "students": {name: {...}}}."""
    timesteps = [int(t) for t in make_sampler(teacher, sampler).timesteps]
    shape = teacher.sample_shape
    t_eps, s_eps = _eps_fn(teacher.denoiser), {k: _eps_fn(d) for k, d in students.items()}
    local = {k: [Moments(shape[0]) for _ in timesteps] for k in students}
    acc = {k: [RelErr() for _ in timesteps] for k in students}
    x0, x0_img = {k: RelErr() for k in students}, {k: RelErr() for k in students}
    for start in range(0, n, batch_size):
        noise = initial_noise(torch.arange(start, min(n, start + batch_size)), shape, seed)
        traj: list[torch.Tensor] = []  # the teacher's sample after each step

        def on_teacher_step(step: int, t: int, x: torch.Tensor) -> None:
            if step > 0:
                traj.append(x.clone())
            eps_t = t_eps(x, t)
            for k, f in s_eps.items():
                local[k][step].add(f(x, t) - eps_t, eps_t)

        t0 = time.time()
        traj.append(denoise(teacher.denoiser, make_sampler(teacher, sampler), noise.clone(),
                            on_step=on_teacher_step, eta=sampler.eta))
        log(f"  images {start}..{start + len(noise) - 1}: teacher trajectory + local errors {time.time() - t0:.0f} s")
        for k, d in students.items():
            def on_student_step(step: int, t: int, x: torch.Tensor, k: str = k) -> None:
                if step > 0:
                    acc[k][step - 1].add(x, traj[step - 1])

            t0 = time.time()
            out = denoise(d, make_sampler(teacher, sampler), noise.clone(), on_step=on_student_step, eta=sampler.eta)
            acc[k][-1].add(out, traj[-1])
            x0[k].add(out, traj[-1])
            x0_img[k].add(out.clamp(-1, 1), traj[-1].clamp(-1, 1))
            log(f"  images {start}..{start + len(noise) - 1}: {k} trajectory {time.time() - t0:.0f} s")
    result = {"timesteps": timesteps, "students": {}}
    for k in students:
        rows = [{"step": i, "t": t, **local[k][i].result(), "acc_rel_err": acc[k][i].value}
                for i, t in enumerate(timesteps)]
        result["students"][k] = {"steps": rows, "x0_rel_err": x0[k].value, "x0_rel_err_clamped": x0_img[k].value,
                                 "_moments": local[k]}
    return result


def summarize(res: dict, split_t: int) -> dict:
    """Means over all steps, steps with t ≤ split_t ('low'; 'low_no_t0' without t = 0) and t > split_t
    ('high'); shares pooled over those steps; the worst step; x_0 error."""
    rows, moments = res["steps"], res.pop("_moments")
    out: dict = {}
    parts_of = (("all", lambda t: True), ("low", lambda t: t <= split_t), ("low_no_t0", lambda t: 0 < t <= split_t),
                ("high", lambda t: t > split_t))
    for part, keep in parts_of:
        idx = [i for i, r in enumerate(rows) if keep(r["t"])]
        if not idx:
            continue
        ee = sum(moments[i].ee for i in idx)
        parts = [moments[i].result() for i in idx]
        out[part] = {
            "n_steps": len(idx),
            "mean_local_rel_mse": sum(rows[i]["local_rel_mse"] for i in idx) / len(idx),
            "max_local_rel_mse": max(rows[i]["local_rel_mse"] for i in idx),
            # shares pooled over the steps: Σ component energy / Σ ‖e‖²
            "bias_share": sum(p["bias_share"] * moments[i].ee for p, i in zip(parts, idx)) / ee,
            "scale_share": sum(p["scale_share"] * moments[i].ee for p, i in zip(parts, idx)) / ee,
            "mean_scale_k": sum(rows[i]["scale_k"] for i in idx) / len(idx),
            "share_of_error_energy": ee / sum(m.ee for m in moments),
        }
    worst = max(rows, key=lambda r: r["local_rel_mse"])
    out["worst_step"] = {"step": worst["step"], "t": worst["t"], "local_rel_mse": worst["local_rel_mse"]}
    out["x0_rel_err"], out["x0_rel_err_clamped"] = res["x0_rel_err"], res["x0_rel_err_clamped"]
    return out


# ------------------------------------------------------------------------------------------ loading / output
def parse_students(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DQError(f"--students entry {item!r} is not NAME=path/to/student.safetensors")
        if name in dict(out):
            raise DQError(f"--students name {name!r} is given twice; names must be unique")
        out.append((name, Path(path)))
    return out


def load_checked(path: Path, timesteps: list[int]):
    """The student denoiser and its metadata; its tables must cover the sampler's timesteps."""
    from dq.models.checkpoint import load_student

    model, meta = load_student(path)
    q = meta["quant"]
    if not q.get("shared_tables") and not set(timesteps) <= set(q["timesteps"]):
        s = meta.get("sampler", {})
        raise DQError(f"{str(path)!r} has tables for the {len(q['timesteps'])} timesteps of "
                      f"{s.get('name', '?')} {s.get('steps', '?')}, not for the {len(timesteps)} steps asked; "
                      f"use --steps {s.get('steps', len(q['timesteps']))}")
    return model.denoiser, meta


def tables_kind(meta: dict) -> str:
    q = meta["quant"]
    if q.get("shared_tables"):
        return "shared table"
    return f"knot form, K={q['tpq_knots']}" if q.get("tpq_knots") else f"per-step tables, T={len(q['timesteps'])}"


def print_table(name: str, res: dict, info: str) -> None:
    print(f"\n{name}  ({info})")
    print("| step | t | local rel MSE | bias share | k | scale share | rest share | acc. rel err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["steps"]:
        print(f"| {r['step']} | {r['t']} | {r['local_rel_mse']:.4g} | {r['bias_share']:.3f} | {r['scale_k']:+.4f} | "
              f"{r['scale_share']:.3f} | {r['rest_share']:.3f} | {r['acc_rel_err']:.4g} |")


def print_summary(summaries: dict[str, dict], split_t: int) -> None:
    print(f"\nSummary (local rel MSE: mean over steps; shares: pooled ‖component‖² / ‖e‖²; low: t ≤ {split_t})")
    print(f"| student | local all | local t≤{split_t} | local 0<t≤{split_t} | local t>{split_t} | "
          f"t≤{split_t} share of Σ‖e‖² | bias share | scale share | k t≤{split_t} | k t>{split_t} | worst step (t) | "
          f"x0 rel err | x0 rel err [−1,1] |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for k, s in summaries.items():
        lo, lo1, hi, al = s.get("low", {}), s.get("low_no_t0", {}), s.get("high", {}), s["all"]
        f = lambda d, key, fmt=".4g": format(d[key], fmt) if key in d else "–"  # noqa: E731
        print(f"| {k} | {al['mean_local_rel_mse']:.4g} | {f(lo, 'mean_local_rel_mse')} | "
              f"{f(lo1, 'mean_local_rel_mse')} | {f(hi, 'mean_local_rel_mse')} | "
              f"{f(lo, 'share_of_error_energy', '.3f')} | {al['bias_share']:.3f} | {al['scale_share']:.3f} | "
              f"{f(lo, 'mean_scale_k', '+.4f')} | {f(hi, 'mean_scale_k', '+.4f')} | "
              f"{s['worst_step']['step']} ({s['worst_step']['t']}) | {s['x0_rel_err']:.4g} | {s['x0_rel_err_clamped']:.4g} |")


def plot(result: dict, split_t: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, res in result["students"].items():
        rows = res["steps"]
        a.plot([r["t"] for r in rows], [r["local_rel_mse"] for r in rows], marker=".", label=k)
        b.plot([r["step"] for r in rows], [r["acc_rel_err"] for r in rows], marker=".", label=k)
    a.axvline(split_t, color="grey", ls=":", lw=1)
    a.set(xlabel="raw timestep t", ylabel="‖ε_S − ε_T‖² / ‖ε_T‖²  (teacher's x_t)", yscale="log",
          title="local error on the teacher's trajectory")
    b.set(xlabel=f"sampler step (0: t = {result['timesteps'][0]}, {len(result['timesteps']) - 1}: t = "
                 f"{result['timesteps'][-1]})", ylabel="‖x_S − x_T‖² / ‖x_T‖²  after the step",
          yscale="log", title="accumulated error on the student's own trajectory")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", nargs="+", required=True, metavar="NAME=PATH",
                    help="student checkpoints (student.safetensors written by train.py), each with a name")
    ap.add_argument("--n", type=int, default=256, help="images (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50; the students' trained schedule)")
    ap.add_argument("--batch-size", type=int, default=256, help="images per model call (default 256)")
    ap.add_argument("--split-t", type=int, default=80, help="summary splits steps at raw t ≤ this (default 80)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out-png", type=Path, default=ROOT / "docs" / "step_error.png")
    ap.add_argument("--out-json", type=Path, default=ROOT / "docs" / "step_error.json")
    a = ap.parse_args(argv)
    try:
        for flag in ("n", "batch_size", "threads", "steps"):
            if getattr(a, flag) < 1:
                raise DQError(f"--{flag.replace('_', '-')}={getattr(a, flag)} must be >= 1")
        torch.set_num_threads(a.threads)
        from dq.models.load import ModelConfig, load_model

        paths = parse_students(a.students)
        teacher = load_model(ModelConfig())
        if teacher.conditional:
            raise DQError(f"teacher {teacher.name} is conditional; this script measures unconditional models only")
        sampler = SamplerConfig(name="ddim", steps=a.steps, eta=0.0)
        timesteps = [int(t) for t in make_sampler(teacher, sampler).timesteps]
        students, metas = {}, {}
        for name, path in paths:
            students[name], metas[name] = load_checked(path, timesteps)
    except DQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python scripts/step_error.py " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    print(f"{command}\nteacher {teacher.name}, DDIM {a.steps} (η = 0), {a.n} images, noise seed {a.seed}, "
          f"{a.threads} thread(s)", flush=True)
    t0 = time.time()
    result = measure(teacher, students, sampler, a.n, a.seed, a.batch_size, log=lambda s: print(s, flush=True))
    summaries = {}
    for name, path in paths:
        m = metas[name]
        info = (f"{m.get('method', {}).get('name', '?')}, W{m['quant']['w_bits']}A{m['quant']['a_bits']}, "
                f"{tables_kind(m)}, {path}")
        res = result["students"][name]
        summaries[name] = res["summary"] = summarize(res, a.split_t)
        res.update(path=str(path), info=info, quant=m["quant"], method=m.get("method"), sampler=m.get("sampler"))
        print_table(name, res, info)
    print_summary(summaries, a.split_t)
    result.update(command=command, teacher=teacher.name, sampler={"name": "ddim", "steps": a.steps, "eta": 0.0},
                  n=a.n, seed=a.seed, split_t=a.split_t, seconds=round(time.time() - t0, 1),
                  definitions=__doc__.split("\nPrints")[0])
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, a.split_t, a.out_png, f"quantized students vs FP teacher ({teacher.name}), DDIM {a.steps}, "
                                      f"{a.n} images, noise seed {a.seed}")
    print(f"\nwrote {a.out_json} and {a.out_png} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    run_script(main)
