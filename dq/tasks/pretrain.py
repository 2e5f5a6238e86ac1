"""Pretrain a full-precision DDPM on the embedded digits: the teacher that dq then quantizes.

``python train.py task=pretrain`` trains the UNet in ``dq.models.families.unet.DIGITS`` with the ε
objective, keeps an EMA of the weights (decay warms up as min(decay, (1+n)/(10+n)) so early averages
are not dominated by the random init), saves the EMA UNet + scheduler as a diffusers folder in the
run directory, evaluates it, and writes a model card. ``task.export_to=dq/assets/digits_teacher``
refreshes the shipped teacher.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dq.data.digits import DigitsDataModule
from dq.models.load import DiffusionModel, build_arch, write_reference_io
from dq.tasks.common import command_line, finish_logger, make_logger, make_trainer, run_dir


class DDPMPretrainer(L.LightningModule):
    """ε-prediction DDPM training with an EMA copy of the UNet."""

    def __init__(self, arch: str, num_train_timesteps: int, beta_schedule: str,
                 lr: float, ema_decay: float, warmup_steps: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.unet = build_arch(arch).denoiser.train().requires_grad_(True)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), persistent=False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0 = batch[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(self.unet(xt, t).sample, eps)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.global_step
        decay = min(self.hparams.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.unet.parameters()):
                pe.lerp_(p, 1 - decay)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return [opt], [{"scheduler": sched, "interval": "step"}]


def write_card(folder: Path, info: dict[str, Any]) -> None:
    """A short model card: how the teacher was made and how good it is."""
    lines = [
        f"# Embedded digits teacher (DDPM, diffusers {info['class']})", "",
        f"- made by: `{info['command']}`",
        f"- architecture: {info['class']}, {info['params'] / 1e6:.2f}M parameters, 16×16×1, "
        "resolutions 16/8/4, self-attention at 8×8",
        f"- training: {info['steps']} steps, batch {info['batch_size']}, lr {info['lr']}, EMA {info['ema_decay']}; "
        f"{info['train_seconds'] / 60:.1f} min on {info['device']}",
        f"- data: scikit-learn digits, train split ({info['train_images']} images), 8×8 → 16×16, [−1, 1]",
    ]
    if "metrics" in info:
        m = info["metrics"]
        lines += ["", "## Quality (digits feature network, held-out digits as reference)", "",
                  f"measured by `{m['command']}`", "", "| images | n | FID | KID | IS |", "|---|---|---|---|---|"]
        pm = lambda r, k, f: f"{r[k]:{f}}" + (f" ± {r[k + '_seed_std']:{f}}" if r.get(k + "_seed_std") else "")  # noqa: E731
        for r in m["rows"]:
            lines.append(f"| {r['name']} | {r['n_fake']} | {pm(r, 'fid', '.2f')} | {pm(r, 'kid', '.4f')} | "
                         f"{pm(r, 'is', '.2f')} |")
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    (folder / "training.json").write_text(json.dumps(info, indent=2))


def run(cfg: DictConfig) -> dict[str, Any]:
    t = cfg.task
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = run_dir(cfg)
    dm = DigitsDataModule(size=cfg.data.size, heldout_fraction=cfg.data.heldout_fraction,
                          split_seed=cfg.data.split_seed, batch_size=t.batch_size)
    module = DDPMPretrainer("digits", t.num_train_timesteps, t.beta_schedule, t.lr, t.ema_decay,
                            t.warmup_steps)
    logger = make_logger(cfg, out, job="pretrain")
    trainer = make_trainer(cfg, max_steps=t.steps, logger=logger,
                           default_root_dir=str(out))
    start = time.time()
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        finish_logger(logger)
    seconds = time.time() - start
    if trainer.fast_dev_run:
        return {"train_seconds": seconds, "loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}

    folder = out / "teacher"
    module.ema.save_pretrained(folder / "unet")
    module.scheduler.save_pretrained(folder / "scheduler")
    write_reference_io(DiffusionModel(module.ema, module.scheduler, "pretrained"), folder)
    info = dict(command=command_line(), **{"class": type(module.unet).__name__}, params=sum(p.numel() for p in module.unet.parameters()),
                steps=t.steps, batch_size=t.batch_size, lr=t.lr, ema_decay=t.ema_decay,
                train_seconds=seconds, device=f"{torch.get_num_threads()} CPU threads",
                train_images=len(dm.train_set))
    metrics: dict[str, Any] = {"train_seconds": seconds}
    if t.evaluate:
        from dq.evaluation import evaluate_models, format_table
        from dq.models.sampling import SamplerConfig
        from dq.tasks.common import protocol, write_results

        teacher = DiffusionModel(module.ema.eval().requires_grad_(False), module.scheduler, "pretrained")
        result = evaluate_models(protocol(cfg, SamplerConfig()), teacher, {"fp": teacher.denoiser}, out)
        print(format_table(result["rows"]))
        write_results(out, {"command": command_line(), "model": teacher.name, "seed": int(cfg.seed), **result})
        info["metrics"] = {"command": command_line(), "rows": result["rows"]}
        metrics.update(result["summary"])
    write_card(folder, info)
    if t.export_to:
        dest = Path(t.export_to)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest)
    return metrics
