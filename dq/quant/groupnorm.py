"""GroupNorm for channels-last activations in the compiled runtime: statistics by one C++ op, the normalisation
left to inductor. Torch only.

The integer kernels write channels-last tensors, and inductor's GroupNorm reduces each (sample, group) over its
positions with the group's C/G channels in the vector lanes: 4 of 16 lanes for 32 channels in 8 groups (the
digits UNet), 4 for 128 channels in 32 groups (ddpm_cifar10), each load masked and strided. ``dq::gn_stats`` sums
per channel instead, the channels in the lanes, then per group: the same two passes (the mean, then Σ(x − mean)²),
and it returns per sample and channel the group's mean and w / sqrt(var + eps), so that the normalisation
(x − mean)·scale + b stays elementwise and inductor fuses it with what follows (SiLU, the next layer's
quantization) into one pass. Written by hand because inductor generates the masked form (docs/design.md: other
formulations in torch ops fused worse). Built by dq.quant.cpp_kernel, on first use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dq.quant import cpp_kernel

ARGS = ("void*", "const float*", "float*", "float*") + ("int64_t",) * 5 + ("float", "int64_t")
KERNEL = ("groupnorm", ARGS)

# Where the kernel pays (AMX Xeon, AVX-512, 2 threads; GroupNorm + SiLU + 4-bit codes compiled, alone): groups of
# fewer channels than a vector's 16 lanes, which inductor's loads only partly fill ([250, 32, 16, 16] in 8 groups
# 3.2× faster, [16, 128, 32, 32] in 32 groups 2.1×, [250, 64, 8, 8] in 8 1.4×, [1, 128, 32, 32] in 32 1.17×), not
# full ones ([250, 128, 4, 4] and [16, 256, 8, 8] in 8 groups: 0.97–0.98), nor tiny inputs, where the op's per-call
# cost shows ([1, 32, 16, 16]: 0.95)
MAX_GROUP_CHANNELS = 15
MIN_ELEMENTS = 1 << 16

_LIB = torch.library.Library("dq", "FRAGMENT")
_LIB.define("gn_stats(Tensor x, Tensor weight, int groups, float eps) -> (Tensor, Tensor)")


def channels_last(x: Tensor) -> bool:
    """Whether x [N, C, *positions] has its channels at stride 1 and its positions at stride C, in order (each sample
    a contiguous [positions, C] block): the layout ``dq::gn_stats`` reads."""
    return x.dim() >= 3 and x.movedim(1, -1)[0].is_contiguous()


def _gn_stats(x: Tensor, weight: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    n, c = x.shape[:2]
    if x.dtype not in (torch.float32, torch.bfloat16) or not channels_last(x) or c % groups:
        raise ValueError(f"gn_stats: x {tuple(x.shape)} {x.dtype} must be float32 or bfloat16, channels-last, "
                         f"its {c} channels a multiple of groups={groups}")
    mean = x.new_empty((n, c), dtype=torch.float32)
    scale = torch.empty_like(mean)
    kernel = cpp_kernel.load(*KERNEL)
    kernel(x, weight.float().contiguous(), mean, scale, n, x.numel() // (n * c), c, groups, x.stride(0), eps,
           int(x.dtype == torch.bfloat16))
    return mean, scale


@torch.library.register_fake("dq::gn_stats")
def _(x, weight, groups, eps):
    return x.new_empty(x.shape[:2], dtype=torch.float32), x.new_empty(x.shape[:2], dtype=torch.float32)


_LIB.impl("gn_stats", _gn_stats, "CPU")
gn_stats = torch.ops.dq.gn_stats.default


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same function to float rounding) whose statistics come from ``dq::gn_stats``
    where it pays (see MAX_GROUP_CHANNELS: small groups, inputs of at least MIN_ELEMENTS) and the input is
    channels-last float32 / bfloat16 with no gradient needed; F.group_norm otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() or x.dtype not in (torch.float32, torch.bfloat16) or x.numel() < MIN_ELEMENTS
                or self.num_channels // self.num_groups > MAX_GROUP_CHANNELS or not channels_last(x)):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight if self.affine else torch.ones(x.shape[1])
        mean, scale = gn_stats(x, weight, self.num_groups, self.eps)
        shape = (*x.shape[:2], *[1] * (x.dim() - 2))
        y = (x.float() - mean.view(shape)) * scale.view(shape)
        return (y if not self.affine else y + self.bias.view(1, -1, *[1] * (x.dim() - 2))).to(x.dtype)


def use_channels_last_groupnorm(model: nn.Module) -> int:
    """Swap every nn.GroupNorm of ``model`` for a ChannelsLastGroupNorm holding the same parameters (in place);
    returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                new = ChannelsLastGroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
                new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new)
                swapped += 1
    return swapped
