"""The hallucination benchmarks that ``vsink eval NAME`` runs and scores offline, as one table:
each :class:`Benchmark` names its reader of the official data, its answers-file fields, its
default prompt and generation length, its scorer and the metric rows of its report. The
resumable runner (:mod:`vsink.evaluate.hallucination`), the command (:mod:`vsink.cli_hallucination`)
and the report (:mod:`vsink.export.hallucination_report`) look a benchmark up here by name, so a new
benchmark is a new module and one line in :data:`MODULES`."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from ..errors import VsinkError
from ..options import Kind, Option

PathLike = Union[str, os.PathLike]

#: benchmark name → module defining ``BENCHMARK``
MODULES = {"mme": "vsink.evaluate.mme", "hallusionbench": "vsink.evaluate.hallusionbench",
           "object-halbench": "vsink.evaluate.object_halbench", "amber": "vsink.evaluate.amber"}


@dataclass(frozen=True)
class Metric:
    """One row of a report: ``value`` shown × ``scale`` with 2 decimals; ``lower_is_better``
    colours deltas (None: neither direction is better)."""

    label: str
    value: Optional[float]
    scale: float = 100
    lower_is_better: Optional[bool] = False


@dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    ``read_items(data, settings)``: the items of the official data (each with the ``key``,
    ``image`` relative to the image directory and ``question``, the text put into ``prompt``);
    ``answer_fields``: the fields an answers file to score must carry (with their kinds);
    ``scorer(settings)``: a function of the answered rows returning the scores; ``metrics(scores)``:
    the report's rows; ``limit(items, n)``: the first ``n`` items as the benchmark counts them
    (MME: whole image pairs); ``comparable``: what its numbers can be compared with (recorded in
    every result); ``units(scores)``: the resampling units of the scores, for their intervals and
    paired comparisons (:class:`Units`); ``details(scores)``: extra report tables (title, header,
    rows); ``options``: its own command-line options (their values are the ``settings`` given to the reader and the
    scorer, and are recorded); ``from_lmms_eval(doc, response, doc_id)``: an answers row from one
    sample of lmms-eval's task for this benchmark (None: a sample outside it), where there is one;
    ``data_files(settings)``: the files of a data folder that make or score the answers (their
    bytes go into a run's record)."""

    name: str
    title: str
    read_items: Callable[[PathLike, dict[str, Any]], list[dict[str, Any]]]
    answer_fields: dict[str, Kind]
    scorer: Callable[[dict[str, Any]], Callable[[Sequence[dict[str, Any]]], dict[str, Any]]]
    metrics: Callable[[dict[str, Any]], list[Metric]]
    prompt: str
    max_new_tokens: int
    comparable: str
    units: Callable[[dict[str, Any]], "Units"]
    key: str = "question_id"
    field: str = "answer"
    limit: Callable[[list[dict[str, Any]], int], list[dict[str, Any]]] = lambda items, n: items[:n]
    details: Optional[Callable[[dict[str, Any]], list[tuple[str, list[str], list[list[str]]]]]] = None
    options: tuple[Option, ...] = ()
    from_lmms_eval: Optional[Callable[[dict[str, Any], str, Any], Optional[dict[str, Any]]]] = None
    data_files: Callable[[dict[str, Any]], tuple[str, ...]] = lambda settings: ()


@dataclass(frozen=True)
class Units:
    """What a benchmark's bootstrap resamples (:mod:`vsink.evaluate.benchmark_stats`): ``unit``
    names one row (``image``, ``question``, ...); ``keys`` identify the rows (pairing them across
    mitigations); ``rows`` (``[units, columns]``) hold each unit's counts; ``statistic`` maps column
    sums to the values of the report rows ``labels`` (the :class:`Metric` labels, in their units);
    ``correct``: right/wrong per question, by question key, for McNemar's exact test (yes/no
    benchmarks; None otherwise)."""

    unit: str
    keys: list[str]
    rows: Any
    labels: list[str]
    statistic: Callable[[Any], Any]
    correct: Optional[dict[str, bool]] = None


def get(name: str) -> Benchmark:
    """The benchmark called ``name``."""
    if name not in MODULES:
        raise VsinkError(f"unknown benchmark {name!r}; known: {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).BENCHMARK


def read_answers(bench: Benchmark, path: PathLike) -> list[dict[str, Any]]:
    """An answers JSONL to score: rows with :attr:`Benchmark.answer_fields` (each key once), or
    the samples lmms-eval writes with ``--log_samples`` for the benchmark's task (lines with
    ``doc`` and ``filtered_resps``), converted row by row."""
    from ..io import read_jsonl
    from ..readers import ReadError, checked_field

    first = read_jsonl(path)[:1]
    if not (first and "doc" in first[0] and "filtered_resps" in first[0]):
        return read_jsonl(path, tuple(bench.answer_fields), fields=bench.answer_fields, unique=bench.key)
    if bench.from_lmms_eval is None:
        raise ReadError(f"{path}: lmms-eval samples; lmms-eval has no {bench.title} task that vsink reads")
    rows, seen = [], set()
    for n, sample in enumerate(read_jsonl(path, ("doc", "filtered_resps")), 1):
        doc, resps = sample["doc"], sample["filtered_resps"]
        while isinstance(resps, list) and resps:
            resps = resps[0]
        if not isinstance(doc, dict) or not isinstance(resps, str):
            raise ReadError(f"{path}:{n}: an lmms-eval sample needs 'doc' (an object) and 'filtered_resps' (the "
                            "generated text)")
        try:
            row = bench.from_lmms_eval(doc, resps, sample.get("doc_id", n))
        except KeyError as e:
            raise ReadError(f"{path}:{n}: doc: missing field {e}") from None
        if row is None:
            continue
        for key, kind in bench.answer_fields.items():
            checked_field(row, key, kind, f"{path}:{n}: doc")
        if str(row[bench.key]) in seen:
            raise ReadError(f"{path}:{n}: {bench.key} {row[bench.key]} repeats an earlier sample")
        seen.add(str(row[bench.key]))
        rows.append(row)
    if not rows:
        raise ReadError(f"{path}: no lmms-eval sample of the {bench.title} questions")
    return rows
