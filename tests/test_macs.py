"""scripts/macs.py: MACs per Conv2d / Linear, counted by hand on a small model."""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from macs import layer_macs  # noqa: E402


def test_layer_macs_match_a_hand_count_and_leave_no_hooks():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 1, groups=3), nn.Flatten(), nn.Linear(48, 5))
    macs = layer_macs(model, torch.randn(2, 2, 4, 4))
    # per image × 2 images: conv 3·4·4 outputs × 2·3·3 taps, depthwise 48 × 1, linear 5 × 48
    assert macs == {"0": 2 * 48 * 18, "1": 2 * 48, "3": 2 * 5 * 48}
    assert not any(m._forward_hooks for m in model.modules())
