"""``vsink`` command line: parse, call the library, print. Exit codes: 0 ok, 1 nothing could be
processed, 2 bad usage or input (a one-line ``vsink: error: ...`` message, no traceback)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import VsinkError


def _add_common_args(p: argparse.ArgumentParser) -> None:
    """Inputs, model and progress options shared by the image subcommands."""
    p.add_argument("images", nargs="*", help="image files or directories (default: bundled demo images)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--model", default="demo", help="model spec (default: demo); see 'vsink models'")
    p.add_argument("--weights", help="checkpoint to load (.safetensors or a state dict)")
    p.add_argument("--img-size", type=int, help="square input size (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as loaded)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="build timm models with random weights (testing without network)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vsink", description="Find, fix and measure attention sinks "
                                     "and register tokens in vision transformers.")
    parser.add_argument("--version", action="version", version=f"vsink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="scan images for high-norm tokens and attention sinks",
                          description="Scan images (files or directories) for high-norm tokens and attention "
                                      "sinks in every layer. With no images and no --model, runs the built-in "
                                      "synthetic demo on the bundled demo images, offline.")
    _add_common_args(scan)
    scan.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    scan.add_argument("--threshold", default="auto",
                      help="high-norm threshold: auto (default), sigma:K, or an absolute norm")
    scan.add_argument("--sink-ratio", type=float, default=5.0,
                      help="sink = share of received attention >= this x the median share (default: 5)")
    scan.add_argument("--out", default="vsink-out", help="output directory (default: vsink-out)")

    maps = sub.add_parser("maps", help="export attention and norm maps (npz arrays, png overlays)",
                          description="Export per-image attention and norm maps: arrays in <out>/<stem>.npz, "
                                      "overlays and a contact sheet in <out>/<stem>/, an index in maps.json. "
                                      "With no images: the bundled demo images.")
    _add_common_args(maps)
    maps.add_argument("--kind", action="append",
                      help="cls, received, norm, rollout, full (repeat or comma-separate; "
                           "default: cls,received,norm,rollout)")
    maps.add_argument("--layers", default="all", help="all (default) or a comma list of block indices, e.g. 0,5,-1")
    maps.add_argument("--heads", default="mean", help="mean (default), all, or a comma list of head indices")
    maps.add_argument("--format", default="png,npz", help="png, npz or png,npz (default)")
    maps.add_argument("--fusion", default="mean", help="rollout head fusion: mean (default), max, min")
    maps.add_argument("--discard-ratio", type=float, default=0.0,
                      help="rollout: zero this fraction of the lowest fused attention entries (default 0)")
    maps.add_argument("--keep-aspect", action="store_true",
                      help="dynamic-size models: keep each image's aspect ratio (longer side = img size)")
    maps.add_argument("--out", default="vsink-maps", help="output directory (default: vsink-maps)")

    sub.add_parser("models", help="list the supported model spec forms")
    return parser


def _cmd_scan(args: argparse.Namespace) -> int:
    from .scan import NothingScanned, scan

    images = _inputs(args)
    backbone = _load_for(args)
    try:
        result = scan(backbone, images, batch_size=args.batch_size, img_size=args.img_size,
                      threshold=args.threshold, sink_ratio=args.sink_ratio, progress=not args.no_progress)
    except NothingScanned as e:
        for s in e.skipped:
            print(f"vsink: skipped {s['reason']}", file=sys.stderr)
        print(f"vsink: error: {e}", file=sys.stderr)
        return 1
    paths = result.save(args.out)
    hn = result.high_norm
    print(f"scanned {len(result.images)} images ({len(result.skipped)} skipped) with {result.model}")
    print(f"layout: {result.layout.describe()}")
    print(f"high-norm tokens: emergence layer {hn.emergence_layer}, "
          f"{len(hn.tokens)} outlier tokens over all layers")
    for layer in hn.layers:
        flag = f"  threshold {layer.threshold:.3g}, {100 * layer.outlier_fraction:.1f}% outliers" \
            if layer.threshold is not None else ""
        print(f"  block {layer.index:>2}: median {layer.median:8.3f}  max {layer.max:8.3f}  "
              f"ratio {layer.ratio:6.2f}{flag}")
    print(f"attention sinks: {len(result.sinks)} (token, image, layer) entries")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _load_for(args: argparse.Namespace):
    from .backbones import load

    backbone = load(args.model, weights=args.weights, img_size=args.img_size, device=args.device,
                    dtype=args.dtype, pretrained=not args.no_pretrained)
    if backbone.spec == "demo":
        print("vsink: model 'demo' is SYNTHETIC: a small ViT with high-norm tokens planted by construction "
              "(block 2, MLP neurons 0-3; see docs/demo.md)", file=sys.stderr)
    print(f"vsink: {backbone.describe()}", file=sys.stderr)
    return backbone


def _inputs(args: argparse.Namespace):
    from .data.demo_images import demo_images
    from .images import expand_paths

    return expand_paths(args.images) if args.images else demo_images()


def _cmd_maps(args: argparse.Namespace) -> int:
    from .maps import DEFAULT_KINDS, export_maps

    kinds = [k.strip() for group in (args.kind or [",".join(DEFAULT_KINDS)]) for k in group.split(",") if k.strip()]
    images = _inputs(args)
    backbone = _load_for(args)
    result = export_maps(backbone, images, args.out, kinds=kinds, layers=args.layers, heads=args.heads,
                         formats=[f.strip() for f in args.format.split(",") if f.strip()], fusion=args.fusion,
                         discard_ratio=args.discard_ratio, img_size=args.img_size, keep_aspect=args.keep_aspect,
                         progress=not args.no_progress)
    print(f"exported maps for {len(result.images)} images ({len(result.skipped)} skipped) to {args.out}")
    for m in result.images:
        print(f"  {m.name}: {len(m.files)} files, {m.layout.describe()}")
    if not result.images:
        print("vsink: error: no image could be read", file=sys.stderr)
        return 1
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .backbones import SPEC_FORMS

    print(SPEC_FORMS)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"scan": _cmd_scan, "maps": _cmd_maps, "models": _cmd_models}
    try:
        return handlers[args.command](args)
    except VsinkError as e:
        print(f"vsink: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vsink: interrupted; no partial outputs were written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
