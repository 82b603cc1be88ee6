"""The `fastvq` command (also `python -m fastvq`).

  fastvq demo --out DIR     learn a codebook of image patches and write DIR/quantize_demo.png
  fastvq backends           which backends work here, and why not for the others
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from ._backend import BACKENDS, available_backends


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _demo(args, parser) -> int:
    from .demo import run_demo  # skimage and matplotlib load only for the demo

    try:
        run_demo(args.out, codes=args.codes, patch=args.patch, iters=args.iters, images=args.images,
                 downscale=args.downscale, backend=args.backend, seed=args.seed, quick=args.quick)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    return 0


def _backends(args, parser) -> int:
    for status in available_backends().values():
        print(f"{status.name:<7} {'yes' if status.available else 'no ':<4} {status.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULT_IMAGES, DEFAULTS, IMAGES, QUICK_DEFAULTS

    parser = argparse.ArgumentParser(prog="fastvq", description="fastvq: fused kernels for VQGAN-style models")
    parser.add_argument("--version", action="version", version=f"fastvq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="learn a codebook of image patches with k-means and show the reconstruction",
                          description="Cut photographs shipped with scikit-image into patches, learn a codebook "
                                      "with k-means on fastvq.nearest_code, write DIR/quantize_demo.png and time "
                                      "nearest_code's cpp backend against the torch reference.")
    demo.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default demo_out)")
    demo.add_argument("--codes", "-K", type=_positive_int, help=f"codebook size K (default {DEFAULTS['codes']}, "
                                                                 f"{QUICK_DEFAULTS['codes']} with --quick)")
    demo.add_argument("--patch", type=_positive_int, default=4, help="patch side p; D = 3 p^2 (default 4)")
    demo.add_argument("--iters", type=_positive_int, help=f"k-means iterations (default {DEFAULTS['iters']}, "
                                                          f"{QUICK_DEFAULTS['iters']} with --quick)")
    demo.add_argument("--images", nargs="+", choices=IMAGES, default=list(DEFAULT_IMAGES), metavar="NAME",
                      help=f"scikit-image pictures to use, from {', '.join(IMAGES)} (default {' '.join(DEFAULT_IMAGES)})")
    demo.add_argument("--downscale", type=_positive_int, help=f"shrink images by this factor first (default "
                                                              f"{DEFAULTS['downscale']}, {QUICK_DEFAULTS['downscale']} with --quick)")
    demo.add_argument("--backend", choices=("auto",) + BACKENDS, default=None,
                      help="nearest_code backend for k-means (default: auto, or FASTVQ_BACKEND)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the initial codebook (default 0)")
    demo.add_argument("--quick", action="store_true", help="tiny setting for tests (smaller images, fewer codes and iterations)")
    demo.set_defaults(run=_demo, parser=demo)

    backends = sub.add_parser("backends", help="list the backends and whether they work here")
    backends.set_defaults(run=_backends, parser=backends)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
