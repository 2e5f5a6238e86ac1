"""GPU smoke run: a tiny text-to-image pipeline through the main job on CUDA.

    python scripts/gpu_smoke.py            # prints "no CUDA: skipped" and exits 0 without a GPU

Builds a random-init tiny Stable-Diffusion-class pipeline folder (UNet2DConditionModel + AutoencoderKL
+ CLIPTextModel + tokenizer, dq's model=tiny_sd), then runs ``python train.py model=local
model.path=<it>`` with classifier-free guidance on one CUDA device, and, with two or more GPUs, as a
2-process DDP job. Each run must exit 0 and write results.json; the script prints one line per run
(wall seconds, peak CUDA memory) and exits non-zero on the first failure. Tiny sizes (debug=tiny):
minutes at most, most of it process start-up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, folder: Path, out: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "train.py", "model=local", f"model.path={folder}", "debug=tiny", "metrics=digits",
           "calib.guidance_scale=7.5", "logger=none", f"hydra.run.dir={out}", f"paths.cache_dir={out / 'cache'}",
           *extra]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.time() - start
    if proc.returncode != 0 or not (out / "results.json").is_file():
        print(f"{name}: FAILED (exit {proc.returncode}) after {seconds:.0f} s: {' '.join(cmd)}")
        print(proc.stderr[-4000:])
        sys.exit(1)
    res = json.loads((out / "results.json").read_text())
    print(f"{name}: ok in {seconds:.0f} s, bits {res['bits']}, peak memory {res['peak_memory_mb']:.0f} MB, "
          f"models {[r['name'] for r in res['rows']]}")


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA: skipped")
        return
    from dq.models.components import save_pipeline
    from dq.models.load import build_arch

    n = torch.cuda.device_count()
    print(f"{n} CUDA device(s): {torch.cuda.get_device_name(0)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pipeline(build_arch("sd", seed=0), Path(tmp) / "tiny_sd")
        run("1 GPU", folder, Path(tmp) / "gpu1", ["trainer.accelerator=gpu", "trainer.devices=1"])
        if n >= 2:
            run("2-process DDP", folder, Path(tmp) / "ddp2", ["trainer=ddp", "trainer.accelerator=gpu",
                                                               "trainer.devices=2"])
        else:
            print("2-process DDP: skipped (one GPU)")


if __name__ == "__main__":
    main()
