"""How much signal a distillation batch gives each per-step activation parameter (docs/tpq.md, "Measure").

    OMP_NUM_THREADS=1 python scripts/tpq_grad_noise.py [--batches 48] [--blocks down.1 mid up.1]

W4A4 + WD student of the embedded digits teacher, activation parameters calibrated (percentile, 1,024
inputs) as the method does, before any training. For each form of the per-step parameters — the paper's
table (rows calibrated per step, or all rows pooled), the knot form (K = 10) and one shared table — the
BKD block loss of ``--batches`` batches of 32 calibration inputs (uniform draws, and step-stratified
draws) is differentiated w.r.t. the block's activation parameters Δ_x (z_x alike; Δ reported). Per
parameter element, over the batches: the visit rate (share of batches that touch it), and the gradient
signal-to-noise ratio SNR = |mean g| / std g. An Adam step follows the sign of its running gradient,
so an element with SNR ≪ 1 needs ~1/SNR² updates before its steps point anywhere.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dq.data.calibration import CalibConfig, StepSeededBatches, load_or_generate  # noqa: E402
from dq.distill.bkd import BlockDistiller, DistillConfig  # noqa: E402
from dq.models.load import ModelConfig, load_model  # noqa: E402
from dq.models.sampling import SamplerConfig, sampler_timesteps  # noqa: E402
from dq.models.student import calibrate, prepare, weight_dilation  # noqa: E402
from dq.quant.act_quantizer import TemporalActQuantizer  # noqa: E402
from dq.quant.config import QuantConfig  # noqa: E402
from dq.quant.knots import KnotActQuantizer  # noqa: E402

FORMS = {  # name → (QuantConfig kwargs, pooled init)
    "table": ({}, False),
    "table_pooled": ({}, True),
    "knots10": ({"tpq_knots": 10}, False),
    "shared": ({"shared_tables": True}, False),
}


def delta_param(q: TemporalActQuantizer) -> torch.nn.Parameter:
    """The parameter whose elements vary along t: the table, or the knot log-scales (shared: the one Δ)."""
    return q.log_scale if isinstance(q, KnotActQuantizer) else q.delta


def measure(teacher, calib, timesteps, form: str, blocks: list[str], n_batches: int, stratified: bool) -> dict:
    kw, pooled = FORMS[form]
    student = prepare(copy.deepcopy(teacher.denoiser), QuantConfig(w_bits=4, a_bits=4, timesteps=timesteps, **kw))
    init = calib.batches(1024)
    weight_dilation(student, init)
    calibrate(student, init, "percentile", pooled=pooled)
    student.requires_grad_(True)
    module = BlockDistiller(student, teacher.denoiser, DistillConfig())
    names = [b.name for b in module.student_blocks]
    out = {}
    for name in blocks:
        if name not in names:
            raise SystemExit(f"--blocks: unknown block {name!r}; valid: {', '.join(names)}")
        k = names.index(name)
        qs = [q for m in module.student_blocks[k].modules for q in m.modules() if isinstance(q, TemporalActQuantizer)]
        draws = StepSeededBatches(len(calib), 32, seed=0, start=0, stop=n_batches,
                                  rows=calib.row if stratified else None)
        grads: list[list[torch.Tensor]] = [[] for _ in qs]
        for idx in draws:
            student.zero_grad(set_to_none=True)
            module.block_loss(calib.batch(torch.tensor(idx)), k).backward()
            for i, q in enumerate(qs):
                g = delta_param(q).grad
                grads[i].append(torch.zeros_like(delta_param(q)) if g is None else g.detach().clone())
        snr, visit = [], []
        for gs in grads:
            g = torch.stack(gs).reshape(len(gs), -1)  # [batches, elements]
            visit += (g != 0).float().mean(0).tolist()
            snr += (g.mean(0).abs() / g.std(0).clamp_min(1e-30)).tolist()
        out[name] = {"elements": len(snr), "visit_rate": statistics.median(visit),
                     "snr_median": statistics.median(snr), "snr_p10": statistics.quantiles(snr, n=10)[0],
                     "snr_p90": statistics.quantiles(snr, n=10)[-1]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=48)
    ap.add_argument("--blocks", nargs="+", default=["down.1", "mid", "up.1"])
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    ap.add_argument("--out-json", type=Path, default=ROOT / "docs" / "tpq_grad_noise.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    teacher = load_model(ModelConfig())
    sampler = SamplerConfig(name="ddim", steps=50, eta=0.0)
    calib = load_or_generate(teacher, sampler, CalibConfig(seed=0), ROOT / ".cache" / "dq")
    timesteps = tuple(sampler_timesteps(teacher, sampler))
    results = {}
    print("| form | batches | block | elements | visit rate | SNR median | SNR p10–p90 |\n|---|---|---|---|---|---|---|")
    for form in a.forms:
        for stratified in (False, True):
            draw = "stratified" if stratified else "uniform"
            res = measure(teacher, calib, timesteps, form, a.blocks, a.batches, stratified)
            results[f"{form}/{draw}"] = res
            for b, r in res.items():
                print(f"| {form} | {draw} | {b} | {r['elements']} | {r['visit_rate']:.2f} | {r['snr_median']:.3f} | "
                      f"{r['snr_p10']:.3f}–{r['snr_p90']:.3f} |", flush=True)
    a.out_json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.out_json}")


if __name__ == "__main__":
    main()
