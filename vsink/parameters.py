"""Declared parameters of the ``vsink`` commands: every flag's kind (type and range), default and
meaning. :mod:`vsink.cli` builds its parsers from these declarations (so a value is checked as
the flag is read, before any work starts, and ``--help`` shows what is allowed); the library
functions behind the commands check their arguments against the same declarations; and
docs/options.md tabulates them (:mod:`vsink.option_docs`).

Limits that depend on the model (a block index within its depth, a number of sink dimensions
within its hidden size) are checked by the library once the model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .ablate import ABLATE as ABLATE_ARGUMENTS
from .ablate_lvlm import LVLM_ABLATE
from .backbones.plugins import PluginError
from .backbones.registry import DTYPES
from .defect import DEFECT as DEFECT_ARGUMENTS
from .errors import VsinkError
from .evaluate.chair import VOCABULARIES
from .evaluate.datasets import FORMATS
from .evaluate.dense import LOST, TASKS
from .backbones.device_map import STRATEGIES
from .evaluate.hallucination import CHAIR_PROMPT, POPE_PROMPT
from .evaluate.pope import PARSERS, SPLITS
from .evaluate.segmentation import PROBE
from .evaluate.stats import STATS
from .mitigate import PROTOCOLS, mitigation_names, mitigation_registry
from .maps import DEFAULT_KINDS, KINDS
from .options import (BATCH, DEVICE, NO_PROGRESS, SEED, THRESHOLD, Assignment, Bool, Choice, Float, InputPath, Int,
                      Invalid, Kind, ListOf, Option, OutputDir, OutputFile, Template, Text, declare)
from .registers.neurons import FIND as FIND_ARGUMENTS
from .registers.test_time import TTR as TTR_SETTINGS
from .rollout import FUSIONS
from .scan import SCAN as SCAN_ARGUMENTS



@dataclass(frozen=True)
class MitigationSpec(Kind):
    """``none`` or registered mitigations joined by ``+`` (``ttr+var``), plugins' included (the
    registry is consulted when a value is checked or described, not when this module is imported)."""

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid()
        if value.count("+") and len({n.strip() for n in value.split("+")}) <= value.count("+"):
            raise Invalid("it names one mitigation twice")
        try:
            mitigation_names(value)
        except PluginError:
            raise
        except VsinkError:
            raise Invalid() from None
        return value

    def describe(self) -> str:
        return "none or a '+'-joined combination of " + ", ".join(sorted(mitigation_registry()))


#: ``none`` or mitigations joined by ``+`` (``ttr+var``): run together in one call
MITIGATION = MitigationSpec()
SIZE = Int(1, 16384)
PROMPT_TEXT = Text(r"(?s).*\S.*", "a non-empty prompt")
#: the same --device and --dtype for vision models and LVLMs
DEVICE_OPTION = Option("device", DEVICE, "cpu", "device to run on (auto: cuda if available, else cpu)")
#: an LVLM's modules across GPUs, CPU and disk (accelerate), in one process
DEVICE_MAP = declare(
    Option("device_map", Text(r"\S.*", f"{', '.join(STRATEGIES)} or a JSON file"), None,
           "LVLMs: place the model's modules across GPUs, CPU and disk with accelerate (pip install 'vsink[scale]') "
           "instead of moving it whole to --device; a JSON file maps module names to a GPU index, cpu or disk "
           "(docs/scale.md)", nullable=True, metavar="MAP"),
    Option("offload_folder", OutputDir(), None, "with --device-map: where the modules it places on disk are "
           "written", nullable=True),
)
DTYPE_OPTION = Option("dtype", Choice(tuple(DTYPES)), None, "dtype of the weights", nullable=True,
                      default_text="as stored: a Hugging Face checkpoint's own dtype; float32 for timm, open_clip and "
                                   "the demo models")

IMAGES = declare(Option("images", InputPath("file or directory"), [], "image files or directories (directories "
                        "are searched recursively)", default_text="the bundled demo images", positional=True,
                        repeat=True))
#: what replaces a deprecated --image / --images flag
POSITIONAL_IMAGES = "give image files or directories as positional arguments"


def image_dir(meaning: str, default_text: str, old_key: str) -> dict[str, Option]:
    """A positional image directory and the deprecated ``--images DIR`` flag it replaces (stored
    under ``old_key``)."""
    return declare(
        Option("images", InputPath("directory"), None, meaning, nullable=True, positional=True, metavar="IMAGE_DIR",
               default_text=default_text),
        Option(old_key, InputPath("directory"), None, meaning, nullable=True, flag="--images",
               default_text=default_text, deprecated="give IMAGE_DIR as a positional argument"),
    )


MODEL = declare(
    NO_PROGRESS,
    Option("model", Text(r"\S.*", "a model spec"), "demo", "model spec; see 'vsink models'"),
    Option("weights", InputPath(), None, "checkpoint to load (.safetensors or a state dict)", nullable=True),
    Option("img_size", SIZE, None, "square input size", nullable=True, default_text="the model's"),
    DEVICE_OPTION,
    DTYPE_OPTION,
    Option("no_pretrained", Bool(), False, "build timm models with random weights (testing without network)"),
)

TTR_SPEC = Option("test_time_registers", InputPath(), None, "apply test-time registers from a 'vsink registers "
                  "find' spec (neurons.json)", nullable=True)
#: the --ttr-* flags: TestTimeRegisters' settings
TTR = declare(*TTR_SETTINGS.values())
SCAN = declare(
    *SCAN_ARGUMENTS.values(),
    Option("out", OutputDir(), "vsink-out", "output directory (scan.json, report.html, trace.npz)"),
    Option("prompt", PROMPT_TEXT, None, "scan an LVLM (demo-llava, hf:llava-hf/..., "
           "DIR): its language model's sinks and its vision tower, each image asked with this prompt", nullable=True,
           default_text="a vision scan; 'describe the image' for demo-llava"),
    Option("trust_remote_code", Bool(), False, "LVLM scans: let transformers run code shipped with the model"),
    Option("defect", Bool(), False, "also compute the weight-only defect direction (SINDER; cached) and report per "
           "block its |cos| with the observed high-norm direction (a second pass over the images)"),
    replace(DEFECT_ARGUMENTS["samples"], key="defect_samples"),
    replace(DEFECT_ARGUMENTS["seed"], key="defect_seed", help="seed of the defect direction's Gaussian samples"),
    *[replace(o, help="LVLM scans: " + o.help.removeprefix("LVLMs: ")) for o in DEVICE_MAP.values()],
)

DEFECT = declare(
    *DEFECT_ARGUMENTS.values(),
    Option("out", OutputDir(), "vsink-defect", "output directory (defect.json, defect.npz)"),
)

MAPS = declare(
    Option("kind", ListOf(Choice(KINDS), nonempty=True), None, "map kinds (repeat or comma-separate)",
           repeat=True, default_text=",".join(DEFAULT_KINDS) + " (those the model has: cls needs a class token, pool an "
           "attention-pooling head)"),
    Option("layers", Text(r"\s*(all|-?\d+(\s*,\s*-?\d+)*)\s*,?\s*", "all or a comma list of block indices "
           "(negative from the end)"), "all", "blocks"),
    Option("heads", Text(r"\s*(mean|all|-?\d+(\s*,\s*-?\d+)*)\s*,?\s*", "mean, all or a comma list of head "
           "indices"), "mean", "heads of the cls and received maps"),
    Option("format", ListOf(Choice(("png", "npz")), nonempty=True, distinct=True), ["png", "npz"], "file formats"),
    Option("fusion", Choice(FUSIONS), "mean", "rollout head fusion"),
    Option("discard_ratio", Float(0, 1, max_open=True), 0.0,
           "rollout: zero this fraction of the lowest fused attention entries"),
    Option("keep_aspect", Bool(), False, "dynamic-size models: keep each image's aspect ratio (longer side = img size)"),
    Option("out", OutputDir(), "vsink-maps", "output directory (<stem>.npz, <stem>/*.png, maps.json)"),
)

ABLATE = declare(
    *ABLATE_ARGUMENTS.values(),
    THRESHOLD,
    *STATS.values(),
    Option("dense", Bool(), False, "also measure linear-probe mIoU, LOST CorLoc and the artifact metrics of the clean "
           "and each ablated model on synthetic dense images (targets chosen again on each dense image, "
           "replacements from their clean pass; docs/ablate.md)"),
    Option("dense_images", Int(2, 100_000), 32, "--dense: synthetic images per split (train and val)"),
    Option("questions", InputPath(), None, "LVLMs (--model demo-llava, demo-halluc, hf:REPO): POPE questions JSONL "
           "('vsink eval pope --build-only'), their images in the one IMAGE_DIR given; the vision tower is ablated "
           "and the answers, yes/no flips and POPE scores measured against the clean run", nullable=True),
    *LVLM_ABLATE.values(),
    Option("out", OutputDir(), "vsink-ablate", "output directory (results.json, results.md, report.html)"),
)

FIND = declare(
    Option("out", OutputFile(), "neurons.json", "output spec"),
    *FIND_ARGUMENTS.values(),
)

APPLY = declare(
    Option("neurons", InputPath(), None, "neurons.json from 'vsink registers find'", required=True),
    Option("out", OutputDir(), "vsink-registers", "output directory (before/ and after/)"),
    BATCH,
)

DENSE = declare(
    *image_dir("coco: the image directory", "next to the JSON", "coco_images").values(),
    Option("data", InputPath("file or directory"), None, "dataset root (voc, ade, folder) or instances JSON (coco)",
           nullable=True),
    Option("format", Choice(FORMATS), "synthetic", "dataset format"),
    Option("split", Text(r"(?!\.\.?$)[\w.-]+", "a split name (letters, digits, _ . -)"), None, "evaluation split",
           nullable=True, default_text="val / validation"),
    Option("train_split", Text(r"(?!\.\.?$)[\w.-]+", "a split name (letters, digits, _ . -)"), None,
           "split the linear head trains on", nullable=True, default_text="train / training"),
    Option("image_set", Choice(("auto", "segmentation", "main")), "auto", "voc: image set"),
    Option("tasks", ListOf(Choice(TASKS), nonempty=True, distinct=True), None, "tasks", nullable=True,
           default_text="all the data allows"),
    Option("variant", Text(r"\s*\S.*", "baseline or NAME=VALUE"), None, "baseline, NAME=neurons.json (test-time "
           "registers), NAME=weights.safetensors, NAME=model:SPEC (baseline is added first); the --ttr-* options "
           "apply to every test-time-register variant", repeat=True, default_text="baseline"),
    Option("limit", Int(1), None, "use the first N images of each split", nullable=True, default_text="all"),
    PROBE["batch_size"],
    Option("seg_layer", Int(), -1, "block for linear-seg features (negative from the end)"),
    Option("num_classes", Int(1, 255), None, "classes in the masks", nullable=True,
           default_text="the dataset's or inferred"),
    *(PROBE[key] for key in ("epochs", "lr", "no_batchnorm", "seed")),
    *LOST.values(),
    Option("synthetic_images", Int(1, 100_000), 32, "synthetic: images per split"),
    *STATS.values(),
    Option("out", OutputDir(), "vsink-eval", "output directory (results.json, results.md, results.html)"),
)

LVLM_MODEL = declare(
    Option("model", Text(r"\S.*", "an LVLM spec"), None, "LVLM spec: demo-llava, hf:REPO or a local directory "
           "of a supported family; see 'vsink models'", required=True),
    DEVICE_OPTION,
    DTYPE_OPTION,
    Option("trust_remote_code", Bool(), False, "let transformers run code shipped with the model"),
    *DEVICE_MAP.values(),
    NO_PROGRESS,
)
PROTOCOL = Option("protocol", Choice(PROTOCOLS), "paper", "paper: the mitigation as its paper describes it; "
                  "official: as the authors' released scripts run it, with their defaults (docs/lvlm.md, Protocols)")
SINKS = Option("sinks", InputPath(), None, "sink calibration JSON from 'vsink lvlm calibrate' (VAR's sink_dims)",
               nullable=True)

GENERATE = declare(
    Option("image", InputPath(), None, "image file (repeat for a batch)", repeat=True, deprecated=POSITIONAL_IMAGES),
    Option("prompt", PROMPT_TEXT, None, "prompt text (one per image, or one for all)", repeat=True, required=True),
    Option("mitigation", MITIGATION, "none", "hallucination mitigation, or several joined by + (ttr+var)"),
    Option("set", Assignment(), [], "mitigation setting, e.g. p=0.6, alpha=0.2, gamma=1.1, k=2, ratio=0.5, "
           "sink_dims=[1415,2533] (see docs/options.md)", repeat=True, default_text="none"),
    SINKS,
    PROTOCOL,
    Option("max_new_tokens", Int(1, 1_000_000), 64, "tokens to generate"),
    Option("no_cache", Bool(), False, "recompute the whole sequence every step"),
    Option("export_attention", OutputDir(), None, "write per-token attention on the image (npz, png) here; "
           "the captured last query row runs explicit attention in every layer (slower than the fused kernel)",
           nullable=True),
    Option("batch_size", Int(1), None, "items (image with prompt) per left-padded batch", nullable=True,
           default_text="all in one batch"),
    Option("out", OutputDir(), None, "also write each item's text to OUT/generated.jsonl as its batch finishes; "
           "the same command again generates only the items missing (vsink-run.json)", nullable=True,
           default_text="none: print only"),
)

CALIBRATE = declare(
    Option("image", InputPath(), None, "image file", repeat=True, default_text="the bundled demo images",
           deprecated=POSITIONAL_IMAGES),
    Option("prompt", PROMPT_TEXT, "Describe the image.", "prompt used with every image"),
    Option("num_dims", Int(1), 2, "dimensions to keep (at most the hidden size)"),
    Option("out", OutputFile(), "sinks.json", "output JSON"),
)


def hallucination_run(prompt: Option, max_new_tokens: int) -> dict[str, Option]:
    """The options of ``vsink eval pope|chair`` that run a model."""
    return declare(
        *image_dir("COCO image directory (file names as in the annotations)", "none; needed to run a model",
                    "images_dir").values(),
        *[replace(o, required=False) if o.key == "model" else o for o in LVLM_MODEL.values()],
        Option("annotations", InputPath(), None, "COCO instances JSON", nullable=True),
        Option("mitigation", ListOf(MITIGATION, nonempty=True, distinct=True), ["none"],
               "mitigations (each may join several with +); the first is the baseline"),
        Option("set", Assignment(), [], "setting of one mitigation, e.g. var.p=0.6, pai.gamma=1.1, fastv.ratio=0.5",
               repeat=True, default_text="none"),
        replace(SINKS, help="sink calibration JSON for var (from 'vsink lvlm calibrate')"),
        PROTOCOL,
        Option("num_images", Int(1), 500, "images sampled from the annotations"),
        Option("limit", Int(1), None, "run only the first N items", nullable=True, default_text="all"),
        Option("seed", SEED, 0, "sampling seed"),
        Option("batch_size", Int(1), 4, "prompts per generate call"),
        Option("max_new_tokens", Int(1, 1_000_000), max_new_tokens, "tokens to generate"),
        prompt,
        Option("out", OutputDir(), "vsink-hallucination", "output directory; a rerun into it resumes the earlier "
               "run when everything that determines the answers is the same (vsink-run.json), and is refused "
               "otherwise"),
        Option("new_run", Bool(), False, "when --out holds a run made with other settings, write into the first "
               "free OUT-2, OUT-3, ... instead of refusing"),
    )


POPE_RUN = hallucination_run(Option("prompt", Template(("question",)), POPE_PROMPT, "prompt"), 16)
POPE = declare(
    Option("answers", InputPath(), None, "score this answers JSONL (no model)", nullable=True),
    Option("questions", InputPath(), None, "questions JSONL to use instead of building them", nullable=True),
    Option("splits", ListOf(Choice(SPLITS), nonempty=True, distinct=True), list(SPLITS), "POPE splits"),
    Option("parser", Choice(PARSERS), "official", "answer parser"),
    Option("build_only", Bool(), False, "write OUT/questions.jsonl and stop"),
    *STATS.values(),
)
CHAIR_RUN = declare(
    *hallucination_run(Option("prompt", PROMPT_TEXT, CHAIR_PROMPT, "prompt (used as given)"), 512).values(),
    Option("samples_per_image", Int(1, 1000), 1, "captions per image: 1 decodes greedily; more samples each "
           "caption (seeded from --seed, the image and the sample index) and scores every one"),
    Option("temperature", Float(0.0, min_open=True), 1.0, "sampling temperature (with --samples-per-image > 1)"),
    Option("top_p", Float(0.0, 1.0, min_open=True), 1.0, "nucleus sampling mass (with --samples-per-image > 1)"),
)
CHAIR = declare(
    Option("generated", InputPath(), None, "score this generated-captions JSONL (no model)", nullable=True),
    Option("captions", InputPath(), None, "COCO captions JSON (reference captions add ground-truth objects)",
           nullable=True),
    Option("vocabulary", Choice(VOCABULARIES), "reference", "reference: mentions exactly as the reference "
           "chair.py finds them, quirks included; vsink: vsink's table with the reference's errors fixed "
           "(docs/fidelity.md)"),
    Option("synonyms", InputPath(), None, "synonym table in the reference synonyms.txt format, for --vocabulary "
           "reference", nullable=True, default_text="the packaged reference table"),
    *STATS.values(),
)


def benchmark_options(name: str) -> dict[str, Option]:
    """The options of ``vsink eval NAME`` for a benchmark of :mod:`vsink.evaluate.benchmarks`."""
    from .evaluate.benchmarks import get

    bench = get(name)
    run = {key: o for key, o in hallucination_run(
        Option("prompt", Template(("question",)), bench.prompt, "prompt ({question}: the benchmark's question)"),
        bench.max_new_tokens).items() if key not in ("annotations", "num_images", "seed")}
    run["images"] = replace(run["images"], help="image directory (paths as in the data)",
                            default_text="the data's folder")
    run["images_dir"] = replace(run["images_dir"], help="image directory (paths as in the data)",
                                default_text="the data's folder")
    run["out"] = replace(run["out"], default=f"vsink-{name}")
    return declare(
        *run.values(),
        Option("data", InputPath("file or directory"), None, f"{bench.title}: the official data", nullable=True),
        Option("answers", InputPath(), None, "score this answers JSONL (no model)", nullable=True),
        *bench.options,
        *STATS.values(),
    )


VIEW = declare(
    Option("directory", InputPath("directory"), None, "output directory of vsink maps, scan or generate "
           "--export-attention", positional=True, required=True),
    Option("out", OutputFile(), None, "HTML file to write", nullable=True, default_text="DIRECTORY/viewer.html"),
    Option("max_images", Int(1, 1000), 8, "images (or LVLM rows) to include"),
    Option("layers", ListOf(Int(), nonempty=True), None, "exported blocks to include", nullable=True,
           default_text="all exported"),
    Option("precision", Choice(("float16", "float32")), "float16", "float16: half the size, values to ~3 "
           "significant digits; float32: exact"),
)

FINETUNE = declare(
    Option("config", InputPath(), None, "recipe YAML", nullable=True, default_text="built-in defaults, the posthoc demo"),
    Option("overrides", Assignment(), [], "recipe overrides (see the recipe keys in docs/options.md)",
           positional=True, repeat=True, default_text="none", metavar="KEY=VALUE"),
    Option("resume", Bool(), False, "continue from the latest checkpoint in out/"),
    Option("compare_attention", Bool(), False, "scratch recipe: train it with registers and with each sink-free "
           "attention variant (registers.n=0) into out/<run>/, and write one comparison (compare.json, compare.md)"),
    NO_PROGRESS,
)
