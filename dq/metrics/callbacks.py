"""FID / KID / IS of the student during block-wise distillation (a Lightning callback).

Generation is sharded over DDP ranks: with N images and W ranks, rank r samples the contiguous
global indices r·N/W … (r+1)·N/W. Image i's noise depends only on (seed, i) (dq.models.sampling),
so the images are those of a single-process run; ImageMetrics(sync=True) sums the FID moments and
gathers the KID / IS features in rank order, so the scores equal the single-process ones too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from dq.errors import DQError
from dq.metrics.features import make_backend
from dq.metrics.grid import save_grid
from dq.metrics.image_metrics import ImageMetrics, MetricsConfig, score
from dq.metrics.reference import cached_metrics, shape_problem
from dq.models.conditioning import cond_fn_for
from dq.models.load import DiffusionModel
from dq.data.digits import DataConfig
from dq.models.sampling import SamplerConfig, make_sampler, sample_images

LOG_PREFIX = "fid_is"


class FIDISCallback(L.Callback):
    """Samples ``num_samples`` images with ``pl_module.student`` and logs ``fid_is/{fid,kid,is}`` at the
    global step: after each curriculum block (when ``BlockDistiller.block_index`` changes) if
    ``at_stage_end``, and when fit ends if ``at_fit_end`` (the last block's end is the fit's end, so
    the two never score the same student twice). Every evaluation is also kept in ``self.history``.
    """

    def __init__(self, teacher: DiffusionModel, sampler_cfg: SamplerConfig, metrics_cfg: MetricsConfig, data_cfg: DataConfig, cache_dir: str | Path,
                 num_samples: int = 256, batch_size: int = 128, seed: int = 0, at_stage_end: bool = True,
                 at_fit_end: bool = True, guidance_scale: float = 1.0, grid: int = 16,
                 out_dir: str | Path | None = None) -> None:
        """
        Args:
            teacher: the FP teacher: its noise schedule, sample shape and conditioning drive sampling.
            sampler_cfg: the sampler the student is trained for (``sampler`` group: name, steps).
            metrics_cfg, data_cfg: the ``metrics`` and ``data`` groups (backend; reference split).
            cache_dir: where the reference features are cached (``paths.cache_dir``).
            num_samples: images per evaluation, over all ranks (>= 2 and >= the world size).
            grid: images of rank 0 saved as ``<out_dir>/fid_samples_step<N>.png`` (and to wandb); 0: none.
        """
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 2:
            raise DQError(f"callbacks.fid.num_samples={num_samples!r} must be an integer >= 2 (FID needs 2 images)")
        if not (at_stage_end or at_fit_end):
            raise DQError("callbacks.fid: at_stage_end and at_fit_end are both false, so nothing would be "
                          "evaluated; set one, or leave the callback out (callbacks=none)")
        make_sampler(teacher, sampler_cfg)  # bad sampler config fails before training starts
        self.backend = make_backend(metrics_cfg)  # so does a missing feature backend
        problem = shape_problem(teacher.image_shape, data_cfg, self.backend, metrics_cfg.reference)
        if problem:
            raise DQError(f"callbacks.fid cannot score {teacher.name}: {problem}; leave the callback out")
        self.teacher, self.sampler_cfg, self.metrics_cfg, self.data_cfg = teacher, sampler_cfg, metrics_cfg, data_cfg
        self.cache_dir = Path(cache_dir)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.at_stage_end, self.at_fit_end = at_stage_end, at_fit_end
        self.guidance_scale, self.grid = guidance_scale, grid
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.metrics: ImageMetrics | None = None
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        # Here the process group exists, so ImageMetrics knows which rank keeps the reference.
        if self.num_samples < trainer.world_size:
            raise DQError(f"callbacks.fid.num_samples={self.num_samples} is below the {trainer.world_size} ranks; "
                          f"every rank needs at least one image")
        self.metrics = cached_metrics(self.metrics_cfg, self.data_cfg, self.cache_dir, "heldout", self.backend,
                                      sync=True, channels=self.teacher.image_shape[0])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # steps taken so far; the next step trains block_index(step)
        if not self.at_stage_end or step >= pl_module.total_steps:  # the last block ends with the fit
            return
        if pl_module.block_index(step - 1) != pl_module.block_index(step):
            self.evaluate(trainer, pl_module, f"after {pl_module.block_name(step - 1)}")

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.at_fit_end or (self.at_stage_end and trainer.global_step >= pl_module.total_steps):
            self.evaluate(trainer, pl_module, "end of fit")
        if trainer.is_global_zero and self.out_dir is not None and self.history:
            self.plot(self.out_dir / "fid_per_block.png")

    def plot(self, path: Path) -> Path:
        """FID of the student after each evaluated stage (the curriculum's progress), as a small PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(self.history)), 3))
        ax.plot(range(len(self.history)), [h["fid"] for h in self.history], marker="o")
        ax.set_xticks(range(len(self.history)), [h["stage"].removeprefix("after ") for h in self.history],
                      rotation=45, ha="right")
        ax.set_ylabel(f"FID ({self.num_samples} images)")
        ax.set_title("student FID during block-wise distillation")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def evaluate(self, trainer: L.Trainer, pl_module: Any, stage: str) -> dict[str, Any]:
        """Sample this rank's shard, score over all ranks (every rank must call this), log, record."""
        indices = torch.arange(self.num_samples).tensor_split(trainer.world_size)[trainer.global_rank]
        student = pl_module.student
        was_training = student.training
        student.eval()
        try:
            images = sample_images(self.teacher, student, self.sampler_cfg, indices, self.seed, self.batch_size,
                                   cond_fn=cond_fn_for(self.teacher, self.seed), guidance_scale=self.guidance_scale,
                                   desc=f"FID samples ({stage})")
        finally:
            student.train(was_training)
        self.metrics.to(pl_module.device)
        scores = score(self.metrics, images)
        step = trainer.global_step
        self.history.append({"step": step, "stage": stage, **scores})
        if trainer.logger:  # Lightning loggers write on rank 0 only
            trainer.logger.log_metrics({f"{LOG_PREFIX}/{k}": scores[k] for k in ("fid", "kid", "is")
                                        if scores[k] is not None}, step=step)
        if trainer.is_global_zero and self.grid and self.out_dir is not None:
            path = save_grid(images[: self.grid, :3], self.out_dir / f"fid_samples_step{step}.png")
            if type(trainer.logger).__name__ == "WandbLogger":
                import wandb

                trainer.logger.experiment.log({f"{LOG_PREFIX}/samples": wandb.Image(str(path), caption=stage)},
                                              commit=False)
        return scores


@dataclass
class FIDConfig:
    """``callbacks.fid`` (conf/callbacks/fid.yaml): FID/KID/IS of the student during distillation."""

    num_samples: int = 256     # images per evaluation, over all ranks
    batch_size: int = 128      # images per sampling batch
    at_stage_end: bool = True  # after each curriculum block
    at_fit_end: bool = True    # when fit ends
    guidance_scale: float = 1.0
    grid: int = 16             # images saved as fid_samples_step<N>.png (and to wandb) per evaluation; 0 = none


@dataclass
class CallbacksConfig:
    """The ``callbacks`` config group: which evaluation callbacks run during training (none by default)."""

    fid: Optional[FIDConfig] = None


def fid_callback(c: FIDConfig | None, teacher: DiffusionModel, sampler_cfg: SamplerConfig, metrics_cfg: MetricsConfig, data_cfg: DataConfig,
                 cache_dir: str | Path, seed: int, out_dir: str | Path | None = None) -> FIDISCallback | None:
    """The callback described by ``callbacks.fid``, or None when it is not configured."""
    if c is None:
        return None
    return FIDISCallback(teacher, sampler_cfg, metrics_cfg, data_cfg, cache_dir, num_samples=c.num_samples,
                         batch_size=c.batch_size, seed=seed, at_stage_end=c.at_stage_end, at_fit_end=c.at_fit_end,
                         guidance_scale=c.guidance_scale, grid=c.grid, out_dir=out_dir)
