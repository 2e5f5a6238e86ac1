"""Write FID reference statistics (mu, sigma: the pytorch-fid / clean-fid .npz convention) of an image folder.

    python scripts/reference_stats.py DIR OUT.npz [--backend tf_inception] [--channels 3] [--batch-size 50]

e.g. CIFAR-10 train statistics for ``metrics=tf_inception metrics.reference=OUT.npz``: export the 50k
train images as PNGs into DIR first. Images are read exactly as ``metrics.reference=DIR`` reads them
(dq.metrics.real_data: PIL, converted to ``--channels`` — use the channel count of the images you
will score: 3 for RGB models, 1 for the digits — then the backend resizes them), so
``metrics.reference=OUT.npz`` gives the same FID as ``metrics.reference=DIR`` (KID needs the folder).
The features are also cached under ``--cache-dir`` like the folder reference's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from dq.errors import DQError
    from dq.metrics.features import BACKENDS, build_backend
    from dq.metrics.real_data import check_reference, folder_features, write_stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="folder of png/jpg images (searched recursively)")
    ap.add_argument("out", help="the .npz to write")
    ap.add_argument("--backend", default="tf_inception", choices=sorted(BACKENDS))
    ap.add_argument("--channels", type=int, choices=(1, 3), default=None,
                    help="read images as 1-channel (L) or 3-channel (RGB); default 1 for digits, else 3")
    ap.add_argument("--batch-size", type=int, default=50, help="images per feature-network call")
    ap.add_argument("--cache-dir", default=".cache/dq", help="where folder features are cached (paths.cache_dir)")
    args = ap.parse_args(argv)
    try:
        if not Path(args.folder).is_dir():
            raise DQError(f"{args.folder} is not a folder of images")
        check_reference(args.folder)
        if not args.out.endswith(".npz"):
            raise DQError(f"output {args.out} must end in .npz")
        backend = build_backend(args.backend)
        channels = args.channels or (1 if args.backend == "digits" else 3)
        ref = folder_features(backend, args.folder, channels, args.cache_dir, args.batch_size)
        path = write_stats(args.out, ref, backend)
    except DQError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: mu [{ref.features.shape[1]}], sigma [{ref.features.shape[1]}, {ref.features.shape[1]}] "
          f"of {len(ref.features)} images ({args.backend} features, {channels} channel(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
