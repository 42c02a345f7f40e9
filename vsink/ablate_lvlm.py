"""LVLM measures under ablation (``vsink ablate --model LVLM --questions questions.jsonl IMAGE_DIR``):
ablate a target in the LVLM's vision tower and measure what changes in its answers.

The tower is the LVLM's own (:meth:`~vsink.backbones.hf_lvlm.LVLM.vision_backbone`, the backbone
``SPEC#vision_tower`` loads), so the targets, ablations and sites are those of :mod:`vsink.ablate`,
chosen on the images the questions ask about, each preprocessed by the LVLM's own processor (the
tower sees exactly the pixels it sees when the LVLM answers). The questions are POPE questions
(:func:`vsink.evaluate.pope.read_questions`: ``question_id``, ``image``, ``object``, ``split``,
``label``, ``text``; ``vsink eval pope --build-only`` writes them). For every (target, block,
ablation) the ablation is installed in the tower and the LVLM answers every question again
(greedy, the prompt of ``vsink eval pope``); against the clean answers:

* **answers changed**: questions whose answer text (stripped) differs;
* **yes/no flips**: questions whose parsed answer (``--parser``) differs;
* **POPE** accuracy, precision, recall, F1 and yes-ratio of the clean and each ablated run
  (:func:`vsink.evaluate.pope.score_answers`), each with its bootstrap interval, and each ablated
  run's paired difference from the clean one with its paired interval and McNemar's exact test
  (:func:`vsink.evaluate.hallucination_stats.pope_statistics`: the unit is the image, all its
  questions drawn together).

The tower's own measures (feature cosines, class-token attention, high-norm tokens left) are
reported as for a vision model. A block after the one the language model reads (LLaVA reads the
second-to-last) cannot change any answer.

Tower inputs: the unit of the tower's side is one ``[3, H, W]`` tower input, as the LVLM's
processor cuts it (:meth:`~vsink.backbones.hf_lvlm.LVLM.tower_inputs`): one per image for
LLaVA-1.5, PaliGemma and Gemma 3, the base tile and the crops for LLaVA-NeXT and LLaVA-OneVision,
the tiles and the thumbnail (last) for InternVL, the sub-images and the global image (last) for
Idefics3 and SmolVLM; when any image has several, each is named ``IMAGE#tileK`` in the order the
tower reads them (the report's figures show the tile's own picture, the processor's normalisation
undone). Each tile is selected on its own with the detector's rules, the detector's
thresholds pool over every tile of every image (as over the images of a vision model),
``mean-images`` averages over all tiles, ``resample`` pairs tiles (a tile may take another tile of
its own image) and the tower's intervals resample tiles; the answers' statistics stay per image.
When the LVLM answers, its batch's tower inputs are checked to be exactly (``torch.equal``) the
tiles the selection was made on, row by row, before the ablation reads them. A family whose
tower reads packed patches (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``[patches, C]`` with
``image_grid_thw``) is refused in one line.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from .ablate import AblationResult, Selection, ablate, install_ablation
from .errors import VsinkError
from .evaluate.hallucination import POPE_PROMPT
from .evaluate.pope import FIELDS, PARSERS, score_answers
from .evaluate.stats import Bootstrap
from .images import NamedImage, load_image
from .manifest import content_hash, weights_fingerprint
from .options import Choice, Int, Option, Template, declare
from .readback import member
from .registers.neurons import NeuronSpec

#: the options of ``vsink ablate`` that only an LVLM takes (None: not given; the defaults apply)
LVLM_ABLATE = declare(
    Option("prompt", Template(("question",)), None, "LVLMs: the prompt of each question", nullable=True,
           default_text=repr(POPE_PROMPT)[1:-1]),
    Option("parser", Choice(PARSERS), None, "LVLMs: the answer parser of the yes/no flips and POPE", nullable=True,
           default_text="official"),
    Option("max_new_tokens", Int(1, 1_000_000), None, "LVLMs: tokens to generate per answer", nullable=True,
           default_text="16"),
)
DEFAULTS = {"prompt": POPE_PROMPT, "parser": "official", "max_new_tokens": 16}


@dataclass
class AnswerRow:
    """One (target, block, ablation): how the LVLM's answers moved."""

    name: str
    target: str
    layer: int
    ablation: str
    answers_changed: int
    yes_no_flips: int
    #: each question whose answer text changed: ``{"question_id", "image", "clean", "ablated"}``
    changed: list[dict[str, Any]]
    #: POPE scores of the ablated run (``splits``, ``mean``, ``intervals``)
    pope: dict[str, Any]
    #: the paired differences from the clean run (``splits``, ``mean``, ``mcnemar``, ``n``)
    comparison: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AnswerMeasures:
    """The LVLM's answers, clean and under every ablation (``AblationResult.answers``)."""

    model: str
    questions: int
    settings: dict[str, Any]
    clean: dict[str, Any]
    rows: list[AnswerRow]
    statistics: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "questions": self.questions, "settings": self.settings, "clean": self.clean,
                "statistics": self.statistics, "skipped": self.skipped, "rows": [r.to_json() for r in self.rows]}


def check_questions(questions: Sequence[Mapping[str, Any]]) -> None:
    """Refuse, in one line, questions without the POPE fields."""
    if not questions:
        raise VsinkError("no questions given")
    for i, q in enumerate(questions):
        missing = [f for f in FIELDS if not isinstance(q, Mapping) or f not in q]
        if missing:
            raise VsinkError(f"question {i}: missing field(s) {', '.join(missing)} (a POPE questions file: "
                             f"{', '.join(FIELDS)})")


def image_tower_inputs(lvlm: Any, image: Any, prompt: str) -> torch.Tensor:
    """The tower inputs of one image, ``[T, 3, H, W]`` (``T`` tiles; 1 for LLaVA-1.5 style), as the
    LVLM's processor gives them for ``prompt``; a family without such inputs is refused in one line."""
    inputs = lvlm.prepare([image], [prompt])
    tiles = lvlm.tower_inputs(inputs)
    if tiles is None:
        pixels = inputs.get("pixel_values")
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else None
        packed = " (patches packed by image_grid_thw)" if inputs.get("image_grid_thw") is not None else ""
        raise VsinkError(f"{lvlm.spec}: ablating its vision tower needs its tower inputs as [3, H, W] images, one or "
                         f"several tiles per image (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, InternVL, Idefics3); its "
                         f"processor gives pixel_values of shape {shape}{packed}")
    return tiles[0]


def tile_names(name: str, count: int, tiled: bool) -> list[str]:
    """The names of an image's ``count`` tower inputs: ``IMAGE#tileK`` when the run's images are
    ``tiled`` (any has several), else the image's own."""
    return [f"{name}#tile{t}" for t in range(count)] if tiled else [name]


def tile_picture(lvlm: Any, tile: torch.Tensor, fallback: Any) -> Any:
    """A tower input ``[3, H, W]`` as the picture it holds, for the report's figures: the
    processor's normalisation undone (``× image_std + image_mean``, then the rescale undone);
    ``fallback`` where the image processor does not say how it normalised."""
    proc = getattr(lvlm.processor, "image_processor", None)
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is None or std is None or not getattr(proc, "do_normalize", True):
        return fallback
    shape = (-1, 1, 1)
    values = tile.detach().float().cpu() * torch.as_tensor(std, dtype=torch.float32).reshape(shape) \
        + torch.as_tensor(mean, dtype=torch.float32).reshape(shape)
    if getattr(proc, "do_rescale", True):
        values = values / float(getattr(proc, "rescale_factor", 1 / 255))
    return Image.fromarray(values.clamp(0, 255).round().byte().permute(1, 2, 0).numpy())


def answer_batch(lvlm: Any, chunk: Sequence[Mapping[str, Any]], images: Mapping[str, Any],
                 tiles: Mapping[str, torch.Tensor], rows: Mapping[str, list[int]], prompt: str
                 ) -> tuple[dict[str, Any], list[int]]:
    """The LVLM's inputs for a batch of questions and the tower rows its forward encodes, in order
    (the ablation's indices of each question's image's tiles). Each question's tower inputs are
    checked to be exactly ``tiles[image]``, the ones the selection was made on."""
    inputs = lvlm.prepare([images[q["image"]] for q in chunk], [prompt.format(question=q["text"]) for q in chunk])
    got = lvlm.tower_inputs(inputs)
    for q, pixels in zip(chunk, got or [None] * len(chunk)):
        own = tiles[q["image"]]
        if pixels is None or pixels.shape != own.shape or not torch.equal(pixels, own.to(pixels.device)):
            raise VsinkError(f"{lvlm.spec}: question {q['question_id']}: the tower inputs of its image "
                             f"{q['image']!r} in a batch are not the ones its ablation was chosen on")
    return inputs, [r for q in chunk for r in rows[q["image"]]]


def _answers(lvlm: Any, items: Sequence[Mapping[str, Any]], images: Mapping[str, Any],
             tiles: Mapping[str, torch.Tensor], rows: Mapping[str, list[int]], prompt: str, max_new_tokens: int,
             batch_size: int, current: list[int], bar: Any) -> list[str]:
    """The LVLM's greedy answer to every question; ``current`` is set to each batch's tower rows
    (read by an installed ablation)."""
    from .lvlm import generate

    texts: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        inputs, current[:] = answer_batch(lvlm, chunk, images, tiles, rows, prompt)
        texts += [t.strip() for t in generate(lvlm, inputs, max_new_tokens=max_new_tokens).texts]
        bar.update(len(chunk))
    return texts


def ablate_lvlm(
    lvlm: Any,
    questions: Sequence[Mapping[str, Any]],
    images_dir: Union[str, os.PathLike],
    *,
    targets: Sequence[str] = ("high-norm",),
    ablations: Sequence[str] = ("zero",),
    layers: Union[str, Sequence[int], None] = "auto",
    neurons: Union[NeuronSpec, Mapping[int, Sequence[int]], None] = None,
    seed: int = 0,
    batch_size: int = 8,
    threshold: Union[str, float, None] = "auto",
    sink_ratio: float = 5.0,
    massive_ratio: float = 100.0,
    stats: Bootstrap = Bootstrap(),
    prompt: str = POPE_PROMPT,
    parser: str = "official",
    max_new_tokens: int = 16,
    progress: bool = True,
) -> AblationResult:
    """Ablate each target at each tower block with each ablation and measure the tower and the
    LVLM's answers (module docstring).

    Args:
        lvlm: from :func:`vsink.lvlm.load_lvlm`.
        questions: POPE questions (:func:`vsink.evaluate.pope.read_questions`); questions whose image
            cannot be read are skipped and reported.
        images_dir: the folder their ``image`` names are in.
        targets, ablations, layers, neurons, seed, threshold, sink_ratio, massive_ratio, stats: as
            for :func:`vsink.ablate.ablate`, in the tower (``layers``: tower blocks; ``batch_size``:
            tower inputs per tower pass and questions per generate call).
        prompt: the prompt of each question (``{question}``: its text).
        parser: the POPE answer parser (``official`` or ``strict``).
        max_new_tokens: tokens generated per answer.

    Returns the tower's :class:`~vsink.ablate.AblationResult` with ``answers``
    (:class:`AnswerMeasures`).
    """
    for key, value in (("prompt", prompt), ("parser", parser), ("max_new_tokens", max_new_tokens)):
        LVLM_ABLATE[key].check(value)
    check_questions(questions)
    tower = lvlm.vision_backbone()
    images: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for name in dict.fromkeys(q["image"] for q in questions):
        try:
            images[name] = load_image(member(images_dir, name, "question image"))
        except VsinkError as e:
            skipped.append({"image": str(name), "reason": str(e)})
            print(f"vsink: skipped {e}", file=sys.stderr)
    if not images:
        raise VsinkError(f"no question's image could be read in {images_dir} (first problem: {skipped[0]['reason']})")
    names = list(images)
    tiles = {n: image_tower_inputs(lvlm, images[n], prompt.format(question="")) for n in names}
    shapes = sorted({tuple(t.shape[1:]) for t in tiles.values()})
    if len(shapes) > 1:
        raise VsinkError(f"{lvlm.spec}: its processor gives the images different tower inputs {shapes}; "
                         "ablating the tower needs one input size")
    tiled = any(t.shape[0] > 1 for t in tiles.values())
    inputs: dict[str, torch.Tensor] = {}  # tower input name -> [1, 3, H, W]
    rows: dict[str, list[int]] = {}  # image -> its tower inputs' rows
    for n in names:
        for t, tile_name in enumerate(tile_names(n, tiles[n].shape[0], tiled)):
            rows.setdefault(n, []).append(len(inputs))
            inputs[tile_name] = tiles[n][t:t + 1]
    items = [dict(q) for q in questions if q["image"] in images]

    def preprocess(batch: list[Any], batch_names: list[str]) -> torch.Tensor:
        return torch.cat([inputs[n] for n in batch_names])

    bar = tqdm(total=len(items), desc="answers", unit="question", disable=not progress)  # grows per ablated run
    current: list[int] = []
    clean: list[str] = []
    runs: dict[str, tuple[Selection, str, list[str]]] = {}

    def answers() -> list[str]:
        return _answers(lvlm, items, images, tiles, rows, prompt, max_new_tokens, batch_size, current, bar)

    def each(selection: Selection, ablation: str, values: torch.Tensor) -> None:
        if not clean:  # the clean answers once ablate() has checked everything, before any ablation is installed
            clean.extend(answers())
        bar.total += len(items)  # one run per (selection, ablation): several per target with several blocks
        bar.refresh()
        with install_ablation(tower, selection, values, current):
            runs[f"{selection.target}@{selection.layer}:{ablation}"] = (selection, ablation, answers())

    try:
        result = ablate(tower, [NamedImage(t, tile_picture(lvlm, tiles[n][k], images[n]) if tiled else images[n])
                                for n in names for k, t in enumerate(tile_names(n, tiles[n].shape[0], tiled))],
                        targets=targets, ablations=ablations,
                        layers=layers, neurons=neurons, seed=seed, batch_size=batch_size, threshold=threshold,
                        sink_ratio=sink_ratio, massive_ratio=massive_ratio, stats=stats, preprocess=preprocess,
                        each=each, progress=progress)
    finally:
        bar.close()
    result.skipped = skipped
    result.synthetic = result.synthetic or bool(lvlm.synthetic)
    result.answers = measure_answers(lvlm.spec, items, clean, runs, parser, stats, skipped)
    result.answers.settings.update(prompt=prompt, max_new_tokens=max_new_tokens, images_dir=str(images_dir),
                                   tower_inputs={n: len(rows[n]) for n in names})
    result.settings["lvlm"] = {"model": lvlm.spec, "weights": weights_fingerprint(lvlm.model), "questions": len(items),
                               "questions_sha256": content_hash([dict(q) for q in items]), **result.answers.settings}
    return result


def measure_answers(model: str, items: Sequence[Mapping[str, Any]], clean: Sequence[str],
                    runs: Mapping[str, tuple[Selection, str, Sequence[str]]], parser: str, stats: Bootstrap,
                    skipped: Sequence[dict[str, str]] = ()) -> AnswerMeasures:
    """The answer measures of the ablated runs against the clean one (module docstring): ``clean``
    and each run's answers are in the order of ``items``."""
    from .evaluate.hallucination_stats import pope_statistics

    scores = {"clean": score_answers([{**q, "answer": t} for q, t in zip(items, clean)], parser)}
    for name, (_, _, texts) in runs.items():
        scores[name] = score_answers([{**q, "answer": t} for q, t in zip(items, texts)], parser)
    flips = {name: sum(a["parsed"] != b["parsed"] for a, b in zip(scores["clean"]["items"], sc["items"]))
             for name, sc in scores.items()}
    statistics = pope_statistics(scores, stats)
    for sc in scores.values():
        sc.pop("items")
    rows = []
    for name, (selection, ablation, texts) in runs.items():
        changed = [{"question_id": q["question_id"], "image": q["image"], "clean": a, "ablated": b}
                   for q, a, b in zip(items, clean, texts) if a != b]
        rows.append(AnswerRow(name=name, target=selection.target, layer=selection.layer, ablation=ablation,
                              answers_changed=len(changed), yes_no_flips=flips[name], changed=changed,
                              pope=scores[name], comparison=statistics["comparisons"][name]))
    return AnswerMeasures(model=model, questions=len(items), settings={"parser": parser}, clean=scores["clean"],
                          rows=rows, statistics=statistics["statistics"], skipped=list(skipped))


def answers_markdown(answers: AnswerMeasures) -> str:
    """The answers table: per row the answers changed, the yes/no flips, and POPE accuracy, F1 and
    yes-ratio (%) with their intervals and their paired differences from the clean run."""
    head = ["target", "block", "ablation", "answers changed", "yes/no flips", "accuracy (%)", "F1 (%)",
            "yes-ratio (%)", "McNemar (b, c, p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| clean | | | | | " + " | ".join(pope_cell(answers.clean, None, k)
                                                     for k in ("accuracy", "f1", "yes_ratio")) + " | |")
    for r in answers.rows:
        test = r.comparison.get("mcnemar", {}).get("all")
        mcnemar = f"{test['b']}, {test['c']}, {test['p']:.3g}" if test else "-"
        lines.append(f"| {r.target} | {r.layer} | {r.ablation} | {r.answers_changed}/{answers.questions} | "
                     f"{r.yes_no_flips} | " + " | ".join(pope_cell(r.pope, r.comparison, k)
                                                          for k in ("accuracy", "f1", "yes_ratio")) + f" | {mcnemar} |")
    return "\n".join(lines) + "\n"


def pope_cell(scores: Mapping[str, Any], comparison: Optional[Mapping[str, Any]], key: str) -> str:
    """``70.00 [60.00, 80.00]``, with ``; Δ +20.00 [+10.00, +30.00]`` for an ablated run (mean over splits, %)."""
    value = scores["mean"][key] * 100
    iv = scores.get("intervals", {}).get("mean", {}).get(key)
    text = f"{value:.2f}" + (f" [{iv['low'] * 100:.2f}, {iv['high'] * 100:.2f}]" if iv else "")
    delta = (comparison or {}).get("mean", {}).get(key)
    if delta:
        text += f"; Δ {delta['value'] * 100:+.2f} [{delta['low'] * 100:+.2f}, {delta['high'] * 100:+.2f}]"
    return text
