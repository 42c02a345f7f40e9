"""``vsink generate`` over many images: batches, resumable rows and ``torchrun``'s processes.

The items (image ``i`` with prompt ``i``) are cut into batches of ``batch_size`` consecutive items
(default: every item in one left-padded batch, what ``vsink generate`` always ran). With ``out``,
each item's text is a row of ``OUT/generated.jsonl`` (``item``, ``image``, ``prompt``, ``text``,
``protocol``), appended as soon as its batch is done, and ``OUT/vsink-run.json`` records what
determines the texts (:mod:`vsink.manifest`); the same command again generates only the batches
with an item missing, so the batches are those of an uninterrupted run and so are the texts. A run
refused before its first text leaves no record.

Under ``torchrun`` (``shard``, :mod:`vsink.shard`) the batches to run are dealt to the ranks in
turn; each rank appends its rows to its own ``generated.rank<R>.jsonl`` (with ``out``) and writes
its batches' attention rows (``export_attention``) into rank 0's staging folder; rank 0 folds the
rank files into ``generated.jsonl`` in item order, when the run ends and when the next one starts
(a run killed on any rank resumes where each rank stopped), and returns every row in item order
and every batch's report in batch order: what one process returns.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from tqdm.auto import tqdm

from ..backbones.hf_lvlm import LVLM
from ..errors import VsinkError
from ..io import append_jsonl
from ..shard import RankFailed, Shard

#: the file of the texts in ``out``
TEXTS = "generated.jsonl"
KEY = "item"


@dataclass
class BatchReport:
    """What generate reported for one batch: items ``start`` .. ``stop - 1``, batch ``number``."""

    number: int
    start: int
    stop: int
    report: list[dict[str, Any]]
    warnings: list[str]


@dataclass
class GenerateRun:
    """Every item's row in item order; the reports of the batches run this time, in batch order;
    how many items' rows an earlier run had written; the attention files exported."""

    rows: list[dict[str, Any]]
    batches: list[BatchReport]
    resumed: int = 0
    exported: list[Path] = field(default_factory=list)
    count: int = 0  # batches in all


def image_fingerprint(images: Sequence[Any]) -> str:
    """One identity of the images' pixels (mode, size and bytes of each, in order)."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}|{image.size}|".encode())
        digest.update(image.tobytes())
    return "sha256:" + digest.hexdigest()


def run_generate(lvlm: LVLM, images: Sequence[Any], names: Sequence[str], prompts: Sequence[str], *,
                 mitigation: str, settings: Optional[Mapping[str, Any]], protocol: str, max_new_tokens: int,
                 use_cache: bool = True, batch_size: Optional[int] = None, out: Optional[Path] = None,
                 determining: Optional[Mapping[str, Any]] = None, export_attention: Optional[Path] = None,
                 export_settings: Any = None, progress: bool = False,
                 shard: Optional[Shard] = None) -> Optional[GenerateRun]:
    """Generate every item (see the module docstring); rank 0 returns the run, the other ranks
    ``None``. ``determining``: the record of ``out`` (checked against an earlier run's before any
    of its rows is reused). ``export_attention``: write every item's attention on the image there
    as one set (every batch is then run again, rows already written kept); ``export_settings``: the
    settings the export records. A :class:`~vsink.errors.VsinkError` on any rank stops every rank
    (rank 0 raises the first in batch order, naming its rank under torchrun, the others
    :class:`~vsink.shard.OtherRankFailed`), and so does any other error of a rank's batches
    (:meth:`~vsink.shard.Shard.settle`). A run refused before its first text leaves no record, nor
    the ``out`` folder when it made it."""
    from ..evaluate.hallucination import row_ident

    shard = shard or Shard()
    total = len(images)
    size = batch_size or total
    cuts = [(b, start, min(start + size, total)) for b, start in enumerate(range(0, total, size))]
    texts = out / TEXTS if out is not None else None
    order = {row_ident({KEY: i}, KEY): i for i in range(total)}
    made = out is not None and shard.main and not out.exists()  # a refused run removes the folder it made
    try:
        return _run(lvlm, images, names, prompts, cuts, texts, order, mitigation=mitigation, settings=settings,
                    protocol=protocol, max_new_tokens=max_new_tokens, use_cache=use_cache, out=out,
                    determining=determining, export_attention=export_attention, export_settings=export_settings,
                    progress=progress, shard=shard)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run(lvlm: LVLM, images: Sequence[Any], names: Sequence[str], prompts: Sequence[str],
         cuts: list[tuple[int, int, int]], texts: Optional[Path], order: dict[str, int], *,
         mitigation: str, settings: Optional[Mapping[str, Any]], protocol: str, max_new_tokens: int, use_cache: bool,
         out: Optional[Path], determining: Optional[Mapping[str, Any]], export_attention: Optional[Path],
         export_settings: Any, progress: bool, shard: Shard) -> Optional[GenerateRun]:
    """:func:`run_generate` once its batches are cut."""
    from ..evaluate.hallucination import fold_rank_files, rank_files, read_rows, remove_unstarted, row_ident
    from ..manifest import check_resume, write_record
    from ..outputs import OutputSet, RunLock, read_manifest
    from .export import attention_record

    total = len(images)
    holder: dict[str, Any] = {}
    with ExitStack() as stack:
        def prepare() -> bool:
            """Rank 0: take the folders, fold earlier rank files in, check or write the record;
            whether it wrote the record (no earlier rows)."""
            earlier: list[dict[str, Any]] = []
            if texts is not None:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(RunLock(out, "vsink generate"))
                other = (read_manifest(out) or {}).get("command", "vsink generate")
                if other != "vsink generate":
                    raise VsinkError(f"--out {out} holds the outputs of {other}; give a folder of its own")
                parts = rank_files(texts)
                existing = read_rows(texts, KEY) if texts.exists() else []
                earlier = existing + [row for part in parts for row in read_rows(part, KEY, report=False)]
                if earlier:
                    check_resume(out, determining or {}, f"the texts in {TEXTS}", "or use another --out")
                fold_rank_files(texts, parts, KEY, existing, order)
                if not earlier:
                    write_record(out, "vsink generate", determining or {}, [TEXTS])
            if export_attention is not None:
                holder["set"] = OutputSet(export_attention, "vsink generate --export-attention")
                holder["stage"] = stack.enter_context(holder["set"])
            return texts is not None and not earlier

        fresh = shard.on_main(prepare)
        stage = shard.broadcast(holder.get("stage"))
        done = ({int(row[KEY]) for row in read_rows(texts, KEY, report=False)}
                if texts is not None and texts.exists() else set())
        todo = [c for c in cuts if export_attention is not None or any(i not in done for i in range(c[1], c[2]))]
        mine = [c for j, c in enumerate(todo) if j % shard.world == shard.rank]
        target = None if texts is None else (texts if shard.alone else shard.rank_file(texts))
        parts = shard.settle(lambda: _run_mine(
            lvlm, images, names, prompts, mine, done, target, stage, mitigation=mitigation, settings=settings,
            protocol=protocol, max_new_tokens=max_new_tokens, use_cache=use_cache, progress=progress and shard.main))

        def finish() -> None:
            """Rank 0: fold the rank files, raise the first error, else gather the run."""
            if texts is not None and not shard.alone:
                fold_rank_files(texts, rank_files(texts), KEY, read_rows(texts, KEY, report=False)
                                if texts.exists() else [], order)
            errors = sorted((number, rank, why) for rank, p in enumerate(parts) for number, why in p["errors"])
            if errors:
                if fresh:
                    remove_unstarted(texts)
                _, rank, why = errors[0]
                raise VsinkError(why) if shard.alone else RankFailed(rank, why)
            if texts is not None:
                rows = read_rows(texts, KEY, report=False)
            else:
                rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r[KEY])
            rows.sort(key=lambda r: order.get(row_ident(r, KEY), total))
            if "set" in holder:
                holder["set"].manifest = {"determining": attention_record(lvlm, mitigation, protocol,
                                                                          export_settings, total)}
            holder["run"] = GenerateRun(
                rows=rows, batches=sorted((b for p in parts for b in p["batches"]), key=lambda b: b.number),
                resumed=len(done), count=len(cuts),
                exported=sorted((export_attention / Path(f).relative_to(stage) for p in parts for f in p["files"]),
                                key=_natural))

        shard.on_main(finish)
    return holder.get("run")


def _natural(path: Path) -> tuple:
    """``row2`` before ``row10``: the number in the first part of an exported path."""
    head = path.parts[-2] if path.suffix == ".png" else path.stem
    return (int(head.removeprefix("row")) if head.removeprefix("row").isdigit() else -1, path.suffix != ".npz",
            str(path))


def _run_mine(lvlm: LVLM, images: Sequence[Any], names: Sequence[str], prompts: Sequence[str],
              mine: Sequence[tuple[int, int, int]], done: set, target: Optional[Path], stage: Optional[Path], *,
              mitigation: str, settings: Optional[Mapping[str, Any]], protocol: str, max_new_tokens: int,
              use_cache: bool, progress: bool) -> dict[str, list]:
    """This rank's batches: rows appended to ``target`` (or kept), attention rows written into
    ``stage``; the first :class:`VsinkError` ends the rank's work and is returned with its batch."""
    from .export import write_attention_rows
    from .generate import generate

    part: dict[str, list] = {"rows": [], "batches": [], "files": [], "errors": []}
    bar = tqdm(total=sum(stop - start for _, start, stop in mine), desc="generate", unit="item",
               disable=not progress or len(mine) < 2)  # one batch: generate's bar over the decoding steps
    try:
        for number, start, stop in mine:
            inputs = lvlm.prepare(list(images[start:stop]), list(prompts[start:stop]))
            result = generate(lvlm, inputs, mitigation=mitigation, settings=dict(settings or {}), protocol=protocol,
                              max_new_tokens=max_new_tokens, use_cache=use_cache, capture_attention=stage is not None,
                              progress=progress and len(mine) == 1)
            rows = [{KEY: i, "image": names[i], "prompt": prompts[i], "text": text, "protocol": protocol}
                    for i, text in zip(range(start, stop), result.texts) if i not in done]
            if target is not None:
                if rows:
                    append_jsonl(target, rows, fsync=True)
            else:
                part["rows"] += rows
            part["batches"].append(BatchReport(number, start, stop, result.report, result.warnings))
            if stage is not None:
                files = write_attention_rows(lvlm, result, inputs, stage, images[start:stop],
                                             names=[Path(n).name for n in names[start:stop]], first=start)
                part["files"] += [str(f) for f in files]
            del result, inputs
            bar.update(stop - start)
    except VsinkError as e:
        part["errors"].append((number, str(e)))
    finally:
        bar.close()
    return part


__all__ = ["BatchReport", "GenerateRun", "KEY", "TEXTS", "image_fingerprint", "run_generate"]
