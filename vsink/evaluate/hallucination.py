"""The hallucination runner: an LVLM over POPE questions, CHAIR images or the items of a
benchmark of :mod:`vsink.evaluate.benchmarks` (MME, HallusionBench, Object HalBench, AMBER), with
and without mitigations, resumable, then scored.

Each mitigation writes ``OUT/<mitigation>/answers.jsonl`` (POPE: the question fields plus
``answer``) or ``generated.jsonl`` (CHAIR: ``image_id``, ``sample``, ``image``, ``caption``, keyed
by image and sample index, so several sampled captions of an image are distinct rows), each line with
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
each mitigation's scores with their bootstrap intervals, and the paired comparisons against the
first mitigation (:mod:`vsink.evaluate.hallucination_stats`); ``OUT/results.md`` the table with
intervals and deltas against the first mitigation;
``OUT/results.html`` the same side by side (POPE per split with the unparseable answers counted,
CHAIR per caption with the hallucinated words marked).
For CHAIR the protocol and the report name the vocabulary (``reference`` or ``vsink``) and the
synonym table used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from ..shard import Shard
from .pope import QUESTION_ID
from .stats import Bootstrap

POPE_PROMPT = "{question}\nAnswer the question using a single word or phrase."
CHAIR_PROMPT = "Please describe this image in detail."


Key = Union[str, tuple[str, ...]]
#: the kinds of the key fields of the runner's files (any other key field: a question id)
KEY_KINDS = {"image_id": Int(min=0), "sample": Int(min=0)}


def key_of(row: dict[str, Any], key: Key) -> Any:
    """The value identifying a row: its ``key`` field, or the tuple of its ``key`` fields (a row
    of an older vsink without ``sample`` is sample 0)."""
    if isinstance(key, str):
        return row[key]
    return tuple(row.get(k, 0) if k == "sample" else row[k] for k in key)


def sampling_seed(seed: int, first: Any) -> int:
    """The torch seed of a sampled batch: from ``seed`` and the key of the batch's first item (a
    resumed run meets the same batches, so it samples the same captions)."""
    return int.from_bytes(hashlib.sha256(json.dumps([seed, first]).encode()).digest()[:8], "little")


def run_items(lvlm: LVLM, items: Sequence[dict[str, Any]], key: Key, out_file: Path, *, images_dir: Path,
              prompt: Callable[[dict[str, Any]], str], field: str, mitigation: str,
              settings: Optional[dict[str, Any]], max_new_tokens: int, batch_size: int,
              protocol: str = "paper", progress: bool = True,
              determining: Optional[dict[str, Any]] = None,
              command: str = "vsink eval",
              sampling: Optional[dict[str, Any]] = None,
              shard: Optional[Shard] = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Generate ``field`` for every item not yet in ``out_file`` (matched on ``key``: a field, or
    several, e.g. ``("image_id", "sample")`` for several captions per image) under the mitigation
    ``protocol`` (paper or official, recorded in every row; rows of an earlier run under another
    protocol are an error); returns the rows in the file, the first per key, and the items
    skipped this time.

    ``determining``: what determines the answers (see the module docstring), recorded in the
    folder's ``vsink-run.json`` before the first answer; earlier answers are resumed only when the
    record matches (:func:`vsink.manifest.check_resume`). ``sampling``: ``{"seed", "temperature",
    "top_p"}`` to sample instead of decoding greedily, each batch seeded by :func:`sampling_seed`.

    ``shard`` (under ``torchrun``, :mod:`vsink.shard`): the items left are cut into batches as one
    process cuts them, each process runs its batches into its own file beside ``out_file``
    (``answers.rank1.jsonl``), and rank 0 folds those into ``out_file`` in the items' order, when
    the run ends and when the next one starts (so a run killed on any rank resumes where each rank
    stopped, with any number of processes). Rank 0 returns the rows and every rank's skipped items;
    the other ranks return nothing. An error on any rank's batches stops every rank
    (:meth:`~vsink.shard.Shard.settle`: rank 0 names the rank and the cause); the rows written by
    then stay in the rank files, for the next run to fold in. A run refused before its first answer (a setting the model
    cannot take) leaves no record of itself."""
    shard = shard or Shard()
    order = {row_ident(it, key): i for i, it in enumerate(items)}

    def prepare() -> bool:
        """Fold, check or write the record; whether it wrote the record."""
        out_file.parent.mkdir(parents=True, exist_ok=True)
        parts = rank_files(out_file)
        existing = read_rows(out_file, key) if out_file.exists() else []
        earlier = existing + [row for part in parts for row in read_rows(part, key, report=False)]
        fresh = False
        if determining is not None:
            if earlier:
                check_resume(out_file.parent, determining, f"the answers in {out_file.name}")
            else:
                fresh = True
                write_record(out_file.parent, command, determining, [out_file.name])
        other = sorted({str(row.get("protocol", "paper")) for row in earlier} - {protocol})
        if other:
            raise VsinkError(f"{out_file}: made under protocol {', '.join(other)}, not {protocol}; use another --out")
        fold_rank_files(out_file, parts, key, existing, order)
        return fresh

    # the other ranks read out_file once rank 0 has folded every rank's answers in
    recorded_now = shard.on_main(prepare)
    try:
        return _run_batches(lvlm, items, key, out_file, order, images_dir=images_dir, prompt=prompt, field=field,
                            mitigation=mitigation, settings=settings, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, protocol=protocol, progress=progress, sampling=sampling, shard=shard)
    except VsinkError:
        if shard.main and recorded_now:
            remove_unstarted(out_file)
        raise


def remove_unstarted(out_file: Path) -> None:
    """After a run refused before its first answer (a generation setting the model cannot take):
    remove the record it wrote, and its folder when nothing else is there, so that no record of a
    run that never ran is left (an answer of any rank keeps them)."""
    folder = out_file.parent
    if out_file.exists() or rank_files(out_file):
        return
    (folder / MANIFEST).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _run_batches(lvlm: LVLM, items: Sequence[dict[str, Any]], key: Key, out_file: Path, order: dict[str, int], *,
                 images_dir: Path, prompt: Callable[[dict[str, Any]], str], field: str, mitigation: str,
                 settings: Optional[dict[str, Any]], max_new_tokens: int, batch_size: int, protocol: str,
                 progress: bool, sampling: Optional[dict[str, Any]],
                 shard: Shard) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The batches of :func:`run_items` once its folder is ready (folded, its record written)."""
    import torch

    from ..lvlm import generate

    done = {key_of(row, key) for row in read_rows(out_file, key, report=False)} if out_file.exists() else set()
    todo = [it for it in items if key_of(it, key) not in done]
    target = out_file if shard.alone else shard.rank_file(out_file)
    mine = list(shard.batches(len(todo), batch_size))
    bar = tqdm(total=len(items) if shard.alone else sum(b - a for _, a, b in mine),
               initial=len(items) - len(todo) if shard.alone else 0, desc=f"{mitigation}", unit="item",
               disable=not progress or not shard.main)

    def work() -> list[dict[str, str]]:
        """This rank's batches, each appended to ``target`` when done; the items skipped."""
        skipped: list[dict[str, str]] = []
        for _, start, stop in mine:
            batch, images = [], []
            for item in todo[start:stop]:
                try:
                    images.append(load_image(member(images_dir, item["image"], f"{key} {key_of(item, key)}: image")))
                    batch.append(item)
                except VsinkError as e:
                    skipped.append({"item": str(key_of(item, key)), "reason": str(e)})
                    bar.write(f"vsink: skipped {e}", file=sys.stderr)
            if batch:
                inputs = lvlm.prepare(images, [prompt(it) for it in batch])
                with torch.random.fork_rng():
                    if sampling is not None:
                        torch.manual_seed(sampling_seed(sampling["seed"], key_of(batch[0], key)))
                    result = generate(lvlm, inputs, mitigation=mitigation, settings=settings, protocol=protocol,
                                      max_new_tokens=max_new_tokens,
                                      sampling=None if sampling is None else {k: sampling[k] for k in ("temperature", "top_p")})
                append_jsonl(target, [{**it, field: text.strip(), "protocol": protocol}
                                      for it, text in zip(batch, result.texts)], fsync=True)
            bar.update(stop - start)
        return skipped

    try:
        every = shard.settle(work)  # waits for every rank to finish its batches; an error on any stops all
    finally:
        bar.close()
    if every is None:
        return [], []
    skipped = every[0]
    if not shard.alone:
        ranked = {json.dumps(str(key_of(it, key))): i for i, it in enumerate(items)}  # skipped entries name str(key)
        skipped = sorted((s for part in every for s in part), key=lambda s: ranked.get(json.dumps(s["item"]), len(items)))
        fold_rank_files(out_file, rank_files(out_file), key,
                        read_rows(out_file, key, report=False) if out_file.exists() else [], order)
    return read_rows(out_file, key, report=False) if out_file.exists() else [], skipped


def row_ident(row: dict[str, Any], key: Key) -> str:
    """A row's key as one text: an integer and its decimal text are one key (as :func:`read_rows`
    reads them)."""
    value = key_of(row, key)
    return json.dumps([str(v) if isinstance(v, int) else v for v in (value if isinstance(value, tuple) else (value,))])


def rank_files(out_file: Path) -> list[Path]:
    """The per-rank files of a sharded run beside ``out_file`` (``answers.rank<N>.jsonl``), by rank."""
    found = [(int(m.group(1)), p) for p in out_file.parent.glob(f"{out_file.stem}.rank*{out_file.suffix}")
             if (m := re.fullmatch(rf"{re.escape(out_file.stem)}\.rank(\d+){re.escape(out_file.suffix)}", p.name))]
    return [p for _, p in sorted(found)]


def fold_rank_files(out_file: Path, parts: Sequence[Path], key: Key, existing: Sequence[dict[str, Any]],
          order: dict[str, int]) -> None:
    """Append the rows of the per-rank files ``parts`` that ``out_file`` lacks (its rows:
    ``existing``), in the order of the run's items (others after them, in file order), then remove
    the per-rank files. Appending before removing: a kill in between leaves rows in both, which
    the next fold finds already there."""
    if not parts:
        return
    seen = {row_ident(row, key) for row in existing}
    new = []
    for part in parts:
        for row in read_rows(part, key, report=False):
            if row_ident(row, key) not in seen:
                seen.add(row_ident(row, key))
                new.append(row)
    if new:
        new.sort(key=lambda row: order.get(row_ident(row, key), len(order)))  # stable: the others keep file order
        append_jsonl(out_file, new, fsync=True)
    for part in parts:
        part.unlink(missing_ok=True)


def read_rows(path: Path, key: Key, report: bool = True) -> list[dict[str, Any]]:
    """A runner's answers file, the first row of each ``key`` (a repeated key — two writers at once
    in an older vsink, or an edited file — is never scored twice; with ``report``, the repeats are
    counted in a warning). A several-field key (image and sample index) repeats only when all
    its fields do."""
    import warnings

    keys = (key,) if isinstance(key, str) else key
    required = tuple(k for k in keys if k != "sample")  # files of an older vsink have no sample: sample 0
    rows, seen, repeats = [], set(), 0
    for row in read_jsonl(path, required, fields={k: KEY_KINDS.get(k, QUESTION_ID) for k in keys},
                          cut_last_line=True):
        value = key_of(row, keys)
        ident = json.dumps([str(v) if isinstance(v, int) else v for v in value])
        if ident in seen:
            repeats += 1
            continue
        seen.add(ident)
        rows.append(row)
    if repeats and report:
        warnings.warn(f"{path}: {repeats} repeated {'/'.join(keys)} line(s) ignored; the first answer of each is scored",
                      VsinkWarning, stacklevel=2)
    return rows


def _interval(iv: Optional[dict[str, float]], scale: float) -> str:
    return "" if iv is None else f" [{iv['low'] * scale:.2f}, {iv['high'] * scale:.2f}]"


def _delta(cmp: Optional[dict[str, float]], scale: float) -> str:
    if cmp is None:
        return ""
    return f" (Δ {cmp['value'] * scale:+.2f} [{cmp['low'] * scale:+.2f}, {cmp['high'] * scale:+.2f}])"


def _table(names: list[str], rows: list[tuple[str, list[Optional[float]], list[Optional[dict[str, float]]],
                                              list[Optional[dict[str, float]]], int]]) -> str:
    """Markdown: each value with its interval; each later mitigation's difference from the first
    with the paired interval of the difference."""
    head = ["metric", names[0]] + [f"{n} (Δ vs {names[0]})" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values, intervals, deltas, scale in rows:
        cells = []
        for i, v in enumerate(values):
            if v is None:
                cells.append("—")
                continue
            delta = _delta(deltas[i], scale)
            if i and not delta and values[0] is not None:  # no paired interval: the plain difference
                delta = f" ({(v - values[0]) * scale:+.2f})"
            cells.append(f"{v * scale:.2f}{_interval(intervals[i], scale)}" + (delta if i else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


POPE_ROWS = (("accuracy", "accuracy (%)", 100), ("precision", "precision (%)", 100), ("recall", "recall (%)", 100),
             ("f1", "F1 (%)", 100), ("yes_ratio", "yes-ratio (%)", 100))
CHAIR_ROWS = (("chair_s", "CHAIR_s (%)", 100), ("chair_i", "CHAIR_i (%)", 100), ("recall", "recall (%)", 100),
              ("avg_len", "average length (words)", 1))


def _pope_rows(scores: dict[str, dict[str, Any]], comparisons: dict[str, Any]) -> list:
    names = list(scores)
    rows = []
    for split in sorted({s for sc in scores.values() for s in sc["splits"]}) + ["mean"]:
        def part(d: Optional[dict[str, Any]]) -> dict[str, Any]:
            return {} if d is None else (d.get("mean", {}) if split == "mean" else d.get("splits", {}).get(split, {}))

        for key, label, scale in POPE_ROWS:
            values = [(sc["mean"] if split == "mean" else sc["splits"].get(split, {})).get(key) for sc in scores.values()]
            intervals = [part(sc.get("intervals")).get(key) for sc in scores.values()]
            deltas = [None] + [part(comparisons.get(n)).get(key) for n in names[1:]]
            rows.append((f"{split} {label}", values, intervals, deltas, scale))
    return rows


def _chair_rows(scores: dict[str, dict[str, Any]], comparisons: dict[str, Any]) -> list:
    names = list(scores)
    return [(label, [sc[key] for sc in scores.values()], [sc.get("intervals", {}).get(key) for sc in scores.values()],
             [None] + [comparisons.get(n, {}).get(key) for n in names[1:]], scale)
            for key, label, scale in CHAIR_ROWS]


def save_results(out: Path, kind: str, protocol: dict[str, Any], scores: dict[str, dict[str, Any]],
                 skipped: dict[str, list[dict[str, str]]], statistics: Optional[Bootstrap] = None) -> dict[str, Path]:
    """``results.json``, ``results.md`` and ``results.html`` for POPE (``kind="pope"``), CHAIR or a
    benchmark of :mod:`vsink.evaluate.benchmarks` (``kind`` its name): every number with its
    bootstrap interval and every difference from the first mitigation with its paired interval
    (and, for POPE and the yes/no benchmarks, McNemar's exact test: :mod:`vsink.evaluate.hallucination_stats`,
    :mod:`vsink.evaluate.benchmark_stats`); ``statistics``: the bootstrap's settings (default
    :class:`~vsink.evaluate.stats.Bootstrap`)."""
    from .benchmark_stats import mcnemar_line
    from .hallucination_stats import chair_statistics, pope_statistics, statistics_line

    names = list(scores)
    settings = statistics or Bootstrap()
    if kind == "pope":
        stats = pope_statistics(scores, settings)
        for sc in scores.values():
            sc.pop("items", None)  # per-question outcomes: resampled above, too many to keep
        rows = _pope_rows(scores, stats["comparisons"])
    elif kind == "chair":
        stats = chair_statistics(scores, settings)
        rows = _chair_rows(scores, stats["comparisons"])
    else:
        from .benchmark_stats import benchmark_statistics

        stats = benchmark_statistics(kind, scores, settings)
        for sc in scores.values():
            sc.pop("items", None)  # per-question outcomes: resampled above, too many to keep
        rows = [(label, values, [sc["intervals"].get(label) for sc in scores.values()],
                 [None] + [stats["comparisons"][n].get(label) for n in names[1:]], scale)
                for label, values, scale in benchmark_rows(kind, scores)]
    comparisons = stats["comparisons"]
    md = [f"# vsink eval {kind}", ""]
    if protocol.get("synthetic"):
        md += ["**Synthetic demo LVLM**: its numbers say nothing about any real model.", ""]
    if kind == "chair" and "vocabulary" in protocol:
        md += [f"CHAIR vocabulary: `{protocol['vocabulary']}` (synonyms: {protocol['synonyms']})", ""]
    md += [f"Protocol: `{json.dumps(protocol)}`", ""]
    md += [statistics_line(stats["statistics"]), ""]
    md.append(_table(names, rows))
    for name, cmp in comparisons.items():
        test = cmp.get("mcnemar", {})
        test = test.get("all") if kind == "pope" else test
        if cmp.get("n") and test:
            md.append(mcnemar_line(name, names[0], test))
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
    summary = {"kind": kind, "protocol": protocol, "baseline": names[0], "results": scores, "skipped": skipped,
               "statistics": stats["statistics"], "comparisons": comparisons}
    from ..export.hallucination_report import hallucination_html

    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"  # made before any file is written
    page = hallucination_html(summary)
    determining = {"kind": kind, "protocol": protocol, "statistics": stats["statistics"]}
    with OutputSet(out, f"vsink eval {kind}", {"determining": determining}) as stage:
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
