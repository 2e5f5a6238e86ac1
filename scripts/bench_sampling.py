"""Sampling throughput (images/s) of an FP teacher and its fake-quantized student, as a markdown table.

    python scripts/bench_sampling.py                                   # embedded digits teacher, W4A4, 20 DDIM steps
    python scripts/bench_sampling.py --model tiny_unet --num-images 64 --device cuda

The student is built as the main job builds it before distillation (prepare → Weight Dilation →
per-step activation tables from calibration trajectories, cached under --cache-dir); distillation
changes its values, not its cost. Quantization here is simulated in float (fake quant), so the
student's number is the cost of the simulation, not of integer kernels. Both models sample the same
images (same seed and noise); one untimed batch warms each up first.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent

from dq.config import typed  # noqa: E402
from dq.data.calibration import load_or_generate  # noqa: E402
from dq.models.load import EMBEDDED_TEACHER, load_model  # noqa: E402
from dq.models.sampling import sample_images, sampler_timesteps  # noqa: E402
from dq.models.student import calibrate, prepare, weight_dilation  # noqa: E402
from dq.quant.config import QuantConfig  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded_digits", help="a conf/model option (default: embedded_digits, "
                   "tiny_unet when the embedded teacher is missing)")
    p.add_argument("--quant", default="w4a4", help="a conf/quant option")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpmsolver"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "dq"), help="calibration cache")
    return p.parse_args()


def images_per_second(teacher, unet, sampler_cfg, n: int, batch_size: int, seed: int, device: str) -> float:
    """Warm up on one batch, then time sampling ``n`` images [n, C, H, W]."""
    sample_images(teacher, unet, sampler_cfg, torch.arange(min(batch_size, n)), seed, batch_size, desc="warm-up")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    sample_images(teacher, unet, sampler_cfg, torch.arange(n), seed, batch_size, desc="timed")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    model = args.model
    if model == "embedded_digits" and not EMBEDDED_TEACHER.is_dir():
        print(f"note: no embedded teacher at {EMBEDDED_TEACHER}; benchmarking tiny_unet", file=sys.stderr)
        model = "tiny_unet"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"quant={args.quant}", f"sampler.name={args.sampler}",
                                          f"sampler.steps={args.steps}", "logger=none"])
    teacher = load_model(typed(cfg, "model"))
    sampler = typed(cfg, "sampler")
    # small calibration: 16 trajectories, every step of each (enough to initialise the tables)
    calib_cfg = dataclasses.replace(typed(cfg, "calib"), n_samples=16 * args.steps, n_trajectories=16, batch_size=16)
    calib = load_or_generate(teacher, sampler, calib_cfg, Path(args.cache_dir))
    qcfg = QuantConfig.from_spec(typed(cfg, "quant"), sampler_timesteps(teacher, sampler), shared_tables=False)
    student = prepare(copy.deepcopy(teacher.denoiser), qcfg)
    batches = calib.batches(len(calib))
    weight_dilation(student, batches)
    calibrate(student, batches, "minmax")
    teacher.denoiser.to(args.device)
    student.eval().to(args.device)
    rates = {name: images_per_second(teacher, unet, sampler, args.num_images, args.batch_size, args.seed,
                                     args.device)
             for name, unet in (("fp", teacher.denoiser), ("student", student))}
    bits = f"W{qcfg.w_bits}A{qcfg.a_bits}"
    where = f"{args.device} ({torch.get_num_threads()} threads)" if args.device == "cpu" else \
        torch.cuda.get_device_name(args.device)
    print(f"| model | sampler | images | batch | device | FP images/s | {bits} (fake quant) images/s | {bits} / FP |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {teacher.name} | {args.sampler}, {args.steps} steps | {args.num_images} | {args.batch_size} | {where} "
          f"| {rates['fp']:.1f} | {rates['student']:.1f} | {rates['student'] / rates['fp']:.2f}× |")
    print(f"\nmeasured by `python scripts/bench_sampling.py {' '.join(sys.argv[1:])}` (torch {torch.__version__})")


if __name__ == "__main__":
    main()
