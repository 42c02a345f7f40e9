"""``vsink`` command line: parse, call the library, print. Exit codes: 0 ok, 1 nothing could be
processed, 2 bad usage or input (a one-line ``vsink: error: ...`` message, no traceback)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence, TextIO, Union

from .version import __version__
from .errors import VsinkError, VsinkWarning
from .cli_common import image_dir_arg, load_lvlm_for, parse_settings, shard_of
from .evaluate.benchmarks import MODULES as BENCHMARK_MODULES, get as get_benchmark
from .options import add_options
from .wording import count


class UsageError(VsinkError):
    """A command line argparse cannot read (unknown flag, missing value, refused value)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as :class:`UsageError` (one line, exit code 2, by :func:`main`),
    and values that start with a negative number (``--lost-layers -1,-2``, ``--layers -2,-1``)
    read as values, not as unknown flags (no vsink flag starts with a digit)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The ``vsink`` parser; every flag comes from its declaration in :mod:`vsink.parameters`."""
    from . import parameters as P

    parser = _Parser(prog="vsink", description="Find, fix and measure attention sinks "
                     "and register tokens in vision transformers.")
    parser.add_argument("--version", action="version", version=f"vsink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="scan images for high-norm tokens and attention sinks",
                          description="Scan images (files or directories) for high-norm tokens and attention "
                                      "sinks in every layer. With no images and no --model, runs the built-in "
                                      "synthetic demo on the bundled demo images, offline.")
    add_options(scan, P.IMAGES, P.MODEL, P.SCAN, [P.TTR_SPEC], P.TTR)

    maps = sub.add_parser("maps", help="export attention and norm maps (npz arrays, png overlays)",
                          description="Export per-image attention and norm maps: arrays in <out>/<stem>.npz, "
                                      "overlays and a contact sheet in <out>/<stem>/, an index in maps.json. "
                                      "With no images: the bundled demo images.")
    add_options(maps, P.IMAGES, P.MODEL, P.MAPS, [P.TTR_SPEC], P.TTR)

    ablate = sub.add_parser("ablate", help="ablate sinks, registers, high-norm tokens, massive activations or register "
                            "neurons and measure what changes",
                            description="Causal ablations (docs/ablate.md): replace what a target writes at chosen "
                                        "blocks (zero, mean over images, mean over tokens of its kind, resample from "
                                        "another image) and measure the change in final features, class-token "
                                        "attention and high-norm tokens against a clean pass; of an LVLM (--questions), "
                                        "in its vision tower, also its answers and POPE scores. Writes results.json, "
                                        "results.md and report.html. With no images: the bundled demo images.")
    add_options(ablate, P.IMAGES, P.MODEL, P.ABLATE, [P.TTR_SPEC], P.TTR)

    defect = sub.add_parser("defect", help="the weight-only defect direction per block (SINDER), without images",
                            description="Linearise every block (attention: LayerScale·proj·V·LN plus identity; MLP: "
                                        "least squares on Gaussian inputs) and write the top left singular vector of "
                                        "the cumulative product after each block: defect.json and defect.npz "
                                        "(docs/defect.md). Cached by the weights' fingerprint, sample count and seed.")
    add_options(defect, P.MODEL, P.DEFECT)

    registers = sub.add_parser("registers", help="register neurons and test-time registers (no training)")
    reg_sub = registers.add_subparsers(dest="registers_command", required=True)
    find = reg_sub.add_parser("find", help="rank MLP neurons by their activation on high-norm tokens",
                              description="Find register neurons (Jiang et al. 2025) and write neurons.json.")
    add_options(find, P.IMAGES, P.MODEL, P.FIND)
    apply = reg_sub.add_parser("apply", help="scan with and without test-time registers and compare",
                               description="Scan the images without and with test-time registers from a neuron "
                                           "spec: DIR/before and DIR/after hold scan.json and report.html, "
                                           "DIR/compare.html shows both side by side.")
    add_options(apply, P.IMAGES, P.MODEL, P.APPLY, P.TTR)

    evaluate = sub.add_parser("eval", help="evaluations: dense prediction, POPE, CHAIR, MME, HallusionBench, "
                                           "Object HalBench, AMBER")
    ev_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    dense = ev_sub.add_parser(
        "dense", help="linear-probe segmentation, LOST object discovery and artifact metrics",
        description="Evaluate a model and its variants (baseline, test-time registers, fine-tuned weights, "
                    "other models) on dense tasks; writes OUT/results.json, results.md and results.html. "
                    "With --format synthetic (the default) no data is needed.")
    add_options(dense, P.MODEL, P.DENSE, P.TTR)
    pope = ev_sub.add_parser("pope", help="POPE: build questions, run an LVLM, score yes/no answers",
                             description="Score --answers FILE, or run --model over POPE questions (built from "
                                         "--annotations, or --questions FILE) about the images in IMAGE_DIR with "
                                         "each --mitigation.")
    add_options(pope, P.POPE_RUN, P.POPE)
    chair = ev_sub.add_parser("chair", help="CHAIR: caption images with an LVLM, score object hallucination",
                              description="Score --generated FILE, or run --model to caption the images of IMAGE_DIR "
                                          "listed in --annotations with each --mitigation.")
    add_options(chair, P.CHAIR_RUN, P.CHAIR)
    for name in BENCHMARK_MODULES:
        bench = get_benchmark(name)
        bench_parser = ev_sub.add_parser(
            name, help=f"{bench.title}: run an LVLM, score offline",
            description=f"Score --answers FILE, or run --model over the {bench.title} items of --data (images in "
                        "IMAGE_DIR, by default the data's folder) with each --mitigation.")
        add_options(bench_parser, P.benchmark_options(name))

    gen = sub.add_parser("generate", help="LVLM generation with a hallucination mitigation",
                         description="Greedy generation with none or a hallucination mitigation (attention edits: "
                                     "VAR, PAI, FastV, VAF, test-time registers in the vision tower (ttr); "
                                     "next-token rules: VCD, M3ID, DAMRO, DoLa; OPERA's beam search), or several "
                                     "joined by + (ttr+var, vcd+pai); the images (files or "
                                     "directories) and their prompts run as one left-padded batch (or batches of "
                                     "--batch-size; resumable with --out; split over torchrun's processes). Prints "
                                     "what each mitigation did per layer and per step, and how its branches ran.")
    add_options(gen, P.IMAGES, P.LVLM_MODEL, P.GENERATE)
    lvlm = sub.add_parser("lvlm", help="LVLM tools")
    lvlm_sub = lvlm.add_subparsers(dest="lvlm_command", required=True)
    cal = lvlm_sub.add_parser("calibrate", help="find the decoder's sink dimensions (for VAR)",
                              description="Rank hidden dimensions by |h / rms(h)| on the first (BOS) token in early "
                                          "decoder layers over a few prompts, one per image; write them to JSON.")
    add_options(cal, P.IMAGES, P.LVLM_MODEL, P.CALIBRATE)

    finetune = sub.add_parser("finetune", help="fine-tune: add registers and train them (posthoc distillation or scratch), "
                              "or repair a model along its defect directions (sinder)",
                              description="Run a fine-tuning recipe (configs/*.yaml); KEY=VALUE overrides any "
                                          "recipe key, e.g. train.steps=100 teacher.kind=ttr. Under torchrun "
                                          "each process trains on its share of every batch (DDP).")
    add_options(finetune, P.FINETUNE)
    sub.add_parser("models", help="list the model spec forms: vision models and LVLMs",
                   description="List every form of --model: vision models (scan, maps, registers, eval dense, "
                               f"finetune) and LVLMs (generate, lvlm calibrate, eval {LVLM_EVALS}, scan --prompt).")
    view = sub.add_parser("view", help="write an interactive viewer (one offline HTML file) of a scan, maps or "
                                       "attention export",
                          description="Write one self-contained HTML file to explore the output of 'vsink maps' "
                                      "(attention rows with --kind full), 'vsink scan' or 'vsink generate "
                                      "--export-attention': pick an image, block and head, click a patch to see its "
                                      "attention row, toggle norms; for LVLMs pick a generated word.")
    add_options(view, P.VIEW)
    return parser


def _cmd_scan(args: argparse.Namespace) -> int:
    from .backbones.lvlm_families import scan_prompt
    from .scan import NothingScanned, scan

    prompt = args.prompt if args.prompt is not None else scan_prompt(args.model)
    if prompt is not None:
        return _scan_lvlm(args, prompt)
    if args.device_map is not None:
        raise VsinkError("--device-map applies to LVLM scans (--prompt); a vision model runs on --device")
    images = _inputs(args)
    backbone = _load_for(args)
    ttr = _ttr(args, args.test_time_registers)
    try:
        with ttr.applied(backbone) if ttr else nullcontext():
            result = scan(backbone, images, batch_size=args.batch_size, img_size=args.img_size,
                          threshold=args.threshold, sink_ratio=args.sink_ratio, progress=not args.no_progress,
                          shard=shard_of(args))
            # the second pass sees the model as the scan did (test-time registers included); under
            # torchrun rank 0 runs it alone
            if args.defect and result is not None:
                from .defect import compare_with_scan, defect_directions

                found = defect_directions(backbone, samples=args.defect_samples, seed=args.defect_seed,
                                          progress=not args.no_progress)
                result.defect = compare_with_scan(backbone, images, result, found, batch_size=args.batch_size,
                                                  progress=not args.no_progress)
    except NothingScanned as e:  # each skipped file was reported as the scan met it
        print(f"vsink: error: {e}", file=sys.stderr)
        return 2
    if result is None:  # another rank of a torchrun scan: rank 0 writes the outputs
        return 0
    paths = result.save(args.out)
    hn = result.high_norm
    print(f"scanned {_scanned(result.images, result.skipped)} with {result.model}")
    print(f"layout: {result.layout.describe()}")
    attention = result.settings["attention"]
    if not attention["rows_sum_to_one"]:
        print(f"attention: {attention['variant']}, whose rows do not sum to 1; shares are reported as computed, "
              "not renormalised")
    said = hn.summary(result.images)
    print(f"high-norm tokens: {said}" if hn.emergence_layer is not None else said)
    for layer in hn.layers:
        print(f"  block {layer.index:>2}: median {layer.median:8.3f}  max {layer.max:8.3f}  "
              f"ratio {layer.ratio:6.2f}{_outlier_note(layer)}")
    entries = count(len(result.sinks), "(token, image, layer) entry", "(token, image, layer) entries")
    print(f"attention sinks: {entries}, strongest first in scan.json")
    dims = sorted({m.dim for m in result.massive})
    print(f"massive activations (>= {result.settings['massive_ratio']:g}x median |activation|): "
          f"{count(len(result.massive), 'entry', 'entries')}" + (f", residual dims {dims}" if dims else ""))
    _print_per_image(result.per_image())
    if result.defect is not None:
        _print_defect_comparison(result.defect)
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _print_defect_comparison(comparison) -> None:
    d = comparison.defect
    print(f"weight-only defect direction ({d.samples} samples, seed {d.seed}{', cached' if d.cached else ''}) "
          f"vs the observed high-norm direction (agree at |cos| >= {comparison.threshold:g}):")
    for i, (c, n) in enumerate(zip(comparison.cosines, comparison.tokens)):
        cos = f"|cos| {c:.3f}" if c is not None else "|cos|   -  "
        print(f"  block {i:>2}: {cos}  over {count(n, 'high-norm token')}: {comparison.verdict(i)}")
    if comparison.disagreeing:
        print(f"the weight-only direction disagrees with the observed one at blocks {comparison.disagreeing}: "
              "the mechanism is not in the linearised weights (docs/defect.md)")


def _cmd_defect(args: argparse.Namespace) -> int:
    from .defect import defect_directions

    backbone = _load_for(args)
    result = defect_directions(backbone, samples=args.samples, seed=args.seed, recompute=args.recompute,
                               progress=not args.no_progress)
    paths = result.save(args.out)
    print(f"weight-only defect directions of {result.model} ({result.samples} samples per block, seed {result.seed}"
          f"{', from the cache' if result.cached else ''}):")
    for block in result.to_json()["blocks"]:
        dims = ", ".join(f"{t['dim']}:{t['value']:+.3f}" for t in block["top_dims"][:3])
        print(f"  block {block['index']:>2}: singular value {block['singular_value']:10.4g}  "
              f"dominance {block['dominance']:7.3f}  largest entries {dims}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


#: images listed one by one in a scan's summary (all are in scan.json's per_image)
SUMMARY_IMAGES = 20


def _print_per_image(entries: list[dict]) -> None:
    print("per image (high-norm tokens at the emergence block; sink tokens over all blocks):")
    for entry in entries[:SUMMARY_IMAGES]:
        top = f", max norm {entry['max_norm']:.4g}" if entry["max_norm"] is not None else ""
        print(f"  {Path(entry['image']).name}: {count(entry['high_norm_tokens'], 'high-norm token')}{top}, "
              f"{count(entry['sink_tokens'], 'sink token')}")
    if len(entries) > SUMMARY_IMAGES:
        print(f"  ... {len(entries) - SUMMARY_IMAGES} more images in scan.json (per_image)")


def _scan_lvlm(args: argparse.Namespace, prompt: str) -> int:
    from .lvlm.scan import scan_lvlm
    from .scan import NothingScanned

    if args.test_time_registers:
        raise VsinkError("--test-time-registers applies to vision scans; for an LVLM use "
                         "'vsink generate --mitigation ttr+...'")
    if args.defect:
        raise VsinkError("--defect applies to vision scans (an LVLM's tower: 'vsink defect --model' on the tower)")
    images = _inputs(args)
    lvlm = load_lvlm_for(args)
    try:
        result = scan_lvlm(lvlm, images, prompt, batch_size=args.batch_size, sink_ratio=args.sink_ratio,
                           progress=not args.no_progress)
    except NothingScanned as e:  # each skipped file was reported as the scan met it
        print(f"vsink: error: {e}", file=sys.stderr)
        return 2
    paths = result.save(args.out)
    print(f"scanned {_scanned(result.images, result.skipped)} with {result.model}, prompt {prompt!r}")
    print(f"layout: {result.layout.describe()}; sink dims {result.sink_dims} ({result.sink_dims_source}), "
          f"tau {result.tau:g}")
    for row in result.layer_summaries():
        dims = [m["dim"] for m in row["massive"]]
        print(f"  layer {row['index']:>2}: BOS share {row['bos_share']:.3f}  image share "
              f"{row['image_attention_share']:.3f}  visual sink tokens {row['visual_sink_count']}"
              + (f"  massive dims {dims}" if dims else ""))
    deepstack = result.deepstack_summary()
    for row in deepstack["layers"] if deepstack else []:
        print(f"  DeepStack after layer {row['layer']}: tower block {row['tower_block']}'s features added to the image "
              f"tokens, norm {row['injected_norm_mean']:.3g} (residual {row['residual_norm_mean']:.3g})")
    link = result.tower_to_llm()
    if link is not None and link["tower_layer"] is not None:
        print(f"vision tower: high-norm tokens from block {link['tower_layer']}: {link['tower_high_norm']}; "
              f"{link['both']} of them are visual sink tokens in the language model")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _scanned(images: Sequence[object], skipped: Sequence[dict]) -> str:
    """"2 images (1 skipped)" for the summaries."""
    return f"{count(len(images), 'image')} ({len(skipped)} skipped)"


def _outlier_note(layer) -> str:
    """How a layer's outliers were found, for the scan summary (empty when there are none)."""
    if not layer.outliers:
        return ""
    parts = [f"{count(layer.outliers, 'outlier')} ({100 * layer.outlier_fraction:.1f}%)"]
    if layer.threshold is not None:
        parts.append(f"pooled threshold {layer.threshold:.3g}")
    if layer.own_gap_images:
        n = layer.own_gap_images
        parts.append(f"{count(n, 'image')} through {'their' if n != 1 else 'its'} own gap")
    return "  " + ", ".join(parts)


def _load_for(args: argparse.Namespace):
    from .backbones import load

    shard = shard_of(args)
    backbone = load(args.model, weights=args.weights, img_size=args.img_size, device=shard.device(args.device),
                    dtype=args.dtype, pretrained=not args.no_pretrained)
    if not shard.main:
        return backbone
    if backbone.synthetic:
        print(f"vsink: model {backbone.spec!r} is SYNTHETIC: {backbone.synthetic}", file=sys.stderr)
    print(f"vsink: {backbone.describe()}", file=sys.stderr)
    return backbone


def _inputs(args: argparse.Namespace):
    """The positional images (files, directories walked, the command's own outputs left out), or the
    bundled demo images."""
    from .data.demo_images import demo_images
    from .images import expand_paths

    return expand_paths(args.images, exclude=_outputs(args)) if args.images else demo_images()


def _outputs(args: argparse.Namespace) -> list[str]:
    """The folders a command writes, never read as its inputs."""
    return [getattr(args, key) for key in ("out", "export_attention") if getattr(args, key, None)]


def _lvlm_sources(args: argparse.Namespace) -> list:
    """The inputs of generate / calibrate: the positional image paths (folders walked), or those of
    the deprecated ``--image``, or the bundled demo images (:class:`~vsink.images.NamedImage` s)."""
    from .data.demo_images import demo_images
    from .images import expand_paths

    if args.images and args.image:
        raise VsinkError("give the images as positional arguments only (--image is the deprecated spelling)")
    paths = args.images or args.image
    return [str(path) for path in expand_paths(paths, exclude=_outputs(args))] if paths else demo_images()


def _lvlm_inputs(args: argparse.Namespace) -> tuple[list, list[dict[str, str]]]:
    """The images of calibrate as :class:`~vsink.images.NamedImage` s (:func:`_lvlm_sources`) and the
    files left out as unreadable (``{"image", "reason"}``, :func:`~vsink.images.load_batch`, as scan
    and generate skip them); every file unreadable is a one-line error."""
    from .images import NamedImage, load_batch

    loaded, names, skipped = load_batch(_lvlm_sources(args))
    if not loaded:
        raise VsinkError(f"no image could be read ({len(skipped)} skipped: "
                         f"{'; '.join(s['reason'] for s in skipped[:5])})")
    return [NamedImage(name, image) for name, image in zip(names, loaded)], skipped


def _generate_inputs(args: argparse.Namespace) -> tuple[list, list[str], list[dict[str, str]]]:
    """The images of generate (:func:`_lvlm_sources`) as :class:`~vsink.images.NamedImage` s, and
    their prompts; the files that cannot be read are left out with their prompts and returned as
    skipped ``{"image", "reason"}`` entries (:func:`~vsink.images.load_batch`, as scan skips them);
    every file unreadable is a one-line error."""
    from .images import NamedImage, load_batch, source_name

    sources = _lvlm_sources(args)
    prompts = list(args.prompt)
    if len(prompts) == 1 and len(sources) > 1:
        prompts *= len(sources)
    if len(prompts) != len(sources):
        raise VsinkError(f"give one --prompt per image (or one for all): {count(len(sources), 'image')}, "
                         f"{count(len(prompts), 'prompt')}")
    loaded, names, skipped = load_batch(sources)
    if not loaded:
        raise VsinkError(f"no image could be read ({len(skipped)} skipped: "
                         f"{'; '.join(s['reason'] for s in skipped[:5])})")
    bad = {s["image"] for s in skipped}
    kept = [p for i, (p, source) in enumerate(zip(prompts, sources)) if source_name(source, i) not in bad]
    return [NamedImage(name, image) for name, image in zip(names, loaded)], kept, skipped


def _ttr(args: argparse.Namespace, path: Optional[str]):
    """The TestTimeRegisters the options ask for, or None (then a --ttr-* flag given says it did nothing)."""
    if not path:
        from .parameters import TTR

        unused = [o.flag or "--" + o.key.replace("_", "-") for o in TTR.values() if getattr(args, o.key) != o.default]
        if unused:
            warnings.warn(f"{', '.join(unused)} did nothing: test-time registers apply only with "
                          "--test-time-registers neurons.json", VsinkWarning, stacklevel=2)
        return None
    from .registers import NeuronSpec, TestTimeRegisters

    return TestTimeRegisters(NeuronSpec.load(path), **_ttr_options(args))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _ablate_lvlm(args: argparse.Namespace) -> int:
    """``vsink ablate --questions``: ablate an LVLM's vision tower, measure its answers (vsink/ablate_lvlm.py)."""
    from .ablate_lvlm import DEFAULTS, ablate_lvlm, answers_markdown
    from .backbones.hf_lvlm import load_lvlm
    from .backbones.registry import resolve_dtype
    from .evaluate.pope import read_questions
    from .evaluate.stats import Bootstrap
    from .export.ablation_report import save_ablation
    from .registers import NeuronSpec

    vision_only = [_flag(k) for k in ("dense", "test_time_registers", "weights", "img_size", "no_pretrained")
                   if getattr(args, k)]
    if vision_only:
        raise VsinkError(f"{', '.join(vision_only)}: vision models only, not LVLM ablations (--questions)")
    if len(args.images) != 1 or not Path(args.images[0]).is_dir():
        raise VsinkError("--questions: give the one folder its questions' images are in (IMAGE_DIR)")
    questions = read_questions(args.questions)
    neurons = NeuronSpec.load(args.neurons) if args.neurons else None
    lvlm = load_lvlm(args.model.removeprefix("hf:"), device=args.device, dtype=resolve_dtype(args.dtype))
    if lvlm.synthetic:
        print(f"vsink: model {lvlm.spec!r} is SYNTHETIC: {lvlm.synthetic_note}", file=sys.stderr)
    options = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS.items()}
    result = ablate_lvlm(lvlm, questions, args.images[0], targets=args.targets, ablations=args.ablations,
                         layers=args.layers, neurons=neurons, seed=args.seed, batch_size=args.batch_size,
                         threshold=args.threshold, sink_ratio=args.sink_ratio, massive_ratio=args.massive_ratio,
                         stats=Bootstrap.from_args(args), progress=not args.no_progress, **options)
    paths = save_ablation(result, args.out)
    print(f"ablated the vision tower of {lvlm.spec} on {_scanned(result.images, result.skipped)}; "
          f"{result.answers.questions} question(s) answered clean and under each ablation")
    for s in result.selections:
        print(f"  {s.describe()}")
    print(answers_markdown(result.answers), end="")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _ttr_options(args: argparse.Namespace) -> dict:
    """The TestTimeRegisters keyword options of the --ttr-* flags."""
    return dict(registers=args.ttr_registers, scale=args.ttr_scale, mode=args.ttr_mode, shift=args.ttr_shift,
                zero_trained_registers=args.ttr_zero_trained_registers)


def _cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import ablate
    from .ablate_lvlm import LVLM_ABLATE
    from .backbones.lvlm_families import named_lvlms
    from .evaluate.stats import Bootstrap
    from .export.ablation_report import attention_note, save_ablation
    from .registers import NeuronSpec

    if "neurons" in args.targets and args.neurons is None:
        raise VsinkError("--targets neurons needs --neurons neurons.json (from 'vsink registers find')")
    if args.questions is not None:
        return _ablate_lvlm(args)
    given = [_flag(k) for k in LVLM_ABLATE if getattr(args, k) is not None]
    if given:
        raise VsinkError(f"{', '.join(given)}: LVLM ablations only (--questions with an LVLM --model)")
    if args.model in named_lvlms():
        raise VsinkError(f"--model {args.model} is an LVLM: give --questions (POPE questions JSONL, e.g. from 'vsink "
                         f"eval pope --build-only') and the folder of their images, or ablate its tower alone with "
                         f"--model {args.model}#vision_tower")
    images = _inputs(args)
    backbone = _load_for(args)
    neurons = NeuronSpec.load(args.neurons) if args.neurons else None
    ttr = _ttr(args, args.test_time_registers)
    dense = None
    if args.dense:
        from .evaluate.open import open_dataset

        size = args.img_size or backbone.img_size[0]
        dense = tuple(open_dataset("synthetic", None, split, synthetic_images=args.dense_images, synthetic_size=size,
                                   seed=args.seed) for split in ("val", "train"))
    with ttr.applied(backbone) if ttr else nullcontext():
        result = ablate(backbone, images, targets=args.targets, ablations=args.ablations, layers=args.layers,
                        neurons=neurons, seed=args.seed, batch_size=args.batch_size, img_size=args.img_size,
                        threshold=args.threshold, sink_ratio=args.sink_ratio, massive_ratio=args.massive_ratio,
                        stats=Bootstrap.from_args(args), dense=dense, progress=not args.no_progress)
    paths = save_ablation(result, args.out)
    print(f"ablated {_scanned(result.images, result.skipped)} with {result.model}; layout {result.layout.describe()}")
    if attention_note(result):
        print(attention_note(result))
    for s in result.selections:
        print(f"  {s.describe()}")
    print(f"{'target':<10} {'block':>5} {'ablation':<12} {'cos cls':>8} {'cos patches':>11} {'cls-attn TV':>11} "
          f"{'high-norm':>13} {'max/median':>15}")
    for r in result.rows:
        cos_cls = f"{r.cos_cls:.4f}" if r.cos_cls is not None else "-"
        tv = f"{r.attn_tv:.4f}" if r.attn_tv is not None else "-"
        print(f"{r.target:<10} {r.layer:>5} {r.ablation:<12} {cos_cls:>8} {r.cos_patches:>11.4f} {tv:>11} "
              f"{f'{r.high_norm_before} -> {r.high_norm_after}':>13} "
              f"{f'{r.max_ratio_before:.2f} -> {r.max_ratio_after:.2f}':>15}")
    if result.dense is not None:
        print(result.dense.to_markdown())
    for path in paths.values():
        print(f"wrote {path}")
    return 0


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
                                     img_size=args.img_size, progress=not args.no_progress, shard=shard_of(args))
        if spec is None:  # another rank under torchrun: rank 0 writes the spec
            return 0
        plot = _write_neuron_plot(spec, Path(args.out))
        spec.save(args.out)
        st = spec.settings
        print(f"register neurons of {spec.model}: outliers at block {st['detection_layer']}, scored blocks "
              f"0-{st['highest_layer']}, {st['images_with_outliers']}/{st['images']} images with outliers")
        _print_ranking(st)
        print(f"wrote {args.out} and {plot} (scores and the cut)")
        return 0
    from .export.compare import MAX_IMAGES, pca_layers, render_scan_comparison
    from .export.pca import patch_features
    from .io import write_text
    from .manifest import weights_fingerprint
    from .outputs import OutputSet

    ttr = _ttr(args, args.neurons)
    out = Path(args.out)
    kwargs = dict(batch_size=args.batch_size, img_size=args.img_size, progress=not args.no_progress)
    determining = {"model": backbone.spec, "weights": weights_fingerprint(backbone.model),
                   "images": [str(i) for i in images], "neurons": str(args.neurons), "ttr": _ttr_options(args),
                   "batch_size": args.batch_size, "img_size": args.img_size}
    with OutputSet(out, "vsink registers apply", {"determining": determining}, name="--out") as stage:
        before = scan(backbone, images, **kwargs)
        shown, blocks = before.thumbnails[:MAX_IMAGES], pca_layers(before)
        pca = {"before": patch_features(backbone, shown, blocks, before.input_size)}
        with ttr.applied(backbone):
            after = scan(backbone, images, **kwargs)
            pca["after"] = patch_features(backbone, shown, blocks, before.input_size)
        page = render_scan_comparison({"before": before, "after": after}, f"vsink registers apply — {backbone.spec}",
                                      pca, shown)
        before.save(stage / "before")
        after.save(stage / "after")
        write_text(stage / "compare.html", page)
    compare = out / "compare.html"
    for label, r in (("before", before), ("after", after)):
        hn = r.high_norm
        regs = [a["register_received"] for a in r.attention]
        print(f"{label:>6}: {hn.summary()}, max register share {max(regs):.3f}, "
              f"max patch-norm ratio {max(l.ratio for l in hn.layers):.2f}")
    print(f"wrote {out / 'before'}, {out / 'after'} and {compare} (side by side)")
    return 0


def _print_ranking(settings: dict, below: int = 5) -> None:
    """The kept neurons, the cut with its rule and gap, and the next ``below`` scores."""
    cut, ranking = settings["cut"], settings["ranking"]
    for i, n in enumerate(ranking[:cut["kept"] + below]):
        if i == cut["kept"]:
            how = {"score gap": f"at the score gap, {cut['gap']:.4g} wide; the widest is {cut['widest_gap']:.4g}",
                   "no clear gap": f"no clear score gap: the {cut['kept']} best",
                   "top_k": f"--top-k {cut['kept']}; the score gap would keep {cut['count']}"}[cut["rule"]]
            print(f"  ---- cut: {cut['kept']} kept ({how}); not kept:")
        print(f"  block {n['layer']:>2} neuron {n['neuron']:>5}  score {n['score']:.4g}")


def _write_neuron_plot(spec, out: Path) -> Path:
    """``OUT-scores.png`` beside ``OUT``: the ranked scores with the cut marked."""
    from .export.neuron_figures import neuron_scores_png
    from .io import atomic_path

    cut = spec.settings["cut"]
    path = out.with_name(f"{out.stem}-scores.png")
    png = neuron_scores_png([n["score"] for n in spec.settings["ranking"]], cut["kept"], cut["rule"],
                            f"register-neuron scores of {spec.model} (block {spec.settings['detection_layer']} "
                            "outliers)")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


def _cmd_maps(args: argparse.Namespace) -> int:
    from .maps import default_kinds, export_maps

    images = _inputs(args)
    backbone = _load_for(args)
    kinds, left_out = ([k for group in args.kind for k in group], []) if args.kind else default_kinds(backbone)
    ttr = _ttr(args, args.test_time_registers)
    with ttr.applied(backbone) if ttr else nullcontext():
        result = export_maps(backbone, images, args.out, kinds=kinds, layers=args.layers, heads=args.heads,
                             formats=args.format, fusion=args.fusion,
                             discard_ratio=args.discard_ratio, img_size=args.img_size,
                             keep_aspect=args.keep_aspect, progress=not args.no_progress, shard=shard_of(args))
    if result is None:  # another rank under torchrun: rank 0 writes maps.json and lists the images
        return 0
    print(f"exported maps for {_scanned(result.images, result.skipped)} to {args.out}")
    print(f"  kinds: {', '.join(result.settings['kinds'])}" + (f"; left out {', '.join(left_out)}" if left_out else ""))
    for m in result.images:
        print(f"  {m.name}: {count(len(m.files), 'file')}, {m.layout.describe()}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command in ("pope", "chair", *BENCHMARK_MODULES):
        from .cli_hallucination import run

        return run(args)
    from .evaluate.open import DEFAULT_SPLITS, open_dataset
    from .evaluate.dense import LostSettings, evaluate_dense, supported_tasks
    from .evaluate.stats import Bootstrap
    from .evaluate.segmentation import ProbeSettings
    from .evaluate.variants import parse_variants

    normalize = {"no": [False], "yes": [True], "both": [False, True]}[args.lost_normalize]
    lost = LostSettings(layers=args.lost_layers, kinds=args.lost_kinds, biases=args.lost_biases, normalize=normalize,
                        k=args.lost_k, ties=args.lost_ties, iou=args.lost_iou)
    variants = parse_variants(args.variant, _ttr_options(args))
    if args.format == "synthetic" and args.data:
        raise VsinkError("--data is not used with --format synthetic (the default); pass --format voc|ade|coco|folder")
    coco_images = image_dir_arg(args, "coco_images")
    if coco_images and args.format != "coco":
        raise VsinkError(f"an image directory is given with --format coco only; {args.format} reads its images "
                         + ("from --data" if args.format != "synthetic" else "nowhere (they are generated)"))
    common = dict(images=coco_images, image_set=args.image_set, synthetic_images=args.synthetic_images,
                  seed=args.seed)
    if args.format == "synthetic":
        common["synthetic_size"] = args.img_size or 224
    eval_set = open_dataset(args.format, args.data, args.split, **common).limit(args.limit)
    tasks = args.tasks or supported_tasks(eval_set)
    train_set = None
    if "linear-seg" in tasks:
        train_split = args.train_split or DEFAULT_SPLITS.get(args.format, (None, None))[0]
        train_set = open_dataset(args.format, args.data, train_split, **common).limit(args.limit)
    shard = shard_of(args)
    if shard.main:
        print(f"vsink: evaluating on {eval_set.describe()}", file=sys.stderr)
    backbone = _load_for(args)
    result = evaluate_dense(
        backbone, eval_set, train_set=train_set, tasks=tasks, variants=variants, seg_layer=args.seg_layer,
        lost_settings=lost, num_classes=args.num_classes, batch_size=args.batch_size, img_size=args.img_size,
        probe_settings=ProbeSettings(epochs=args.epochs, lr=args.lr, batchnorm=not args.no_batchnorm, seed=args.seed),
        load_kwargs=dict(device=shard.device(args.device), dtype=args.dtype, pretrained=not args.no_pretrained),
        progress=not args.no_progress, bootstrap=Bootstrap.from_args(args), shard=shard)
    if result is None:  # another rank under torchrun: rank 0 writes the results
        return 0
    paths = result.save(args.out)
    print(result.to_markdown())
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .lvlm import MitigationWarning
    from .lvlm.generate_run import run_generate
    from .lvlm.sinks import Calibration
    from .mitigate import calibrated_settings, make_mitigations, mitigation_names

    shard = shard_of(args)
    named, prompts, skipped = _generate_inputs(args)
    if shard.main:
        for entry in skipped:
            print(f"vsink: skipped {entry['reason']}", file=sys.stderr)
    if args.out and args.export_attention and Path(args.out).resolve() == Path(args.export_attention).resolve():
        raise VsinkError(f"--out and --export-attention name one folder ({args.out}); give two")
    settings = parse_settings(args.set)
    if args.sinks:
        settings = calibrated_settings(mitigation_names(args.mitigation), settings, Calibration.load(args.sinks))
    mitigations = make_mitigations(args.mitigation, settings, args.protocol)  # fail before loading the model
    label = "+".join(m.name for m in mitigations) or "none"
    resolved = (mitigations[0].settings_dict() if len(mitigations) == 1 else
                {m.name: m.settings_dict() for m in mitigations} or None)  # as generate records them
    images = [item.image for item in named]
    batches = -(-len(named) // (args.batch_size or len(named)))
    if shard.main and batches < shard.world:
        warnings.warn(f"{count(len(named), 'item')} in {count(batches, 'batch', 'batches')} for {shard.world} "
                      f"processes: {shard.world - batches} of them have nothing to do (give a smaller --batch-size)",
                      VsinkWarning, stacklevel=2)
    lvlm = load_lvlm_for(args)
    determining = None
    if args.out:
        from .cli_common import setting_files
        from .lvlm.generate_run import image_fingerprint
        from .manifest import content_hash, weights_fingerprint

        determining = {"model": args.model, "weights": weights_fingerprint(lvlm.model), "mitigation": label,
                       "settings": settings, "resolved_settings": resolved, "setting_files": setting_files(settings),
                       "protocol": args.protocol, "max_new_tokens": args.max_new_tokens, "use_cache": not args.no_cache,
                       "capture_attention": bool(args.export_attention), "batch_size": args.batch_size,
                       "items": content_hash([[item.name, p] for item, p in zip(named, prompts)]),
                       "image_pixels": image_fingerprint(images), "vsink_version": __version__}
        if skipped:  # a resume skips the same files; a file mended since is another run
            determining["skipped"] = skipped
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore", MitigationWarning)  # reported below, one line each
        run = run_generate(lvlm, images, [item.name for item in named], prompts, mitigation=args.mitigation,
                           settings=settings, protocol=args.protocol, max_new_tokens=args.max_new_tokens,
                           use_cache=not args.no_cache, batch_size=args.batch_size,
                           out=Path(args.out) if args.out else None, determining=determining,
                           export_attention=Path(args.export_attention) if args.export_attention else None,
                           export_settings=resolved, progress=not args.no_progress, shard=shard)
    if run is None:  # another rank under torchrun: rank 0 reports and writes
        return 0
    print(f"vsink: mitigation {label}, protocol {args.protocol}, settings {json.dumps(resolved)}", file=sys.stderr)
    if run.resumed:
        print(f"vsink: {count(run.resumed, 'item')} of {len(named)} already in {Path(args.out) / 'generated.jsonl'}"
              f"{'' if run.batches else '; nothing generated'}", file=sys.stderr)
    for batch in run.batches:
        items = f"item {batch.start}" if batch.stop - batch.start == 1 else f"items {batch.start}-{batch.stop - 1}"
        head = f"batch {batch.number + 1}/{run.count} ({items}): " if run.count > 1 else ""
        _print_report(batch.report, batch.warnings, head)
    for row in run.rows:
        print(f"[{row['image']}] {row['text']}")
    if skipped:
        print(f"generated {_scanned(run.rows, skipped)}")
    if args.out:
        print(f"wrote {Path(args.out) / 'generated.jsonl'}")
    if args.export_attention:
        print(f"wrote {count(len(run.exported), 'file')} to {args.export_attention}")
    return 0


def _print_report(report: list[dict], notes: list[str], head: str) -> None:
    """What each mitigation did in one generate call (per layer, per step, its branches: their
    edits, the forwards they ran on their own and those that rode in the main pass's), and its
    warnings, one line each on stderr; ``head`` starts each line's text (the batch, when several)."""
    for entry in report:
        layers = ", ".join(f"{row['layer']}: " + " ".join(f"{k}={v:g}" for k, v in row.items() if k != "layer")
                           for row in entry["layers"]) or "nothing"
        if entry["layers"] or not entry.get("steps"):
            print(f"vsink: {head}{entry['mitigation']} per layer: {layers}", file=sys.stderr)
        if entry.get("steps"):
            totals: dict[str, float] = {}
            for row in entry["steps"]:
                for k, v in row.items():
                    if k != "step":
                        totals[k] = totals.get(k, 0) + v
            summary = " ".join(f"{k}={v:g}" for k, v in totals.items())
            print(f"vsink: {head}{entry['mitigation']} over {count(len(entry['steps']), 'step')}: {summary}",
                  file=sys.stderr)
        for branch in entry.get("branches", []):
            print(f"vsink: {head}{entry['mitigation']} branch {branch['name']} ({branch['kind']}): edits "
                  f"{', '.join(branch['edits']) or 'none'}", file=sys.stderr)
        if "branch_passes" in entry:  # how the branches ran: in forwards of their own, or in the main pass's
            stacked = entry.get("stacked_with_main") or []
            print(f"vsink: {head}{entry['mitigation']} branch forwards of their own: {entry['branch_passes']}"
                  f"{'; stacked with the main pass: ' + ', '.join(stacked) if stacked else ''}", file=sys.stderr)
    for note in notes:
        print(f"vsink: warning: {head}{note}", file=sys.stderr)


def _cmd_lvlm(args: argparse.Namespace) -> int:
    from .lvlm.sinks import calibrate

    named, skipped = _lvlm_inputs(args)
    for entry in skipped:
        print(f"vsink: skipped {entry['reason']}", file=sys.stderr)
    images = [item.image for item in named]
    lvlm = load_lvlm_for(args)
    batches = [lvlm.prepare([im], [args.prompt]) for im in images]
    cal = calibrate(lvlm, batches, num_dims=args.num_dims, progress=not args.no_progress)
    cal.save(args.out)
    left_out = f", {len(skipped)} unreadable image(s) skipped" if skipped else ""
    print(f"sink dimensions of {lvlm.spec}: {cal.sink_dims} (layers {cal.layers}, {count(len(images), 'prompt')}"
          f"{left_out})")
    print(f"wrote {args.out}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .train import load_config, run_finetune

    cfg = load_config(args.config, args.overrides)
    if args.compare_attention:
        from .train.compare_attention import comparison_table, compare_attention

        if args.resume:
            raise VsinkError("--compare-attention starts fresh runs; --resume each OUT/<run> on its own")
        result = compare_attention(cfg, progress=not args.no_progress)
        print(comparison_table(result["runs"]), end="")
        print(f"wrote {cfg.out}/compare.json, {cfg.out}/compare.md and one run folder per row")
        return 0
    summary = run_finetune(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = summary.get("final_eval", {})
        print(f"{cfg.recipe}: {count(summary['steps_done'], 'step')}, {summary['images_per_s'] or 0:.1f} images/s, "
              f"world size {summary['world_size']}")
        if summary.get("stopped_early"):
            print(f"  stopped early at step {summary['steps_done']} of {summary['steps']}: {summary['stopped_early']}")
        for k, v in ev.items():
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
        print(f"wrote {summary['model']} (load with vsink.load), {cfg.out}/metrics.jsonl, {cfg.out}/summary.json, "
              f"{cfg.out}/report.html (training curves, both models side by side)")
    return 0


#: the ``vsink eval`` subcommands that run an LVLM
LVLM_EVALS = "|".join(("pope", "chair", *BENCHMARK_MODULES))


def _cmd_models(args: argparse.Namespace) -> int:
    from .backbones import spec_forms
    from .backbones.lvlm_families import lvlm_spec_forms

    forms = spec_forms().partition("\n")[2]  # below its "supported model specs:" heading
    print(f"vision models, for vsink scan, maps, registers, eval dense and finetune (model.spec):\n{forms}\n")
    print(lvlm_spec_forms(f"vsink generate, lvlm calibrate, eval {LVLM_EVALS}, scan --prompt and ablate "
                          "--questions"))
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .export.viewer import LARGE_BYTES, write_viewer

    path = write_viewer(args.directory, args.out, max_images=args.max_images, layers=args.layers,
                        precision=args.precision)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB; open it in a browser, no server needed)")
    if size > LARGE_BYTES:
        print("vsink: the viewer is large; fewer --max-images or --layers, or --precision float16, make it smaller",
              file=sys.stderr)
    return 0


def _show_warning(message: Union[Warning, str], category: type[Warning], filename: str, lineno: int,
                  file: Optional[TextIO] = None, line: Optional[str] = None) -> None:
    """``warnings.showwarning`` for the command line: one ``vsink: warning: ...`` line, no source
    line (another library's warning names its category)."""
    text = " ".join(str(message).split())
    if not issubclass(category, VsinkWarning):
        text = f"{category.__name__}: {text}"
    print(f"vsink: warning: {text}", file=file or sys.stderr)


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse; arguments no parser knows are refused naming the (sub)command they were given to."""
    args, extras = parser.parse_known_args(argv)
    if args.command == "finetune":  # KEY=VALUE overrides may stand on both sides of a flag (--resume)
        args.overrides += [e for e in extras if re.match(r"[\w.]+=", e)]
        extras = [e for e in extras if not re.match(r"[\w.]+=", e)]
    if extras:
        words = [getattr(args, key, None) for key in ("command", "registers_command", "eval_command", "lvlm_command")]
        prog = " ".join(["vsink", *(w for w in words if w)])
        hint = ("; images are positional arguments (files or directories)"
                if any(e.split("=")[0] in ("--image", "--images") for e in extras) else "")
        raise UsageError(f"{prog}: unrecognized arguments: {' '.join(extras)}{hint} (see '{prog} --help')")
    return args


#: the commands that split their work over the processes of ``torchrun`` (docs/scale.md); finetune
#: runs its own data-parallel training
SHARDED = ("scan", "maps", "generate", "eval", "registers find")


def _join(args: argparse.Namespace):
    """This process's :class:`vsink.shard.Shard` under ``torchrun`` (joining the process group), or
    one process alone; a command that does not split its work is refused under torchrun."""
    from .shard import Shard, from_env, join

    shard = from_env()
    if shard.alone or args.command == "finetune":
        return Shard()
    name = " ".join(w for w in (args.command, getattr(args, "registers_command", None),
                                getattr(args, "lvlm_command", None)) if w)
    lvlm_scan = args.command == "scan" and (args.prompt is not None or args.model == "demo-llava")
    if name not in SHARDED and args.command not in SHARDED or lvlm_scan:
        raise VsinkError(f"vsink {name}{' --prompt' if lvlm_scan else ''} does not split its work over torchrun's "
                         f"processes (WORLD_SIZE={shard.world}); run it as one process. Under torchrun: "
                         "scan, maps, generate, registers find, eval pope|chair|dense, finetune (docs/scale.md)")
    return join()


def main(argv: Optional[Sequence[str]] = None) -> int:
    handlers = {"ablate": _cmd_ablate, "defect": _cmd_defect, "scan": _cmd_scan, "maps": _cmd_maps, "registers": _cmd_registers, "eval": _cmd_eval,
                "finetune": _cmd_finetune, "generate": _cmd_generate, "lvlm": _cmd_lvlm, "models": _cmd_models,
                "view": _cmd_view}
    from .outputs import ignore_file_size_signal, space_error
    from .shard import OtherRankFailed, leave

    ignore_file_size_signal()  # past ``ulimit -f`` a write fails with EFBIG (one line below) instead of killing
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = _parse(build_parser(), argv)
            args.shard = _join(args)
            try:
                return handlers[args.command](args)
            finally:
                leave()
    except OtherRankFailed:  # rank 0 has said why
        return 2
    except VsinkError as e:
        print(f"vsink: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        full = space_error(e)
        if full is None:
            raise
        print(f"vsink: error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vsink: interrupted; nothing was left half-written (resumable runs keep their finished items)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
