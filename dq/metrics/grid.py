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


def side_by_side(grids: list[torch.Tensor], path: Path, scale: int = 4) -> Path:
    """Several equally sized image sets as one PNG, one grid next to the other (e.g. teacher | student)."""
    n = grids[0].shape[0]
    nrow = math.ceil(math.sqrt(n))
    tiles = [save_grid(g, path.with_suffix(f".part{i}.png"), nrow=nrow, scale=1) for i, g in enumerate(grids)]
    parts = [Image.open(t) for t in tiles]
    gap = 4
    out = Image.new(parts[0].mode, (sum(p.width for p in parts) + gap * (len(parts) - 1), parts[0].height), 255)
    x = 0
    for p, t in zip(parts, tiles):
        out.paste(p, (x, 0))
        x += p.width + gap
        Path(t).unlink()
    out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    out.save(path)
    return path
