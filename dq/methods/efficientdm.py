"""EfficientDM (He et al., ICLR 2024): quantization-aware low-rank adapters on frozen quantized weights.

Every quantized layer's weight becomes W₀ + (α/r)·B·A with W₀ frozen and only the LoRA factors A, B,
the weight step sizes Δ_w and the per-step activation tables (Δ_x, z_x: EfficientDM's temporal LSQ)
trained; the fake quantizer sees the merged weight, so training is quantization-aware. The student
is distilled from the FP teacher's output (the whole model, data-free: the calibration set is the
teacher's own sampling trajectories), then the adapters are merged into the weights, leaving an
ordinary student of the same shape as every other method's.
"""
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from dq.errors import DQError
from dq.methods import register
from dq.methods.base import Job, Student, check_calib_method
from dq.quant.layers import iter_quant_layers
from dq.quant.quantizers import CALIBRATION_METHODS


@dataclass
class EfficientDMConfig:
    name: str = "efficientdm"
    rank: int = 4                  # LoRA rank r (capped at min(C_out, C_in·k·k) per layer)
    alpha: float = 4.0             # LoRA scale α (the update is (α/r)·B·A)
    lr_lora: float = 1e-3          # learning rate of A and B (Δ_w, Δ_x use distill.lr_delta_w / lr_act)
    steps: int = 1200              # optimisation steps of the whole model
    shared_tables: bool = False    # EfficientDM learns one activation step size per timestep
    calib_method: str = field(default="mse", metadata={"choices": CALIBRATION_METHODS})

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1:
            raise DQError(f"method.rank={self.rank} and method.steps={self.steps} must be >= 1")
        check_calib_method(self.calib_method)


class LoRA(nn.Module):
    """weight ↦ weight + (α/r)·(B·A).view(weight.shape); B starts at zero, so training starts from W₀."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        fan_in = weight[0].numel()
        r = min(rank, weight.shape[0], fan_in)
        self.scale = alpha / r
        self.A = nn.Parameter(torch.empty(r, fan_in, dtype=weight.dtype, device=weight.device))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).view(weight.shape)


def add_lora(model: nn.Module, rank: int, alpha: float) -> int:
    """LoRA on every quantized layer's weight; freezes W₀. Returns the number of adapter parameters."""
    n = 0
    for _, layer in iter_quant_layers(model):
        lora = LoRA(layer.weight, rank, alpha)
        parametrize.register_parametrization(layer, "weight", lora, unsafe=True)
        layer.parametrizations.weight.original.requires_grad_(False)
        n += lora.A.numel() + lora.B.numel()
    return n


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W ← W₀ + (α/r)·B·A in every layer; the adapters disappear (same state_dict keys as before add_lora)."""
    for _, layer in iter_quant_layers(model):
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            layer.weight.requires_grad_(False)


@register(EfficientDMConfig)
def run(job: Job, cfg: EfficientDMConfig) -> Student:
    student, qcfg = job.prepare(cfg.shared_tables)
    if not job.resume:
        job.calibrate(student, cfg.calib_method)
    student.requires_grad_(False)
    for m in student.modules():  # Δ_w and the activation tables train; weights and norms stay frozen
        if hasattr(m, "delta") and isinstance(m.delta, nn.Parameter):
            m.delta.requires_grad_(True)
            if isinstance(m.zero_point, nn.Parameter):
                m.zero_point.requires_grad_(True)
    adapters = add_lora(student, cfg.rank, cfg.alpha)
    dcfg = dataclasses.replace(job.distill, granularity="model", steps_per_block=cfg.steps, blocks=(), model_steps=0,
                               lr_weights=cfg.lr_lora)
    train = job.fit(student, dcfg)
    merge_lora(student)
    note = (f"efficientdm distils the whole model for method.steps={cfg.steps} steps with rank-{cfg.rank} "
            f"LoRA ({adapters} adapter parameters, merged after training); distill.granularity and "
            f"distill.steps_per_block and distill.model_steps are not used")
    return Student(student, qcfg, {**train, "lora_parameters": adapters}, notes=[note])
