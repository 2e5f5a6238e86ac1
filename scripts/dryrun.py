"""Dry runs at real size: each paper preset's whole pipeline on a random-init stand-in of its real
architecture — calibration trajectories → Weight Dilation → block-wise distillation → sampling → scoring
(train.py debug=dryrun), export (export.py), and the export sampled through the int8 runtime with no
other argument (eval.py ckpt_path=<export>) — with reduced counts, timed and measured per phase.
Writes docs/scale.md: the measurements, and from them the cost of each paper protocol on this machine
and a projection for one 80 GB GPU.

    python scripts/dryrun.py                           # every preset not measured yet on this CPU
    python scripts/dryrun.py --presets ddpm_cifar10    # one
    python scripts/dryrun.py --report                  # docs/scale.md from the cells measured so far

Each preset is a resumable cell: benchmarks/scale/<cpu>/<preset>.json (--force measures it again).
Peak memory is each command's peak resident set (os.wait4), and per phase inside train.py (results.json
``phases``). Stand-in weights are random: the scores of a dry run mean nothing; its time and memory do.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

import dq.config  # noqa: F401  (registers the typed schemas the yaml files start from)
from dq import machine
from dq.errors import DQError, run_script
from dq.models.blocks import state_nbytes
from dq.models.conditioning import cond_fn_for
from dq.models.load import ModelConfig, load_model

ROOT = Path(__file__).resolve().parents[1]
# preset → train.py overrides (its paper protocol is the composed config without debug=dryrun)
PRESETS = {
    "ddpm_cifar10": ["experiment=ddpm_cifar10", "model=standin_ddpm_cifar10"],
    "ldm_bedroom": ["experiment=ldm_bedroom", "model=standin_ldm_bedroom"],
    "sd15": ["experiment=sd15", "model=standin_sd15"],
    "dit_xl2": ["model=standin_dit_xl2"],
}
LIMIT_S, LIMIT_GB = 30 * 60, 20


def cpu_name() -> str:
    info = machine.cpu()
    return f"{info['model']} ({'AMX' if 'amx_int8' in info['flags'] else 'no AMX'}; {', '.join(info['flags'])})"


def run(cmd: list[str], log: Path) -> dict:
    """Run a dq command; its wall seconds, peak RSS (os.wait4) and return code; output to ``log``."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    out = {"command": " ".join(cmd), "seconds": round(time.time() - t0, 1), "peak_rss_mb": usage.ru_maxrss / 1024,
           "returncode": rc}
    print(f"  {cmd[0]}: rc {rc}, {out['seconds']:.0f} s, peak {out['peak_rss_mb'] / 1024:.1f} GB", flush=True)
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise DQError(f"{' '.join(cmd)} failed (rc {rc}); last lines of {log}:\n" + "\n".join(tail))
    return out


def flops_per_call(preset: str) -> dict:
    """FLOPs of one denoiser forward at batch 1 (torch's FlopCounterMode, float32), and parameter counts."""

    arch = {"ddpm_cifar10": "ddpm_cifar10", "ldm_bedroom": "ldm_bedroom", "sd15": "sd15", "dit_xl2": "dit_xl2_256"}[preset]
    m = load_model(ModelConfig(source="tiny", arch=arch))
    x = torch.randn(1, *m.sample_shape)
    cond_fn = cond_fn_for(m, 0)
    cond = None if cond_fn is None else cond_fn(torch.arange(1))[0]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.family.forward(m.denoiser, x, torch.tensor([500]), cond)
    state_bytes = 0  # the largest block state of one input: what the prefix cache holds per input and chain
    with torch.no_grad():
        s = m.family.initial_state(x, torch.tensor([500]), cond)
        for block in m.family.blocks(m.denoiser):
            s = block(s)
            state_bytes = max(state_bytes, state_nbytes(s))
    n = lambda mod: 0 if mod is None else sum(p.numel() for p in mod.parameters())  # noqa: E731
    return {"flops": fc.get_total_flops(), "params": {"denoiser": n(m.denoiser), "vae": n(m.vae),
                                                      "text_encoder": n(m.text_encoder)},
            "image_shape": list(m.image_shape), "sample_shape": list(m.sample_shape), "state_bytes": state_bytes,
            "input_bytes": x.numel() * 4}


def measure(preset: str, folder: Path) -> dict:
    overrides = PRESETS[preset]
    work = folder / preset
    shutil.rmtree(work, ignore_errors=True)  # a fresh cell: a calibration cache left by an earlier try would hide its cost
    work.mkdir(parents=True)
    print(f"{preset}:", flush=True)
    train = run(["train.py", *overrides, "debug=dryrun", f"hydra.run.dir={work / 'train'}",
                 f"paths.cache_dir={work / 'cache'}"], work / "train.log")
    res = json.loads((work / "train" / "results.json").read_text())
    export = run(["export.py", f"ckpt_path={work / 'train' / 'student.safetensors'}", f"out={work / 'export'}"],
                 work / "export.log")
    evaluate = run(["eval.py", f"ckpt_path={work / 'export'}", "runtime=int8", "debug=dryrun", "logger=none",
                    f"hydra.run.dir={work / 'eval'}", f"paths.cache_dir={work / 'cache'}"], work / "eval.log")
    ev = json.loads((work / "eval" / "results.json").read_text())
    calib = sorted((work / "cache").glob("calib-*.pt"))
    return {"preset": preset, "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "train": train, "export": export, "eval_int8": evaluate,
            "phases": res.get("phases"), "block_seconds": res["train"]["block_seconds"],
            "dryrun": settings(overrides + ["debug=dryrun"]), "paper": settings(overrides),
            "eval_sample_seconds": ev["rows"][-1].get("sample_seconds"),
            "train_rows": {r["name"]: r.get("sample_seconds") for r in res.get("rows", [])},
            "calibration_bytes": calib[0].stat().st_size if calib else None,
            **export_sizes(work / "export"),
            "eval_runtime": ev.get("runtime"), "eval_images": ev["rows"][-1].get("images") if ev.get("rows") else None,
            **flops_per_call(preset)}


def export_sizes(folder: Path) -> dict:
    """Bytes of an export's denoiser files and of the pipeline parts copied beside them."""
    total, parts = 0, 0
    for f in folder.rglob("*"):
        if f.is_file():
            total += f.stat().st_size
            if f.relative_to(folder).parts[0] in ("vae", "text_encoder", "tokenizer"):
                parts += f.stat().st_size
    return {"export_bytes": total - parts, "pipeline_bytes": parts}


def settings(overrides: list[str]) -> dict:
    """The counts that set a run's cost, from the composed train.py config."""
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=overrides)
    return {"sampler_steps": int(cfg.sampler.steps), "calib_trajectories": int(cfg.calib.n_trajectories),
            "calib_samples": int(cfg.calib.n_samples), "calib_batch": int(cfg.calib.batch_size),
            "guidance": float(cfg.calib.guidance_scale), "steps_per_block": int(cfg.distill.steps_per_block),
            "distill_batch": int(cfg.distill.batch_size), "images": int(cfg.task.num_samples)}


def hours(h: float) -> str:
    return f"{h:.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.2f}" if h >= 0.01 else "< 0.01"


def verdict(c: dict) -> str:
    """Whether the whole dry run (train + export + eval) kept within LIMIT_S and LIMIT_GB."""
    secs = sum(c[k]["seconds"] for k in ("train", "export", "eval_int8"))
    peak = max(c[k]["peak_rss_mb"] for k in ("train", "export", "eval_int8")) / 1024
    ok = secs <= LIMIT_S and peak <= LIMIT_GB
    return f"{'yes' if ok else '**no**'} ({secs / 60:.1f} min, {peak:.1f} GB)"


GPU_FLOPS = 100e12  # assumed sustained FLOP/s on one 80 GB GPU (H100: ~10% of its dense bf16 peak), see report


def projection(c: dict) -> dict:
    """Hours of the paper protocol: on this machine, scaled from the dry run's measured seconds (linear in
    inputs, batch and steps), and on one GPU, from FLOPs over GPU_FLOPS."""
    d, p = c["dryrun"], c["paper"]
    cfg_mult = 2 if p["guidance"] != 1.0 else 1  # classifier-free guidance: two denoiser inputs per step
    calib_s = c["phases"]["calibration_data"]["seconds"] / (d["calib_trajectories"] * d["sampler_steps"])
    calib = calib_s * p["calib_trajectories"] * p["sampler_steps"]
    step_s = sum(c["block_seconds"].values()) / d["steps_per_block"]  # one step of every block, dry-run batch
    distill = step_s * p["steps_per_block"] * p["distill_batch"] / d["distill_batch"]
    fp_img = (c["train_rows"].get("fp") or 0) / (d["images"] * d["sampler_steps"])
    st_img = c["eval_sample_seconds"] / (d["images"] * d["sampler_steps"])
    sampling = (fp_img + st_img) * p["images"] * p["sampler_steps"]
    f = c["flops"]
    gpu = {"calibration": f * cfg_mult * p["calib_trajectories"] * p["sampler_steps"],
           "distill": 4 * f * p["steps_per_block"] * p["distill_batch"],  # teacher fwd + student fwd and bwd (2×)
           "sampling": 2 * f * cfg_mult * p["images"] * p["sampler_steps"]}  # FP and student
    return {"cpu_h": {"calibration": calib / 3600, "distill": distill / 3600, "sampling": sampling / 3600},
            "gpu_h": {k: v / GPU_FLOPS / 3600 for k, v in gpu.items()}}


def report(cells: list[dict], folder: Path) -> str:
    where = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    lines = ["# Real sizes: dry runs of each preset, and what the paper's protocol costs", "",
             f"Written by `python scripts/dryrun.py` from `{where}/`. Each preset ran on a random-init stand-in of its "
             "real architecture at its real size and resolution (`model=standin_*`, dq/models/components.py), "
             "with `debug=dryrun` counts: " + (", ".join(f"{k} {v}" for k, v in cells[0]["dryrun"].items()) if cells else "")
             + ". Then `export.py` and `eval.py ckpt_path=<export> runtime=int8`. Scores of random weights mean "
             "nothing; time and memory are what these runs measure. CPU: "
             + ", ".join(sorted({f"{c['cpu']}, {c['threads']} threads" for c in cells})) + ".", "",
             "## Measured", "",
             f"| preset | params (denoiser / VAE / text) | GFLOP per call | train.py s | peak GB | export s | eval int8 s | "
             f"peak GB | calibration MB | export MB (denoiser / parts) | within {LIMIT_S // 60} min and {LIMIT_GB} GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        pr = c["params"]
        lines.append(f"| {c['preset']} | {pr['denoiser'] / 1e6:.1f}M / {pr['vae'] / 1e6:.1f}M / {pr['text_encoder'] / 1e6:.1f}M "
                     f"| {c['flops'] / 1e9:.0f} | {c['train']['seconds']:.0f} | {c['train']['peak_rss_mb'] / 1024:.1f} "
                     f"| {c['export']['seconds']:.0f} | {c['eval_int8']['seconds']:.0f} | "
                     f"{max(c['export']['peak_rss_mb'], c['eval_int8']['peak_rss_mb']) / 1024:.1f} | "
                     f"{(c['calibration_bytes'] or 0) / 2**20:.1f} | {c['export_bytes'] / 2**20:.1f} / "
                     f"{c['pipeline_bytes'] / 2**20:.1f} | {verdict(c)} |")
    lines += ["", "Per phase of train.py (seconds / peak resident GB in that phase; `method` holds calibration data, "
              "initialisation and distillation):", "", "| preset | " + " | ".join(PHASES) + " | s per distillation step "
              "(all blocks, batch " + (str(cells[0]["dryrun"]["distill_batch"]) if cells else "?") + ") | slowest block, s per step |",
              "|---|" + "---|" * (len(PHASES) + 2)]
    for c in cells:
        ph = c["phases"] or {}
        cols = [f"{ph[k]['seconds']:.0f} / {ph[k]['peak_rss_mb'] / 1024:.1f}" if k in ph else "–" for k in PHASES]
        lines.append(f"| {c['preset']} | " + " | ".join(cols) +
                     f" | {sum(c['block_seconds'].values()) / c['dryrun']['steps_per_block']:.1f} | "
                     + "{} {:.1f} |".format(*max(((k, v / c['dryrun']['steps_per_block'])
                                                  for k, v in c['block_seconds'].items()), key=lambda kv: kv[1])))
    lines += ["", "What the paper's protocol stores (its calibration inputs; the prefix cache holds the largest block state "
              "of every input for two chains, student and teacher, float32; text conditioning is stored once per "
              "distinct prompt encoding, dq/data/calibration.py):", "",
              "| preset | calibration inputs | calibration set GB | largest block state per input MB | prefix cache GB "
              "(2 chains) | where it goes with the defaults |", "|---|---|---|---|---|---|"]
    for c in cells:
        n = c["paper"]["calib_samples"]
        cache = 2 * n * c["state_bytes"] / 2**30
        where = ("memory (distill.cache_mb=4096)" if cache * 1.5 <= 4 else
                 "recomputed per step unless distill.cache_disk_mb ≥ " + f"{cache * 1.5 * 1024:,.0f}")
        lines.append(f"| {c['preset']} | {n:,} | {n * c['input_bytes'] / 2**30:.2f} | {c['state_bytes'] / 2**20:.1f} | "
                     f"{cache:.1f} | {where} |")
    lines += ["", "## The paper's protocol, projected", "",
              "Scaled from the measured seconds above: calibration by trajectory-steps, distillation by steps per block × "
              "batch, sampling by images × steps (FP teacher and student), all linear — a projection, not a run. "
              f"GPU: FLOPs per denoiser call (torch's FlopCounterMode, batch 1) × calls, over an assumed sustained "
              f"{GPU_FLOPS / 1e12:.0f} TFLOP/s on one 80 GB GPU (about 10% of an H100's dense bf16 peak: fake-quant "
              "layers run float32 with elementwise quantize passes); distillation counts a teacher forward and a "
              "student forward + backward (4 forwards) per input per block step. No GPU was measured.", "",
              "| preset | protocol | calibration h (CPU / GPU) | distillation h | sampling for FID h | total h (CPU / GPU) |",
              "|---|---|---|---|---|---|"]
    for c in cells:
        pj, p = projection(c), c["paper"]
        cpu, gpu = pj["cpu_h"], pj["gpu_h"]
        lines.append(f"| {c['preset']} | {p['calib_trajectories']} trajectories × {p['sampler_steps']} steps, "
                     f"{p['steps_per_block']} steps/block at batch {p['distill_batch']}, {p['images']:,} images | "
                     + " | ".join(f"{hours(cpu[k])} / {hours(gpu[k])}" for k in ("calibration", "distill", "sampling"))
                     + f" | {hours(sum(cpu.values()))} / {hours(sum(gpu.values()))} |")
    return "\n".join(lines) + "\n"


PHASES = ("load_teacher", "calibration_data", "distill", "method", "save_student", "evaluation")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), help=f"default: {' '.join(PRESETS)}")
    ap.add_argument("--force", action="store_true", help="measure presets that already have a result again")
    ap.add_argument("--report", action="store_true", help="only write docs/scale.md from the cells there are")
    ap.add_argument("--refresh", action="store_true", help="recompute the columns of kept cells that need no run")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "scale" / "work")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "scale.md")
    a = ap.parse_args()
    for p in a.presets:
        if p not in PRESETS:
            raise DQError(f"--presets {p!r}: valid choices are {', '.join(PRESETS)}")
    folder = ROOT / "benchmarks" / "scale" / machine.slug(machine.cpu())
    folder.mkdir(parents=True, exist_ok=True)
    if not a.report:
        for p in a.presets:
            cell = folder / f"{p}.json"
            if cell.exists() and not a.force:
                kept = json.loads(cell.read_text())
                if a.refresh:  # recompute what needs no run: FLOPs, state sizes, export sizes, the CPU's name
                    sizes = export_sizes(a.work / p / "export") if (a.work / p / "export").is_dir() else {}
                    cell.write_text(json.dumps({**kept, **flops_per_call(p), **sizes, "cpu": cpu_name()}, indent=1))
                print(f"{p}: kept {cell}")
                continue
            cell.write_text(json.dumps(measure(p, a.work), indent=1))
    cells = [json.loads((folder / f"{p}.json").read_text()) for p in PRESETS if (folder / f"{p}.json").exists()]
    a.out.write_text(report(cells, folder))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    run_script(main)
