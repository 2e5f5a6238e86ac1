"""Sample grids as PNG, with PIL only (torchvision is not available here)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


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


def side_by_side_png(paths: list[Path], dest: Path, labels: list[str] | None = None, gap: int = 8,
                     title: str | None = None) -> Path:
    """Paste PNGs left to right on a white canvas, each under its label (e.g. "FP teacher" | "student
    W4A4 dilatequant"), with an optional title line above (PIL's built-in font: no font files needed)."""
    imgs = [Image.open(p).convert("RGB") for p in paths]
    font = ImageFont.load_default()
    line = 14
    top = (line if labels else 0) + (line if title else 0) + (4 if labels or title else 0)
    canvas = Image.new("RGB", (sum(i.width for i in imgs) + gap * (len(imgs) - 1), top + max(i.height for i in imgs)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 1), title, fill=(0, 0, 0), font=font)
    x = 0
    for k, img in enumerate(imgs):
        if labels:
            draw.text((x + 2, top - line - 2), labels[k], fill=(0, 0, 0), font=font)
        canvas.paste(img, (x, top))
        x += img.width + gap
    dest.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(dest)
    return dest
