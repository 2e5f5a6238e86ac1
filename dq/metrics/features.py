"""Feature networks for FID / KID / IS.

The embedded domain (16×16 digits) is scored with a small digits classifier trained in this repo
(``python train.py task=classifier``) and shipped in dq/assets/digits_classifier: its penultimate
activations are the FID/KID feature space, its logits the Inception-Score classifier — the same
roles Inception-v3's pool3 and logits play for natural images. ``inception`` stays available for
users who have torch-fidelity installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dq.errors import DQError, choice_error

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_CLASSIFIER = ASSETS / "digits_classifier"
BACKENDS = ("digits", "inception")


class DigitsClassifier(nn.Module):
    """A small CNN for 1×16×16 digits in [−1, 1]: ``features`` [B, feature_dim], ``forward`` logits [B, 10]."""

    def __init__(self, feature_dim: int = 64, size: int = 16, feature_scale: float = 1.0) -> None:
        super().__init__()
        # feature_scale: RMS of the train digits' features around their mean; dividing by it puts
        # FID/KID in units of the real data's spread, whatever the network's activation scale.
        self.config = {"feature_dim": feature_dim, "size": size, "feature_scale": feature_scale}
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3),
            nn.Linear(64 * (size // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) / self.config["feature_scale"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def calibrate_feature_scale(self, x: torch.Tensor) -> float:
        """Set ``feature_scale`` to the RMS deviation of ``body(x)`` from its mean (per dimension)."""
        f = self.body(x)
        self.config["feature_scale"] = float((f - f.mean(0)).pow(2).mean().sqrt())
        return self.config["feature_scale"]

    def save(self, folder: Path, info: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**self.config, **info}, indent=2))

    @classmethod
    def load(cls, folder: Path = DIGITS_CLASSIFIER) -> "DigitsClassifier":
        if not (folder / "model.safetensors").is_file():
            raise DQError(f"no digits classifier at {folder}; rebuild it with `python train.py task=classifier "
                          f"task.export_to={folder}`")
        cfg = json.loads((folder / "config.json").read_text())
        net = cls(feature_dim=cfg["feature_dim"], size=cfg["size"], feature_scale=cfg.get("feature_scale", 1.0))
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        return net.eval().requires_grad_(False)


class FrozenFeatures(nn.Module):
    """torchmetrics ``feature=`` adapter: maps images in [−1, 1] to features or logits; always eval, frozen.

    ``num_features`` tells torchmetrics the feature width without a dummy forward.
    """

    def __init__(self, net: DigitsClassifier, output: str) -> None:
        super().__init__()
        if output not in ("features", "logits"):
            raise choice_error("feature output", output, ["features", "logits"])
        self.net = net.eval().requires_grad_(False)
        self.output = output
        self.num_features = net.config["feature_dim"] if output == "features" else 10

    def train(self, mode: bool = True) -> "FrozenFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.net.features(x) if self.output == "features" else self.net(x)


def require_torch_fidelity() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise DQError("metrics.backend=inception needs torch-fidelity, which is not installed (pip install "
                      "torch-fidelity; note it pulls torchvision); offline or on the digits domain use "
                      "metrics.backend=digits") from None
