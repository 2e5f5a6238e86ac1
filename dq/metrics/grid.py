"""Sample grids as PNG, with PIL only (torchvision is not available here)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, scale: int = 4, pad: int = 1) -> Path:
    """Tile images [N, C, H, W] in [−1, 1] into one PNG, each pixel upscaled ``scale``× (nearest)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def side_by_side_png(paths: list[Path], dest: Path, gap: int = 8) -> Path:
    """Paste PNGs left to right on a white canvas (teacher | student grids)."""
    imgs = [Image.open(p) for p in paths]
    canvas = Image.new(imgs[0].mode, (sum(i.width for i in imgs) + gap * (len(imgs) - 1),
                                      max(i.height for i in imgs)), 255)
    x = 0
    for i in imgs:
        canvas.paste(i, (x, 0))
        x += i.width + gap
    canvas.save(dest)
    return dest
