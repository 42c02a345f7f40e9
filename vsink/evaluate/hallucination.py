"""The hallucination runner: an LVLM over POPE questions, CHAIR images or the items of a
benchmark of :mod:`vsink.evaluate.benchmarks` (MME, HallusionBench, Object HalBench, AMBER), with
and without mitigations, resumable, then scored.

Each mitigation writes ``OUT/<mitigation>/answers.jsonl`` (POPE: the question fields plus
``answer``) or ``generated.jsonl`` (CHAIR: ``image_id``, ``image``, ``caption``), each line with
the mitigation ``protocol`` it was made under, one line per item as soon as its batch is done; a
rerun reads what is there and runs only the missing items, so an interrupted run loses nothing.
``OUT/<mitigation>/vsink-run.json`` records, before the first answer is written, everything that
determines the answers (:mod:`vsink.manifest`: model and weights fingerprint, mitigation, its
settings as given and as resolved, protocol, prompt, generation settings, splits, the questions or
images, the vsink version); a rerun with any of them different is refused with one line naming
each difference, and answers without such a record are never reused. One process writes a
folder at a time (:class:`vsink.outputs.RunLock`). A key answered twice (files of an older vsink,
or edited) is scored once: the first answer counts, and the repeats are reported. Images that
cannot be read are skipped, reported and left for the next run. ``OUT/results.json`` holds the protocol (prompt,
max_new_tokens, images, seed, parser, settings, mitigation protocol and resolved settings) and
each mitigation's scores; ``OUT/results.md`` the table with deltas against the first mitigation;
``OUT/results.html`` the same side by side (POPE per split with the unparseable answers counted,
CHAIR per caption with the hallucinated words marked).
For CHAIR the protocol and the report name the vocabulary (``reference`` or ``vsink``) and the
synonym table used.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from tqdm.auto import tqdm

from ..backbones.hf_lvlm import LVLM
from ..errors import VsinkError, VsinkWarning
from ..images import load_image
from ..io import append_jsonl, read_jsonl, write_text
from ..manifest import check_resume, write_record
from ..options import Int
from ..outputs import MANIFEST, OutputSet
from ..readback import member
from .pope import QUESTION_ID

POPE_PROMPT = "{question}\nAnswer the question using a single word or phrase."
CHAIR_PROMPT = "Please describe this image in detail."


def run_items(lvlm: LVLM, items: Sequence[dict[str, Any]], key: str, out_file: Path, *, images_dir: Path,
              prompt: Callable[[dict[str, Any]], str], field: str, mitigation: str,
              settings: Optional[dict[str, Any]], max_new_tokens: int, batch_size: int,
              protocol: str = "paper", progress: bool = True,
              determining: Optional[dict[str, Any]] = None,
              command: str = "vsink eval") -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Generate ``field`` for every item not yet in ``out_file`` (matched on ``key``) under the
    mitigation ``protocol`` (paper or official, recorded in every row; rows of an earlier run
    under another protocol are an error); returns the rows in the file, the first per key, and the
    items skipped this time.

    ``determining``: what determines the answers (see the module docstring), recorded in the
    folder's ``vsink-run.json`` before the first answer; earlier answers are resumed only when the
    record matches (:func:`vsink.manifest.check_resume`)."""
    from ..lvlm import generate

    out_file.parent.mkdir(parents=True, exist_ok=True)
    existing = read_rows(out_file, key) if out_file.exists() else []
    if determining is not None:
        if existing:
            check_resume(out_file.parent, determining, f"the answers in {out_file.name}")
        else:
            write_record(out_file.parent, command, determining, [out_file.name])
    other = sorted({str(row.get("protocol", "paper")) for row in existing} - {protocol})
    if other:
        raise VsinkError(f"{out_file}: made under protocol {', '.join(other)}, not {protocol}; use another --out")
    done = {row[key] for row in existing}
    todo = [it for it in items if it[key] not in done]
    skipped: list[dict[str, str]] = []
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{mitigation}", unit="item",
               disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch, images = [], []
        for item in todo[start:start + batch_size]:
            try:
                images.append(load_image(member(images_dir, item["image"], f"{key} {item[key]}: image")))
                batch.append(item)
            except VsinkError as e:
                skipped.append({"item": str(item[key]), "reason": str(e)})
                bar.write(f"vsink: skipped {e}", file=sys.stderr)
        if batch:
            inputs = lvlm.prepare(images, [prompt(it) for it in batch])
            result = generate(lvlm, inputs, mitigation=mitigation, settings=settings, protocol=protocol,
                              max_new_tokens=max_new_tokens)
            append_jsonl(out_file, [{**it, field: text.strip(), "protocol": protocol}
                                    for it, text in zip(batch, result.texts)], fsync=True)
        bar.update(len(todo[start:start + batch_size]))
    bar.close()
    return read_rows(out_file, key, report=False) if out_file.exists() else [], skipped


def read_rows(path: Path, key: str, report: bool = True) -> list[dict[str, Any]]:
    """A runner's answers file, the first row of each ``key`` (a repeated key — two writers at once
    in an older vsink, or an edited file — is never scored twice; with ``report``, the repeats are
    counted in a warning)."""
    import warnings

    key_kind = {"image_id": Int(min=0)}.get(key, QUESTION_ID)
    rows, seen, repeats = [], set(), 0
    for row in read_jsonl(path, (key,), fields={key: key_kind}, cut_last_line=True):
        ident = json.dumps(str(row[key]) if isinstance(row[key], int) else row[key])
        if ident in seen:
            repeats += 1
            continue
        seen.add(ident)
        rows.append(row)
    if repeats and report:
        warnings.warn(f"{path}: {repeats} repeated {key} line(s) ignored; the first answer of each is scored",
                      VsinkWarning, stacklevel=2)
    return rows


def _table(names: list[str], rows: list[tuple[str, list[Optional[float]], int]]) -> str:
    head = ["metric", names[0]] + [f"{n} (Δ vs {names[0]})" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values, scale in rows:
        cells = [f"{values[0] * scale:.2f}" if values[0] is not None else "—"]
        for v in values[1:]:
            cells.append("—" if v is None else f"{v * scale:.2f} ({(v - values[0]) * scale:+.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_results(out: Path, kind: str, protocol: dict[str, Any], scores: dict[str, dict[str, Any]],
                 skipped: dict[str, list[dict[str, str]]]) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``results.html`` for POPE (``kind="pope"``), CHAIR or a
    benchmark of :mod:`vsink.evaluate.benchmarks` (``kind`` its name)."""
    names = list(scores)
    if kind == "pope":
        metrics = [("accuracy", "accuracy (%)", 100), ("precision", "precision (%)", 100),
                   ("recall", "recall (%)", 100), ("f1", "F1 (%)", 100), ("yes_ratio", "yes-ratio (%)", 100)]
        rows = []
        for split in sorted({s for sc in scores.values() for s in sc["splits"]}) + ["mean"]:
            for key, label, scale in metrics:
                values = [(sc["mean"] if split == "mean" else sc["splits"].get(split, {})).get(key) for sc in scores.values()]
                rows.append((f"{split} {label}", values, scale))
    elif kind != "chair":
        rows = benchmark_rows(kind, scores)
    else:
        rows = [(label, [sc[key] for sc in scores.values()], scale) for key, label, scale in
                (("chair_s", "CHAIR_s (%)", 100), ("chair_i", "CHAIR_i (%)", 100), ("recall", "recall (%)", 100),
                 ("avg_len", "average length (words)", 1))]
    md = [f"# vsink eval {kind}", ""]
    if protocol.get("synthetic"):
        md += ["**Synthetic demo LVLM**: its numbers say nothing about any real model.", ""]
    if kind == "chair" and "vocabulary" in protocol:
        md += [f"CHAIR vocabulary: `{protocol['vocabulary']}` (synonyms: {protocol['synonyms']})", ""]
    md += [f"Protocol: `{json.dumps(protocol)}`", "", _table(names, rows)]
    if kind == "pope":
        for name, sc in scores.items():
            bad = {s: m for s, m in sc["splits"].items() if m.get("unparseable")}
            if bad:
                md.append(f"{name}: unparseable answers (counted wrong, not yes): "
                          + ", ".join(f"{s} {m['unparseable']}/{m['n']}" for s, m in bad.items()))
    if kind not in ("pope", "chair"):
        for name, sc in scores.items():
            if sc.get("settings"):  # what the scorer used where the reference's data is missing (AMBER)
                md.append(f"{name}: scored with " + "; ".join(f"{k}: {v}" for k, v in sc["settings"].items()))
    for name, items in skipped.items():
        if items:
            md.append(f"{name}: {len(items)} items skipped (see results.json)")
    summary = {"kind": kind, "protocol": protocol, "baseline": names[0], "results": scores,
               "skipped": skipped}
    from ..export.hallucination_report import hallucination_html

    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"  # made before any file is written
    page = hallucination_html(summary)
    with OutputSet(out, f"vsink eval {kind}", {"determining": {"kind": kind, "protocol": protocol}}) as stage:
        write_text(stage / "results.json", text)
        write_text(stage / "results.md", "\n".join(md) + "\n")
        write_text(stage / "results.html", page)
    return {"json": out / "results.json", "markdown": out / "results.md", "html": out / "results.html", "record": out / MANIFEST}


def benchmark_rows(kind: str, scores: dict[str, dict[str, Any]]) -> list[tuple[str, list[Optional[float]], float]]:
    """The report rows of a benchmark of :mod:`vsink.evaluate.benchmarks`, one value per
    mitigation (None where a mitigation's scores lack the row)."""
    from .benchmarks import get

    per = [{m.label: m for m in get(kind).metrics(sc)} for sc in scores.values()]
    labels = list(dict.fromkeys(label for p in per for label in p))
    rows = []
    for label in labels:
        scale = next(p[label].scale for p in per if label in p)
        rows.append((label, [p[label].value if label in p else None for p in per], scale))
    return rows


def pope_protocol(prompt: str, max_new_tokens: int, parser: str, seed: int, questions: Sequence[dict[str, Any]],
                  settings: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "parser": parser, "seed": seed, "greedy": True,
            "images": sorted({q["image"] for q in questions}), "questions": len(questions), "settings": settings}


def load_questions(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    from .pope import read_questions

    return read_questions(path)
