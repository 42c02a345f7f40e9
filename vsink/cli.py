"""``vsink`` command line: parse, call the library, print. Exit codes: 0 ok, 1 nothing could be
processed, 2 bad usage or input (a one-line ``vsink: error: ...`` message, no traceback)."""

from __future__ import annotations

import argparse
import json
import sys
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import VsinkError


def _add_common_args(p: argparse.ArgumentParser) -> None:
    """Inputs, model and progress options shared by the image subcommands."""
    p.add_argument("images", nargs="*", help="image files or directories (default: bundled demo images)")
    _add_model_args(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--model", default="demo", help="model spec (default: demo); see 'vsink models'")
    p.add_argument("--weights", help="checkpoint to load (.safetensors or a state dict)")
    p.add_argument("--img-size", type=int, help="square input size (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as loaded)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="build timm models with random weights (testing without network)")


def _add_ttr_args(p: argparse.ArgumentParser, flag: bool = True) -> None:
    if flag:
        p.add_argument("--test-time-registers", metavar="NEURONS_JSON",
                       help="apply test-time registers from a 'vsink registers find' spec")
    p.add_argument("--ttr-registers", type=int, default=1, help="appended register tokens (default 1)")
    p.add_argument("--ttr-scale", type=float, default=1.0, help="scale of the moved activation (default 1)")
    p.add_argument("--ttr-mode", default="max", help="max (default: signed value of largest magnitude) or mean")
    p.add_argument("--ttr-shift", default="per-neuron",
                   help="per-neuron (default: each register neuron moves its own value) or reference (one "
                        "scalar per layer, the signed max over tokens and that layer's neurons, as the released code)")
    p.add_argument("--ttr-zero-trained-registers", action="store_true",
                   help="also zero the register neurons on trained registers, as the released code "
                        "(default: trained registers keep their activations)")


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
    scan.add_argument("--prompt", help="scan an LVLM (--model demo-llava, hf:llava-hf/..., DIR): its language model's "
                                       "sinks and its vision tower, each image asked with this prompt "
                                       "(default for demo-llava: 'describe the image')")
    scan.add_argument("--trust-remote-code", action="store_true",
                      help="LVLM scans: allow the model's own code from the hub (off by default)")
    _add_ttr_args(scan)

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
    _add_ttr_args(maps)

    registers = sub.add_parser("registers", help="register neurons and test-time registers (no training)")
    reg_sub = registers.add_subparsers(dest="registers_command", required=True)
    find = reg_sub.add_parser("find", help="rank MLP neurons by their activation on high-norm tokens",
                              description="Find register neurons (Jiang et al. 2025) and write neurons.json.")
    _add_common_args(find)
    find.add_argument("--out", default="neurons.json", help="output spec (default: neurons.json)")
    find.add_argument("--top-k", type=int, default=10, help="neurons to keep (default 10)")
    find.add_argument("--detection-layer", type=int, help="block whose outliers are used (default: emergence layer)")
    find.add_argument("--highest-layer", type=int, help="last block whose MLP is scored (default: emergence layer)")
    find.add_argument("--threshold", default="auto", help="high-norm threshold: auto, sigma:K or a number")
    find.add_argument("--min-selectivity", type=float,
                      help="keep neurons whose outlier score is >= this x their mean |activation| on patches")
    find.add_argument("--outlier-tokens", default="patches",
                      help="patches (default: outlier positions are patches above the threshold) or all (any "
                           "token, class token included, as the released code)")
    find.add_argument("--sparsity-filter", action="store_true",
                      help="the paper notebook's filter: per image, score only neurons below "
                           "--sparsity-activation on >= --sparsity-fraction of all tokens (default off)")
    find.add_argument("--sparsity-fraction", type=float, default=0.5, help="see --sparsity-filter (default 0.5)")
    find.add_argument("--sparsity-activation", type=float, default=0.5, help="see --sparsity-filter (default 0.5)")
    find.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    apply = reg_sub.add_parser("apply", help="scan with and without test-time registers and compare",
                               description="Scan the images without and with test-time registers from a neuron "
                                           "spec: DIR/before and DIR/after hold scan.json and report.html, "
                                           "DIR/compare.html shows both side by side.")
    _add_common_args(apply)
    apply.add_argument("--neurons", required=True, help="neurons.json from 'vsink registers find'")
    apply.add_argument("--out", default="vsink-registers", help="output directory (default: vsink-registers)")
    apply.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    _add_ttr_args(apply, flag=False)

    _add_eval_parser(sub)
    _add_lvlm_parsers(sub)
    finetune = sub.add_parser("finetune", help="add registers and train them (posthoc distillation or scratch)",
                              description="Run a fine-tuning recipe (configs/*.yaml); KEY=VALUE overrides any "
                                          "recipe field, e.g. train.steps=100 teacher.kind=ttr. Under torchrun "
                                          "each process trains on its share of every batch (DDP).")
    finetune.add_argument("--config", help="recipe YAML (default: built-in defaults, the posthoc demo)")
    finetune.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    finetune.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out/")
    finetune.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("models", help="list the supported model spec forms")
    view = sub.add_parser("view", help="write an interactive viewer (one offline HTML file) of a scan, maps or "
                                       "attention export",
                          description="Write one self-contained HTML file to explore the output of 'vsink maps' "
                                      "(attention rows with --kind full), 'vsink scan' or 'vsink generate "
                                      "--export-attention': pick an image, block and head, click a patch to see its "
                                      "attention row, toggle norms; for LVLMs pick a generated word.")
    view.add_argument("directory", help="output directory of vsink maps, scan or generate --export-attention")
    view.add_argument("--out", help="HTML file to write (default: DIRECTORY/viewer.html)")
    view.add_argument("--max-images", type=int, default=8, help="images (or LVLM rows) to include (default 8)")
    view.add_argument("--layers", help="comma list of exported blocks to include (default: all exported)")
    view.add_argument("--precision", default="float16",
                      help="float16 (default: half the size, values to ~3 significant digits) or float32")
    return parser


def lvlm_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--model/--device/--dtype/--trust-remote-code of the LVLM subcommands."""
    p.add_argument("--model", required=required, help="hf:REPO or a local directory of an LVLM "
                   "(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as saved)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run code shipped with the model (off by default)")


def protocol_arg(p: argparse.ArgumentParser) -> None:
    """--protocol of the commands that run LVLM mitigations."""
    p.add_argument("--protocol", default="paper",
                   help="paper (default): the mitigation as its paper describes it; official: as the authors' "
                        "released scripts run it, with their defaults (docs/lvlm.md, Protocols)")


def _add_lvlm_parsers(sub) -> None:
    model_args = lvlm_model_args

    gen = sub.add_parser("generate", help="LVLM greedy generation with a hallucination mitigation",
                         description="Greedy generation with none, VAR, PAI or FastV; several --image/--prompt "
                                     "pairs run as one left-padded batch.")
    model_args(gen)
    gen.add_argument("--image", action="append", required=True, help="image file (repeat for a batch)")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (one per --image, or one for all)")
    gen.add_argument("--mitigation", default="none",
                     help="none (default), var, pai, fastv, ttr, or a '+'-joined combination such as ttr+var")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="mitigation setting, e.g. p=0.6, alpha=0.2, gamma=1.1, k=2, ratio=0.5, sink_dims=[1415,2533]")
    gen.add_argument("--sinks", help="sink calibration JSON from 'vsink lvlm calibrate' (VAR's sink_dims)")
    protocol_arg(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    gen.add_argument("--export-attention", metavar="DIR", help="write per-token attention on the image (npz, png)")

    lvlm = sub.add_parser("lvlm", help="LVLM tools")
    lvlm_sub = lvlm.add_subparsers(dest="lvlm_command", required=True)
    cal = lvlm_sub.add_parser("calibrate", help="find the decoder's sink dimensions (for VAR)",
                              description="Rank hidden dimensions by |h / rms(h)| on the first (BOS) token in early "
                                          "decoder layers over a few prompts; write them to JSON.")
    model_args(cal)
    cal.add_argument("--image", action="append", help="images (default: the bundled demo images)")
    cal.add_argument("--prompt", default="Describe the image.", help="prompt used with every image")
    cal.add_argument("--num-dims", type=int, default=2, help="dimensions to keep (default 2)")
    cal.add_argument("--out", default="sinks.json", help="output JSON (default sinks.json)")


def _comma(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluations: dense prediction, POPE, CHAIR")
    ev_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    dense = ev_sub.add_parser(
        "dense", help="linear-probe segmentation, LOST object discovery and artifact metrics",
        description="Evaluate a model and its variants (baseline, test-time registers, fine-tuned weights, "
                    "other models) on dense tasks; writes OUT/results.json, results.md and results.html. "
                    "With --format synthetic (the default) no data is needed.")
    _add_model_args(dense)
    dense.add_argument("--data", help="dataset root (voc, ade, folder) or instances JSON (coco)")
    dense.add_argument("--format", default="synthetic", help="voc, ade, coco, folder or synthetic (default)")
    dense.add_argument("--split", help="evaluation split (default: val / validation)")
    dense.add_argument("--train-split", help="split the linear head trains on (default: train / training)")
    dense.add_argument("--images", dest="coco_images", help="coco: image directory (default: next to the JSON)")
    dense.add_argument("--image-set", default="auto", help="voc: segmentation, main or auto (default)")
    dense.add_argument("--tasks", help="comma list of linear-seg, lost, artifacts (default: all the data allows)")
    dense.add_argument("--variant", action="append", metavar="NAME=VALUE",
                       help="baseline, NAME=neurons.json (test-time registers), NAME=weights.safetensors, "
                            "NAME=model:SPEC (repeatable; baseline is added first); the --ttr-* options apply "
                            "to every test-time-register variant")
    _add_ttr_args(dense, flag=False)
    dense.add_argument("--limit", type=int, help="use the first N images of each split")
    dense.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    dense.add_argument("--seg-layer", type=int, default=-1, help="block for linear-seg features (default -1)")
    dense.add_argument("--num-classes", type=int, help="classes in the masks (default: the dataset's or inferred)")
    dense.add_argument("--epochs", type=int, default=20, help="linear head epochs (default 20)")
    dense.add_argument("--lr", type=float, default=1e-3, help="linear head learning rate (default 1e-3)")
    dense.add_argument("--no-batchnorm", action="store_true", help="linear head without BatchNorm")
    dense.add_argument("--seed", type=int, default=0, help="seed for the head and the synthetic data (default 0)")
    dense.add_argument("--lost-layers", default="-1", help="LOST blocks, comma list (default -1)")
    dense.add_argument("--lost-kinds", default="k", help="LOST features: comma list of k, q, v, tokens (default k)")
    dense.add_argument("--lost-biases", default="0", help="LOST Gram-matrix biases, comma list (default 0)")
    dense.add_argument("--lost-normalize", default="no", help="L2-normalise LOST features: no (default), yes, both")
    dense.add_argument("--lost-k", type=int, default=100, help="LOST seed-expansion candidates (default 100)")
    dense.add_argument("--lost-ties", default="stable",
                       help="LOST order of equal degrees: stable (default, and the only one defined: patch order)")
    dense.add_argument("--lost-iou", default="exact",
                       help="CorLoc IoU: exact (default: IoU >= 0.5 is a hit) or reference (LOST's bbox_iou on "
                            "float boxes: +1e-7 on heights and union, so exactly 0.5 is a miss)")
    dense.add_argument("--synthetic-images", type=int, default=32, help="synthetic: images per split (default 32)")
    dense.add_argument("--out", default="vsink-eval", help="output directory (default: vsink-eval)")
    from .cli_hallucination import add_parsers

    add_parsers(ev_sub)


def _cmd_scan(args: argparse.Namespace) -> int:
    from .backbones.hf_lvlm import DEMO_LVLM
    from .scan import NothingScanned, scan

    if args.prompt is not None or args.model == DEMO_LVLM:
        return _scan_lvlm(args)
    images = _inputs(args)
    backbone = _load_for(args)
    ttr = _ttr(args, args.test_time_registers)
    try:
        with ttr.applied(backbone) if ttr else nullcontext():
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
          f"{len(hn.outliers)} outlier tokens over all layers")
    for layer in hn.layers:
        print(f"  block {layer.index:>2}: median {layer.median:8.3f}  max {layer.max:8.3f}  "
              f"ratio {layer.ratio:6.2f}{_outlier_note(layer)}")
    print(f"attention sinks: {len(result.sinks)} (token, image, layer) entries")
    dims = sorted({m.dim for m in result.massive})
    print(f"massive activations (>= {result.settings['massive_ratio']:g}x median |activation|): "
          f"{len(result.massive)} entries" + (f", residual dims {dims}" if dims else ""))
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _scan_lvlm(args: argparse.Namespace) -> int:
    from .lvlm.scan import scan_lvlm
    from .scan import NothingScanned

    if args.test_time_registers:
        raise VsinkError("--test-time-registers applies to vision scans; for an LVLM use "
                         "'vsink generate --mitigation ttr+...'")
    images = _inputs(args)
    lvlm = load_lvlm_for(args)
    if lvlm.synthetic:
        print("vsink: model 'demo-llava' is SYNTHETIC: a small LLaVA with planted register neurons, visual sinks "
              "and sink dimensions (see docs/lvlm.md)", file=sys.stderr)
    prompt = args.prompt if args.prompt is not None else "describe the image"
    try:
        result = scan_lvlm(lvlm, images, prompt, batch_size=args.batch_size, sink_ratio=args.sink_ratio,
                           progress=not args.no_progress)
    except NothingScanned as e:
        for s in e.skipped:
            print(f"vsink: skipped {s['reason']}", file=sys.stderr)
        print(f"vsink: error: {e}", file=sys.stderr)
        return 1
    paths = result.save(args.out)
    print(f"scanned {len(result.images)} images ({len(result.skipped)} skipped) with {result.model}, "
          f"prompt {prompt!r}")
    print(f"layout: {result.layout.describe()}; sink dims {result.sink_dims} ({result.sink_dims_source}), "
          f"tau {result.tau:g}")
    for row in result.layer_summaries():
        dims = [m["dim"] for m in row["massive"]]
        print(f"  layer {row['index']:>2}: BOS share {row['bos_share']:.3f}  image share "
              f"{row['image_attention_share']:.3f}  visual sink tokens {row['visual_sink_count']}"
              + (f"  massive dims {dims}" if dims else ""))
    link = result.tower_to_llm()
    if link is not None and link["tower_layer"] is not None:
        print(f"vision tower: high-norm tokens from block {link['tower_layer']}: {link['tower_high_norm']}; "
              f"{link['both']} of them are visual sink tokens in the language model")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _outlier_note(layer) -> str:
    """How a layer's outliers were found, for the scan summary (empty when there are none)."""
    if not layer.outliers:
        return ""
    parts = [f"{layer.outliers} outliers ({100 * layer.outlier_fraction:.1f}%)"]
    if layer.threshold is not None:
        parts.append(f"pooled threshold {layer.threshold:.3g}")
    if layer.own_gap_images:
        n = layer.own_gap_images
        parts.append(f"{n} image{'s' if n != 1 else ''} through {'their' if n != 1 else 'its'} own gap")
    return "  " + ", ".join(parts)


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


def _ttr(args: argparse.Namespace, path: Optional[str]):
    """The TestTimeRegisters the options ask for, or None."""
    if not path:
        return None
    from .registers import NeuronSpec, TestTimeRegisters

    return TestTimeRegisters(NeuronSpec.load(path), **_ttr_options(args))


def _ttr_options(args: argparse.Namespace) -> dict:
    """The TestTimeRegisters keyword options of the --ttr-* flags."""
    return dict(registers=args.ttr_registers, scale=args.ttr_scale, mode=args.ttr_mode, shift=args.ttr_shift,
                zero_trained_registers=args.ttr_zero_trained_registers)


def _cmd_registers(args: argparse.Namespace) -> int:
    from .registers import find_register_neurons
    from .scan import scan

    images = _inputs(args)
    backbone = _load_for(args)
    if args.registers_command == "find":
        spec = find_register_neurons(backbone, images, top_k=args.top_k, detection_layer=args.detection_layer,
                                     highest_layer=args.highest_layer, threshold=args.threshold,
                                     min_selectivity=args.min_selectivity, outlier_tokens=args.outlier_tokens,
                                     sparsity_filter=args.sparsity_filter, sparsity_fraction=args.sparsity_fraction,
                                     sparsity_activation=args.sparsity_activation, batch_size=args.batch_size,
                                     img_size=args.img_size, progress=not args.no_progress)
        spec.save(args.out)
        st = spec.settings
        print(f"register neurons of {spec.model}: outliers at block {st['detection_layer']}, scored blocks "
              f"0-{st['highest_layer']}, {st['images_with_outliers']}/{st['images']} images with outliers")
        for n in spec.neurons:
            print(f"  block {n.layer:>2} neuron {n.neuron:>5}  score {n.score:.4g}")
        print(f"wrote {args.out}")
        return 0
    from .export.compare import MAX_IMAGES, pca_layers, render_scan_comparison
    from .export.pca import patch_features
    from .io import write_text

    ttr = _ttr(args, args.neurons)
    out = Path(args.out)
    kwargs = dict(batch_size=args.batch_size, img_size=args.img_size, progress=not args.no_progress)
    before = scan(backbone, images, **kwargs)
    before.save(out / "before")
    shown, blocks = before.thumbnails[:MAX_IMAGES], pca_layers(before)
    pca = {"before": patch_features(backbone, shown, blocks, before.input_size)}
    with ttr.applied(backbone):
        after = scan(backbone, images, **kwargs)
        pca["after"] = patch_features(backbone, shown, blocks, before.input_size)
    after.save(out / "after")
    compare = write_text(out / "compare.html", render_scan_comparison(
        {"before": before, "after": after}, f"vsink registers apply — {backbone.spec}", pca, shown))
    for label, r in (("before", before), ("after", after)):
        hn = r.high_norm
        regs = [a["register_received"] for a in r.attention]
        print(f"{label:>6}: emergence layer {hn.emergence_layer}, {len(hn.outliers)} outlier tokens, "
              f"max register share {max(regs):.3f}, max patch-norm ratio {max(l.ratio for l in hn.layers):.2f}")
    print(f"wrote {out / 'before'}, {out / 'after'} and {compare} (side by side)")
    return 0


def _cmd_maps(args: argparse.Namespace) -> int:
    from .maps import DEFAULT_KINDS, export_maps

    kinds = [k.strip() for group in (args.kind or [",".join(DEFAULT_KINDS)]) for k in group.split(",") if k.strip()]
    images = _inputs(args)
    backbone = _load_for(args)
    ttr = _ttr(args, args.test_time_registers)
    with ttr.applied(backbone) if ttr else nullcontext():
        result = export_maps(backbone, images, args.out, kinds=kinds, layers=args.layers, heads=args.heads,
                             formats=[f.strip() for f in args.format.split(",") if f.strip()], fusion=args.fusion,
                             discard_ratio=args.discard_ratio, img_size=args.img_size,
                             keep_aspect=args.keep_aspect, progress=not args.no_progress)
    print(f"exported maps for {len(result.images)} images ({len(result.skipped)} skipped) to {args.out}")
    for m in result.images:
        print(f"  {m.name}: {len(m.files)} files, {m.layout.describe()}")
    if not result.images:
        print("vsink: error: no image could be read", file=sys.stderr)
        return 1
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command in ("pope", "chair"):
        from .cli_hallucination import run

        return run(args)
    from .evaluate.datasets import DEFAULT_SPLITS, open_dataset
    from .evaluate.dense import LostSettings, evaluate_dense, supported_tasks
    from .evaluate.segmentation import ProbeSettings
    from .evaluate.variants import parse_variants

    def numbers(text: str, kind: type, what: str) -> list:
        try:
            return [kind(t) for t in _comma(text)]
        except ValueError:
            raise VsinkError(f"{what}: expected a comma list of numbers, got {text!r}") from None

    normalize = {"no": [False], "yes": [True], "both": [False, True]}.get(args.lost_normalize)
    if normalize is None:
        raise VsinkError(f"--lost-normalize must be no, yes or both, got {args.lost_normalize!r}")
    lost = LostSettings(layers=numbers(args.lost_layers, int, "--lost-layers"), kinds=_comma(args.lost_kinds),
                        biases=numbers(args.lost_biases, float, "--lost-biases"), normalize=normalize, k=args.lost_k,
                        ties=args.lost_ties, iou=args.lost_iou)
    variants = parse_variants(args.variant, _ttr_options(args))
    if args.format == "synthetic" and args.data:
        raise VsinkError("--data is not used with --format synthetic (the default); pass --format voc|ade|coco|folder")
    common = dict(images=args.coco_images, image_set=args.image_set, synthetic_images=args.synthetic_images,
                  seed=args.seed)
    if args.format == "synthetic":
        common["synthetic_size"] = args.img_size or 224
    eval_set = open_dataset(args.format, args.data, args.split, **common).limit(args.limit)
    tasks = _comma(args.tasks) if args.tasks else supported_tasks(eval_set)
    train_set = None
    if "linear-seg" in tasks:
        train_split = args.train_split or DEFAULT_SPLITS.get(args.format, (None, None))[0]
        train_set = open_dataset(args.format, args.data, train_split, **common).limit(args.limit)
    print(f"vsink: evaluating on {eval_set.describe()}", file=sys.stderr)
    backbone = _load_for(args)
    result = evaluate_dense(
        backbone, eval_set, train_set=train_set, tasks=tasks, variants=variants, seg_layer=args.seg_layer,
        lost_settings=lost, num_classes=args.num_classes, batch_size=args.batch_size, img_size=args.img_size,
        probe_settings=ProbeSettings(epochs=args.epochs, lr=args.lr, batchnorm=not args.no_batchnorm, seed=args.seed),
        load_kwargs=dict(device=args.device, dtype=args.dtype, pretrained=not args.no_pretrained),
        progress=not args.no_progress)
    paths = result.save(args.out)
    print(result.to_markdown())
    for entry in result.skipped:
        print(f"vsink: skipped {entry['item']}: {entry['reason']}", file=sys.stderr)
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def load_lvlm_for(args: argparse.Namespace):
    from .backbones.hf_lvlm import load_lvlm
    from .backbones.registry import resolve_dtype

    repo = args.model.removeprefix("hf:")
    lvlm = load_lvlm(repo, device=args.device, dtype=resolve_dtype(args.dtype), trust_remote_code=args.trust_remote_code)
    print(f"vsink: {lvlm.spec}: {lvlm.model_type}, {lvlm.num_layers} decoder layers", file=sys.stderr)
    return lvlm


def parse_settings(pairs: Sequence[str]) -> dict:
    """``--set KEY=VALUE`` options → a dict."""
    from .assignments import parse_assignment

    return dict(parse_assignment(item, "--set") for item in pairs)


def _cmd_generate(args: argparse.Namespace) -> int:
    import warnings

    from .images import load_image
    from .lvlm import MitigationWarning, generate
    from .lvlm.sinks import Calibration
    from .mitigate import make_mitigations, mitigation_names

    prompts = list(args.prompt)
    if len(prompts) == 1 and len(args.image) > 1:
        prompts *= len(args.image)
    if len(prompts) != len(args.image):
        raise VsinkError(f"give one --prompt per --image (or one for all): {len(args.image)} images, {len(prompts)} prompts")
    settings = parse_settings(args.set)
    if args.sinks:
        names = mitigation_names(args.mitigation)
        key = "sink_dims" if names == ["var"] else "var.sink_dims"
        if "var" in names:
            settings.setdefault(key, Calibration.load(args.sinks).sink_dims)
    make_mitigations(args.mitigation, settings, args.protocol)  # fail before loading the model
    images = [load_image(p) for p in args.image]
    lvlm = load_lvlm_for(args)
    inputs = lvlm.prepare(images, prompts)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore", MitigationWarning)  # reported below, one line each
        result = generate(lvlm, inputs, mitigation=args.mitigation, settings=settings, protocol=args.protocol,
                          max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache,
                          capture_attention=bool(args.export_attention))
    print(f"vsink: mitigation {result.mitigation}, protocol {result.protocol}, settings {json.dumps(result.settings)}",
          file=sys.stderr)
    for entry in result.report:
        layers = ", ".join(f"{row['layer']}: " + " ".join(f"{k}={v:g}" for k, v in row.items() if k != "layer")
                           for row in entry["layers"]) or "nothing"
        print(f"vsink: {entry['mitigation']} per layer: {layers}", file=sys.stderr)
    for note in result.warnings:
        print(f"vsink: warning: {note}", file=sys.stderr)
    for path, text in zip(args.image, result.texts):
        print(f"[{path}] {text}")
    if args.export_attention:
        from .lvlm.export import export_attention

        written = export_attention(lvlm, result, inputs, args.export_attention, images=images)
        print(f"wrote {len(written)} files to {args.export_attention}")
    return 0


def _cmd_lvlm(args: argparse.Namespace) -> int:
    from .data.demo_images import demo_images
    from .images import load_image
    from .lvlm.sinks import calibrate

    images = [load_image(p) for p in args.image] if args.image else [im.image for im in demo_images()]
    lvlm = load_lvlm_for(args)
    batches = [lvlm.prepare([im], [args.prompt]) for im in images]
    cal = calibrate(lvlm, batches, num_dims=args.num_dims)
    cal.save(args.out)
    print(f"sink dimensions of {lvlm.spec}: {cal.sink_dims} (layers {cal.layers}, {len(images)} prompts)")
    print(f"wrote {args.out}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .train import load_config, run_finetune

    cfg = load_config(args.config, args.overrides)
    summary = run_finetune(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = summary.get("final_eval", {})
        print(f"{cfg['recipe']}: {summary['steps']} steps, {summary['images_per_s'] or 0:.1f} images/s, "
              f"world size {summary['world_size']}")
        for k, v in ev.items():
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
        print(f"wrote {summary['model']} (load with vsink.load), {cfg['out']}/metrics.jsonl, {cfg['out']}/summary.json")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .backbones import SPEC_FORMS

    print(SPEC_FORMS)
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .export.viewer import LARGE_BYTES, write_viewer

    layers = None
    if args.layers:
        try:
            layers = [int(t) for t in _comma(args.layers)]
        except ValueError:
            raise VsinkError(f"--layers: expected a comma list of block indices, got {args.layers!r}") from None
    path = write_viewer(args.directory, args.out, max_images=args.max_images, layers=layers, precision=args.precision)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB; open it in a browser, no server needed)")
    if size > LARGE_BYTES:
        print("vsink: the viewer is large; fewer --max-images or --layers, or --precision float16, make it smaller",
              file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"scan": _cmd_scan, "maps": _cmd_maps, "registers": _cmd_registers, "eval": _cmd_eval,
                "finetune": _cmd_finetune, "generate": _cmd_generate, "lvlm": _cmd_lvlm, "models": _cmd_models,
                "view": _cmd_view}
    try:
        return handlers[args.command](args)
    except VsinkError as e:
        print(f"vsink: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vsink: interrupted; nothing was left half-written (resumable runs keep their finished items)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
