"""The `fastvq` command (also `python -m fastvq`).

  fastvq demo [--out DIR]             train a VQGAN and a GPT on the embedded textures, sample, write DIR/report.md
  fastvq train-vqgan --out DIR        train the VQGAN autoencoder (preset, YAML --config, --resume)
  fastvq train-gpt --vqgan CKPT --out DIR   train the prior on a VQGAN's codes
  fastvq sample --ckpt GPT_CKPT --out PNG   sample images (taller than the training crops with --height)
  fastvq bench                        time the kernels against their torch references here
  fastvq backends                     which backends work here, and why not for the others
  fastvq kmeans --out DIR             k-means codebook of image patches on nearest_code (the first demo)

Errors in what the user gave (configs, paths, shapes, damaged checkpoints), what their machine
refuses (a full disk, a read-only --out, no CUDA) and a missing `pipeline` extra are one line on
stderr and exit status 2 (FASTVQ_DEBUG=1 shows the traceback instead); what can be known before
any work (the extra, --device, --out) is checked first.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import sys

from . import __version__
from ._backend import BACKENDS, available_backends

# What a user can get wrong: reported as one line, never a traceback. OSError covers what their
# machine refuses (a full disk, a read-only or missing directory, no permission).
USER_ERRORS = (ValueError, TypeError, KeyError, OSError)

# The optional dependencies of the pipeline commands (the `pipeline` extra), module: pip name.
PIPELINE_EXTRA = {"yaml": "pyyaml", "tqdm": "tqdm", "PIL": "pillow", "matplotlib": "matplotlib",
                  "skimage": "scikit-image"}
PIPELINE_COMMANDS = ("demo", "train-vqgan", "train-gpt", "sample", "kmeans")
FILE_OUTPUT_COMMANDS = ("sample",)  # --out is a file; for the other pipeline commands a directory


def _check_extra(command: str) -> None:
    """Refuse a pipeline command whose optional dependencies are missing, before any work."""
    missing = [pip for module, pip in PIPELINE_EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"`fastvq {command}` needs the pipeline extra, which is not installed (missing: "
                         f"{', '.join(missing)}); install it with: pip install 'fastvq[pipeline]'")


def _check_device(device) -> None:
    """--device: a torch device, and CUDA only where CUDA works (torch.load's own error for a CUDA
    map location reads like a corrupt checkpoint)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({why}, torch {torch.__version__}); "
                             f"use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def _check_before_work(args) -> None:
    """What can be refused before a command starts: a missing extra, a device that is not there, an
    --out that cannot be written (a file where a directory goes, /dev/null, under a file, read-only)."""
    command = getattr(args, "command", None)
    if command not in PIPELINE_COMMANDS:
        return
    _check_extra(command)
    _check_device(getattr(args, "device", None))
    from .pipeline.checkpoint import check_output_dir, check_output_file

    if command in FILE_OUTPUT_COMMANDS:
        check_output_file(args.out)
    else:
        check_output_dir(args.out)


def _one_line(error: BaseException) -> str:
    """The one line a user mistake (or what their machine refused) is reported as."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror if error.filename is None else f"{error.filename}: {error.strerror}"
        if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            text += " (the disk is full: free some space or write elsewhere with --out)"
        elif error.errno == errno.EROFS:
            text += " (a read-only file system: write elsewhere with --out)"
        return text
    return " ".join(str(error).split()) or type(error).__name__  # torch's messages may run over lines


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _kmeans(args, parser) -> int:
    from .pipeline.kmeans_demo import run_demo  # skimage and matplotlib load only for the demo

    run_demo(args.out, codes=args.codes, patch=args.patch, iters=args.iters, images=args.images,
             downscale=args.downscale, backend=args.backend, seed=args.seed, quick=args.quick)
    return 0


def _demo(args, parser) -> int:
    from .pipeline.demo import run_demo

    run_demo(args.out, quick=args.quick, device=args.device, show_progress=not args.no_progress)
    return 0


def _train_overrides(args) -> dict:
    return {"train.steps": args.steps, "train.batch_size": args.batch_size, "train.lr": args.lr,
            "train.seed": args.seed}


def _train_vqgan(args, parser) -> int:
    from .pipeline.train_vqgan import config_for, train_vqgan

    overrides = {**_train_overrides(args), "train.size": args.size}
    train_vqgan(config_for(args.config, overrides), args.out, data=args.data, resume=args.resume, device=args.device,
                show_progress=not args.no_progress, fair_threads=args.fair_threads)
    return 0


def _train_gpt(args, parser) -> int:
    from .pipeline.train_gpt import config_for, train_gpt

    overrides = {**_train_overrides(args), "train.pkeep": args.pkeep, "train.cond": args.cond,
                 "train.conditional": None if args.conditional is None else args.conditional == "yes"}
    train_gpt(config_for(args.config, overrides), args.out, args.vqgan, data=args.data, resume=args.resume,
              device=args.device, show_progress=not args.no_progress, fair_threads=args.fair_threads)
    return 0


def _sample(args, parser) -> int:
    from .pipeline.sample import sample_images

    result = sample_images(args.ckpt, args.out, n=args.n, height=args.height, width=args.width,
                           classes=args.classes, cond=args.cond, cfg_scale=args.cfg_scale,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           zoom=args.zoom, wavefront=not args.sequential, device=args.device or "cpu",
                           show_progress=not args.no_progress)
    speed = result["timings"].get("tokens_per_s")
    print(f"wrote {result['png']}: {args.n} images of {result['height']}x{result['width']} pixels, "
          f"{result['tokens_per_image']} codes each" + (f", {speed:.0f} codes/s" if speed else "")
          + f" (details in {result['json']})")
    return 0


def _bench(args, parser) -> int:
    from .pipeline.demo import kernel_timings

    print(f"{'op':<36} {'shape':<30} {'backend':<8} {'fastvq ms':>10} {'torch ms':>10} {'speed-up':>9}")
    for r in kernel_timings(args.device or "cpu"):
        print(f"{r['op']:<36} {r['shape']:<30} {r['backend']:<8} {r['fastvq_ms']:>10.2f} "
              f"{r['torch_reference_ms']:>10.2f} {r['speedup']:>8.1f}x")
    return 0


def _backends(args, parser) -> int:
    for status in available_backends().values():
        print(f"{status.name:<7} {'yes' if status.available else 'no ':<4} {status.reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .pipeline.kmeans_demo import DEFAULT_IMAGES, DEFAULTS, IMAGES, QUICK_DEFAULTS

    parser = argparse.ArgumentParser(prog="fastvq", description="fastvq: fused kernels for VQGAN-style models")
    parser.add_argument("--version", action="version", version=f"fastvq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a small VQGAN and GPT on the embedded textures, sample, write a report",
                          description="The whole pipeline on scikit-image's brick, grass and gravel textures: "
                                      "train-vqgan, train-gpt, samples (one 4x taller than the crops), kernel "
                                      "timings, DIR/report.md. A few minutes on a 2-core CPU.")
    demo.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default demo_out)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run (for tests)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo, parser=demo)

    _add_training_parsers(sub)

    demo = sub.add_parser("kmeans", help="learn a codebook of image patches with k-means and show the reconstruction",
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
    demo.set_defaults(run=_kmeans, parser=demo)

    backends = sub.add_parser("backends", help="list the backends and whether they work here")
    backends.set_defaults(run=_backends, parser=backends)
    return parser


def _add_common_training_flags(p, default_out: str) -> None:
    p.add_argument("--out", default=default_out, metavar="DIR", help=f"output directory (default {default_out})")
    p.add_argument("--config", default=None, metavar="PRESET|YAML",
                   help="a preset (demo, small, base) or a YAML file of overrides over one (default demo)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="embedded (default), embedded:brick,grass (some embedded images) or a folder of images")
    p.add_argument("--steps", type=_positive_int, help="training steps (default from the config)")
    p.add_argument("--batch-size", type=_positive_int, help="batch size per process (default from the config)")
    p.add_argument("--lr", type=float, help="learning rate (default from the config)")
    p.add_argument("--seed", type=int, help="random seed (default from the config)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from DIR/last.ckpt (or the checkpoint given)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--fair-threads", action="store_true",
                   help="use fewer torch threads while other processes keep the cores busy (fastvq.FairThreads): "
                        "faster on a busy machine, but the float results then depend on the load (a run is no "
                        "longer bit-reproducible)")


def _add_training_parsers(sub) -> None:
    vq = sub.add_parser("train-vqgan", help="train the VQGAN autoencoder",
                        description="Train a VQGAN (L1 + perceptual + VQ + hinge GAN) on the embedded textures or "
                                    "your images; torchrun for several processes.")
    _add_common_training_flags(vq, "runs/vqgan")
    vq.add_argument("--size", type=_positive_int, help="training crop size in pixels (default from the config)")
    vq.set_defaults(run=_train_vqgan, parser=vq)

    gpt = sub.add_parser("train-gpt", help="train the GPT prior on a VQGAN's codes",
                         description="Encode training crops with a trained VQGAN and train a sliding-window, rope "
                                     "GPT on the code sequences (raster order).")
    _add_common_training_flags(gpt, "runs/gpt")
    gpt.add_argument("--vqgan", default="runs/vqgan/vqgan.ckpt", metavar="CKPT",
                     help="the VQGAN from train-vqgan (default runs/vqgan/vqgan.ckpt)")
    gpt.add_argument("--pkeep", type=float, help="fraction of input codes kept uncorrupted (default from the config)")
    gpt.add_argument("--conditional", choices=("yes", "no"), help="condition on the image class (default yes)")
    gpt.add_argument("--cond", choices=("none", "layout", "edges", "lowres"),
                     help="spatial condition of a GPT2D prior: a texture layout (mosaics of the embedded textures), "
                          "the Canny edges or a low-resolution copy of the image (default none)")
    gpt.set_defaults(run=_train_gpt, parser=gpt)

    sample = sub.add_parser("sample", help="sample images from a trained prior",
                            description="Draw code grids with the cached sampler and decode them with the VQGAN.")
    sample.add_argument("--ckpt", default="runs/gpt/gpt.ckpt", help="gpt.ckpt from train-gpt (default runs/gpt/gpt.ckpt)")
    sample.add_argument("--out", default="samples.png", metavar="PNG", help="image grid to write (default samples.png)")
    sample.add_argument("-n", type=_positive_int, default=8, help="number of images (default 8)")
    sample.add_argument("--height", type=_positive_int, help="image height in pixels (default: the condition's or "
                                                             "the training crop's)")
    sample.add_argument("--width", type=_positive_int, help="image width in pixels, any multiple of the VQGAN's "
                                                            "downsampling for a GPT2D prior (default as --height)")
    sample.add_argument("--cond", metavar="PNG", help="spatial condition: a layout PNG in the colours the "
                                                      "checkpoint lists, an edge map, or a low-resolution picture")
    sample.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1: none; GPT2D priors)")
    sample.add_argument("--sequential", action="store_true",
                        help="one code at a time instead of the wavefront (the same image, slower)")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")
    sample.add_argument("--class", dest="classes", nargs="+", metavar="CLASS", help="class names or indices, cycled")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=_positive_int)
    sample.add_argument("--top-p", type=float)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--zoom", type=_positive_int, default=1, metavar="N",
                        help="enlarge every pixel to N x N in the PNG (nearest neighbour; default 1)")
    sample.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    sample.set_defaults(run=_sample, parser=sample)

    bench = sub.add_parser("bench", help="time the kernels against their torch references on this machine")
    bench.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    bench.set_defaults(run=_bench, parser=bench)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_before_work(args)
        return args.run(args, args.parser)
    except (*USER_ERRORS, ModuleNotFoundError) as e:
        if os.environ.get("FASTVQ_DEBUG"):  # the full traceback, for bug reports
            raise
        if isinstance(e, ModuleNotFoundError):
            if (e.name or "").split(".")[0] not in PIPELINE_EXTRA:
                raise
            message = (f"`fastvq {args.command}` needs the pipeline extra ({e.name} is missing); install it "
                       f"with: pip install 'fastvq[pipeline]'")
        else:
            message = _one_line(e)
        args.parser.exit(2, f"{args.parser.prog}: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
