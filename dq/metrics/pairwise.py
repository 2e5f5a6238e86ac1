"""Student vs FP teacher on the same seeds and noise, and CLIP score: metrics that need no reference set.

Every model of one evaluation samples image *i* of seed *s* from the same noise (and prompt), so the
student's image *i* has a counterpart in the teacher's. Per student row and seed:

- ``fid_to_fp``: FID between the student's and the teacher's backend features (all N images).
- ``psnr_to_fp``: PSNR (torchmetrics, images mapped to [0, 1], data_range=1) over the first
  ``metrics.pairwise_images`` pairs, from their pooled mean squared error; capped at ``PSNR_CAP`` dB
  (identical images have infinite PSNR, which JSON cannot hold).
- ``ssim_to_fp``: mean SSIM (torchmetrics, Gaussian 11×11 window, σ 1.5, data_range=1; the window
  shrinks to the largest odd size that fits images smaller than 11 px) over the same pairs.

Memory (what is kept of the teacher, per seed): its FID moments (2 D×D float64, constant in N) and
its first ``metrics.pairwise_images`` images on the CPU (K·C·H·W float32), never all N images.
The teacher ("fp") must be sampled before the students; ``ordered`` puts it first.

``clip_score(images, prompts)`` (``ClipScorer``): torchmetrics CLIPScore with a local CLIP model
folder, 100·cos(image, prompt) averaged over the images; the teacher's row gets one too.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance

from dq.errors import DQError

TEACHER = "fp"
PSNR_CAP = 100.0  # dB: a mean squared error of 1e-10 on [0, 1] images (identical up to float rounding)
PAIR_SCORES = ("fid_to_fp", "psnr_to_fp", "ssim_to_fp")


def ordered(models: dict[str, Any]) -> list[tuple[str, Any]]:
    """The models with the FP teacher first (its images are what the students are compared with)."""
    return sorted(models.items(), key=lambda kv: kv[0] != TEACHER)


def ssim_kernel(shape: tuple[int, ...]) -> int:
    """11, or the largest odd size not above the image's smaller side."""
    side = min(shape[-2:])
    return min(11, side if side % 2 else side - 1)


@torch.no_grad()
def psnr_ssim(a: torch.Tensor, b: torch.Tensor, batch_size: int = 250, device: torch.device | str = "cpu"
              ) -> tuple[float, float]:
    """(PSNR capped at PSNR_CAP dB, mean SSIM) of images ``a`` vs ``b`` [N, C, H, W] in [−1, 1], streamed
    in batches through ``device`` (float64)."""
    if a.shape != b.shape:
        raise ValueError(f"paired images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(device)  # local: this process's pairs
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=ssim_kernel(a.shape),
                                            sync_on_compute=False).to(device)
    for x, y in zip(a.split(batch_size), b.split(batch_size)):
        x01, y01 = (x.to(device).double() + 1) / 2, (y.to(device).double() + 1) / 2
        psnr.update(x01, y01)
        ssim.update(x01, y01)
    p = float(psnr.compute())
    return min(p, PSNR_CAP), float(ssim.compute())


class _Given(torch.nn.Module):
    """torchmetrics ``feature=`` stand-in: ``update`` receives features [B, D]."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PairwiseMetrics:
    """The FP teacher's FID moments and first ``keep`` images per seed; students are scored against them.
    ``num_features`` None: no FID-to-FP (the backend cannot score these images; PSNR / SSIM need no backend)."""

    def __init__(self, num_features: int | None, keep: int, batch_size: int = 250) -> None:
        self.num_features, self.keep, self.batch_size = num_features, keep, batch_size
        self.teacher: dict[int, tuple[FrechetInceptionDistance | None, torch.Tensor]] = {}

    def add_teacher(self, seed: int, feats: torch.Tensor | None, images: torch.Tensor) -> None:
        fid = None
        if self.num_features is not None:
            fid = FrechetInceptionDistance(feature=_Given(self.num_features), reset_real_features=False,
                                           sync_on_compute=False)  # teacher and student of this process
            fid.to(feats.device).update(feats, real=True)  # moments on the features' device (D×D float64)
        self.teacher[seed] = (fid, images[: self.keep].detach().cpu().clone())

    def score(self, seed: int, feats: torch.Tensor | None, images: torch.Tensor) -> dict[str, Any]:
        """{"fid_to_fp" (when there are features), "psnr_to_fp", "ssim_to_fp", "pairs"} of a student's images
        of ``seed``."""
        if seed not in self.teacher:
            raise RuntimeError(f"pairwise metrics: the FP teacher was not sampled with seed {seed} before the student")
        fid, ref = self.teacher[seed]
        out: dict[str, Any] = {}
        if fid is not None:
            fid.reset()  # keeps the teacher (real) moments
            fid.update(feats.to(fid.real_features_sum.device), real=False)
            enough = len(feats) >= 2 and int(fid.real_features_num_samples) >= 2
            out["fid_to_fp"] = float(fid.compute()) if enough else None
        device = feats.device if feats is not None else "cpu"
        psnr, ssim = psnr_ssim(images[: len(ref)], ref, self.batch_size, device)
        return {**out, "psnr_to_fp": psnr, "ssim_to_fp": ssim, "pairs": len(ref)}


class _ClipFeatures(torch.nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return the projected embeddings as
    tensors: transformers 5 returns a BaseModelOutputWithPooling (embeddings in ``pooler_output``), which
    torchmetrics 1.9's CLIPScore cannot normalise."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class ClipScorer:
    """torchmetrics CLIPScore with the CLIP model and processor of a local folder (transformers), loaded once."""

    def __init__(self, folder: str, batch_size: int = 64) -> None:
        self.folder, self.batch_size = str(Path(folder).expanduser()), batch_size
        self.metric = self._load()  # before any sampling: a bad folder fails fast

    def _load(self):
        from torchmetrics.multimodal.clip_score import CLIPScore
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError:
            raise DQError("metrics.clip_model needs the transformers package (pip install transformers==5.23.0)") \
                from None

        def load() -> tuple[Any, Any]:
            try:
                return (_ClipFeatures(CLIPModel.from_pretrained(self.folder, local_files_only=True).eval()),
                        CLIPProcessor.from_pretrained(self.folder, local_files_only=True))
            except (OSError, ValueError) as e:
                raise DQError(f"metrics.clip_model={self.folder} is not a loadable CLIP model + processor folder "
                              f"({str(e).splitlines()[0][:120]})") from None
        return CLIPScore(model_name_or_path=load, sync_on_compute=False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean CLIP score of ``images`` [N, C, H, W] in [−1, 1] with ``prompts`` (one per image)."""
        if len(prompts) != len(images):
            raise ValueError(f"clip score: {len(images)} images but {len(prompts)} prompts")
        self.metric.reset()
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        u8 = u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8[:, :3]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*longer than.*")
            for start in range(0, len(u8), self.batch_size):
                self.metric.update(u8[start:start + self.batch_size], list(prompts[start:start + self.batch_size]))
        return float(self.metric.compute())
