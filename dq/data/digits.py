"""The embedded dataset: scikit-learn's 8×8 handwritten digits, resized for a small UNet.

1,797 grayscale images ship inside scikit-learn, so everything here works offline. Images are
upsampled to ``size``×``size`` (16 by default: the smallest size at which a UNet can have three
resolutions, 16 → 8 → 4, with room for a 3×3 conv at the coarsest) and scaled to [−1, 1].
The train / held-out split is a fixed permutation drawn from ``split_seed``, so every task (teacher
pretraining, feature network, FID reference) sees the same held-out images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (images [N, 1, size, size] in [−1, 1], labels [N] int64)."""
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"data.size={size} is below the native 8×8 resolution; use size >= 8")
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    return x, torch.from_numpy(digits.target).long()


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded (train, held-out) split of range(n)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction={heldout_fraction} must be in (0, 1)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = round(n * heldout_fraction)
    return perm[n_held:].sort().values, perm[:n_held].sort().values


@dataclass
class DataConfig:
    """The ``data`` config group: the real images generated samples are compared with."""

    name: str = field(default="digits", metadata={"choices": "digits"})
    size: int = 16
    heldout_fraction: float = 0.2
    split_seed: int = 0
    prompts: Optional[str] = None  # text-to-image models: a file with one prompt per line (None: dq/assets/prompts.txt)


class DigitsDataModule(L.LightningDataModule):
    """Digits as (image, label) batches; ``train`` / ``heldout`` tensors are also exposed directly."""

    def __init__(
        self,
        size: int = 16,
        heldout_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.size = size
        self.heldout_fraction = heldout_fraction
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.heldout_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.size)
        tr, ho = split_indices(len(x), self.heldout_fraction, self.split_seed)
        self.train_set = TensorDataset(x[tr], y[tr])
        self.heldout_set = TensorDataset(x[ho], y[ho])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.heldout_set, batch_size=self.batch_size, num_workers=self.num_workers)

    @property
    def train_images(self) -> torch.Tensor:
        self.setup()
        return self.train_set.tensors[0]

    @property
    def heldout_images(self) -> torch.Tensor:
        self.setup()
        return self.heldout_set.tensors[0]
