"""Train the digits feature network (``python train.py task=classifier``).

A small CNN on the train split with random ±2-pixel shifts; its held-out accuracy is reported and
saved next to the weights. Its penultimate features define FID/KID and its logits IS on the
embedded domain, so it never sees the held-out digits during training.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
import torch.nn.functional as F

from dq.data.digits import DigitsDataModule
from dq.metrics.features import DigitsClassifier
from dq.tasks.common import command_line, run_dir, write_results


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer offset in [−max_shift, max_shift]² (zero-filled at −1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(net: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return (net(x).argmax(1) == y).float().mean().item()


def run(cfg: DictConfig) -> dict[str, Any]:
    t = cfg.task
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dm = DigitsDataModule(size=cfg.data.size, heldout_fraction=cfg.data.heldout_fraction,
                          split_seed=cfg.data.split_seed)
    dm.setup()
    x_tr, y_tr = dm.train_set.tensors
    x_ho, y_ho = dm.heldout_set.tensors
    net = DigitsClassifier(feature_dim=t.feature_dim, size=cfg.data.size)
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=1e-4)
    steps_per_epoch = len(x_tr) // t.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=t.epochs * steps_per_epoch)
    start = time.time()
    for _ in range(t.epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * t.batch_size:(i + 1) * t.batch_size]
            xb = random_shift(x_tr[idx], 2, gen)
            loss = F.cross_entropy(net(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval().requires_grad_(False)
    net.calibrate_feature_scale(x_tr)
    results = {"heldout_accuracy": accuracy(net, x_ho, y_ho), "train_accuracy": accuracy(net, x_tr, y_tr),
               "heldout_images": len(x_ho), "train_seconds": time.time() - start, "command": command_line()}
    out = run_dir(cfg)
    net.save(out / "digits_classifier", results)
    write_results(out, results)
    if t.export_to:
        dest = Path(t.export_to)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(out / "digits_classifier", dest)
    print(f"held-out accuracy {results['heldout_accuracy']:.4f} ({len(x_ho)} images), "
          f"train accuracy {results['train_accuracy']:.4f}")
    return results
