"""Reference statistics from the user's own data: an image folder or a precomputed ``.npz``.

``metrics.reference`` selects what generated images are scored against:

- ``null``: the digits data split (dq.metrics.reference), as before.
- an image **folder** (``.png`` / ``.jpg`` / ``.jpeg``, searched recursively, any sizes): each image
  is read with PIL, converted to the generated images' channel count (1: ``L``, 3: ``RGB``) and
  mapped to [−1, 1]; the backend then resizes it exactly as it resizes generated images. Its
  features are cached like the digits references, keyed by (folder, a fingerprint of the file
  names / sizes / mtimes, channels, backend, input size, the backend's weights).
- a **.npz** holding ``mu`` [D] and ``sigma`` [D, D] (the pytorch-fid / clean-fid convention:
  mean and ddof=1 covariance of the features): FID only; KID needs the features themselves.
  ``write_stats`` (and ``scripts/reference_stats.py``) writes one from a folder, adding
  ``num_images``, ``backend``, ``fingerprint``, ``input_size`` and ``channels``, which are checked
  on load when present.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from dq.errors import DQError
from dq.metrics.features import FeatureBackend, extract
from dq.metrics.reference import RealFeatures, load_cached, reference_path, save_cached

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STATS_SUFFIX = ".npz"


def check_reference(value: str | None) -> None:
    """One-line DQError unless ``metrics.reference`` is null, an existing folder or an existing .npz file."""
    if value is None:
        return
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise DQError(f"metrics.reference={value} does not exist; give an image folder (png/jpg) or a .npz with "
                      f"mu and sigma (python scripts/reference_stats.py DIR OUT.npz), or null for the digits data")
    if not path.is_dir() and path.suffix.lower() != STATS_SUFFIX:
        raise DQError(f"metrics.reference={value} is neither a folder of images nor a {STATS_SUFFIX} file with "
                      f"mu and sigma")


def is_stats_file(value: str) -> bool:
    return Path(str(value)).suffix.lower() == STATS_SUFFIX and not Path(str(value)).is_dir()


def image_files(folder: str | Path) -> list[Path]:
    """The images under ``folder`` (recursively), sorted by relative path; a DQError when there are none."""
    root = Path(folder).expanduser()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DQError(f"metrics.reference={folder} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images")
    return files


def folder_fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 (16 hex digits) of every file's relative path, size and mtime: any change → another cache key."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_image(path: Path, channels: int) -> torch.Tensor:
    """[channels, H, W] in [−1, 1] (8-bit value v → v / 127.5 − 1)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    t = torch.from_numpy(a.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t / 127.5 - 1


def folder_batches(files: list[Path], channels: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches [B, C, H, W] of the images in ``files`` order (features come out in file order, whatever
    ``batch_size``); a batch ends early where the image size changes. At most ``batch_size`` images
    are in memory."""
    run: list[torch.Tensor] = []
    for f in files:
        t = read_image(f, channels)
        if run and (t.shape != run[0].shape or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(t)
    if run:
        yield torch.stack(run)


def folder_key(backend: FeatureBackend, folder: str | Path, channels: int) -> tuple[dict[str, Any], list[Path]]:
    root = Path(folder).expanduser().resolve()
    files = image_files(root)
    return {"dataset": "folder", "split": "folder", "folder": str(root), "files": folder_fingerprint(root, files),
            "num_images": len(files), "channels": int(channels), "backend": backend.name,
            "input_size": int(backend.input_size), "fingerprint": backend.fingerprint}, files


def folder_features(backend: FeatureBackend, folder: str | Path, channels: int, cache_dir: str | Path,
                    batch_size: int = 250) -> RealFeatures:
    """Features (and logits) of every image in ``folder`` under ``backend``, from the cache when present."""
    if channels not in (1, 3):
        raise DQError(f"metrics.reference={folder}: generated images have {channels} channels; a reference folder "
                      f"is read as 1-channel (L) or 3-channel (RGB) images")
    key, files = folder_key(backend, folder, channels)
    path = reference_path(cache_dir, key)
    label = f"folder {key['folder']}, {backend.name}"
    cached = load_cached(path, key, label)
    if cached is not None:
        return cached
    feats, logits = [], []
    for batch in folder_batches(files, channels, batch_size):
        f, lg = extract(backend, batch, batch_size)
        feats.append(f.cpu())
        logits.append(None if lg is None else lg.cpu())
    ref = RealFeatures(torch.cat(feats), None if logits[0] is None else torch.cat(logits), key)
    return save_cached(path, ref, label)


def moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu [D], sigma [D, D]) in float64: the mean and the ddof=1 covariance (numpy.cov's, as pytorch-fid)."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def write_stats(path: str | Path, ref: RealFeatures, backend: FeatureBackend) -> Path:
    """Save ``ref``'s FID statistics as an .npz (mu, sigma + num_images, backend, fingerprint, input_size, channels)."""
    mu, sigma = moments(ref.features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, mu=mu.numpy(), sigma=sigma.numpy(), num_images=np.int64(len(ref.features)),
             backend=np.str_(backend.name), fingerprint=np.str_(backend.fingerprint),
             input_size=np.int64(backend.input_size), channels=np.int64(ref.key.get("channels", 0)))
    tmp.replace(path)
    return path


def read_stats(path: str | Path, backend: FeatureBackend) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(mu [D], sigma [D, D] float64, number of images or None) from an .npz, checked against ``backend``."""
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # not a zip, truncated, or holding pickled objects
        raise DQError(f"metrics.reference={path} is not a readable .npz ({str(e).splitlines()[0][:100]})") from None
    if "mu" not in data or "sigma" not in data:
        raise DQError(f"metrics.reference={path} holds {sorted(data)}, not mu and sigma (the pytorch-fid / clean-fid "
                      f"statistics); write one with python scripts/reference_stats.py DIR OUT.npz")
    mu, sigma = torch.from_numpy(data["mu"]).double().reshape(-1), torch.from_numpy(data["sigma"]).double()
    d = backend.num_features
    if mu.numel() != d or tuple(sigma.shape) != (d, d):
        raise DQError(f"metrics.reference={path} holds statistics of {mu.numel()}-dim features (sigma "
                      f"{tuple(sigma.shape)}), but metrics.backend={backend.name} gives {d}-dim features; use the "
                      f"backend the file was made with or recompute it")
    for field, want in (("backend", backend.name), ("fingerprint", backend.fingerprint)):
        if field in data and str(data[field]) != want:
            raise DQError(f"metrics.reference={path} was computed with {field} {str(data[field])!r}, but "
                          f"metrics.backend={backend.name} has {field} {want!r}; recompute it with this backend")
    n = int(data["num_images"]) if "num_images" in data else None
    return mu, sigma, n
