"""``vsink eval pope``, ``vsink eval chair`` and ``vsink eval NAME`` for the benchmarks of
:mod:`vsink.evaluate.benchmarks`: score existing outputs, or run an LVLM with mitigations over the
benchmark (resumable) and score. The flags are declared in :mod:`vsink.parameters` (``POPE_RUN``,
``POPE``, ``CHAIR_RUN``, ``CHAIR``, ``benchmark_options``)."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any, Optional

from .errors import VsinkError
from .evaluate.stats import Bootstrap
from .io import write_jsonl
from .manifest import content_hash, file_sha256
from .wording import count


def _mitigation_settings(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, Any]]:
    from .cli_common import parse_settings
    from .lvlm.sinks import Calibration
    from .mitigate import calibrated_settings, mitigation_names

    parts = {n: mitigation_names(n) for n in names}  # "ttr+var" runs ttr and var together
    settings: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in parse_settings(args.set).items():
        part, dot, field = key.partition(".")
        runs = [n for n in names if part in parts[n]]
        if not dot or not runs:
            known = sorted({p for ps in parts.values() for p in ps})
            raise VsinkError(f"--set {key}=...: use MITIGATION.KEY with a mitigation of this run "
                             f"({', '.join(known) if known else 'this run has none'})")
        for n in runs:
            settings[n][key if len(parts[n]) > 1 else field] = value
    if args.sinks:
        calibration = Calibration.load(args.sinks)
        settings = {n: calibrated_settings(parts[n], settings[n], calibration) for n in names}
    return settings


def _require(args: argparse.Namespace, *names: str) -> None:
    """Refuse a run without the flags ``names`` (``images``: the positional IMAGE_DIR)."""
    missing = ["IMAGE_DIR" if n == "images" else f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
    if missing:
        raise VsinkError(f"running the model needs {', '.join(missing)}")


def run(args: argparse.Namespace) -> int:
    from .evaluate import chair as chair_mod
    from .evaluate import hallucination as hal
    from .evaluate import pope as pope_mod

    from .cli_common import image_dir_arg, shard_of

    args.images = image_dir_arg(args, "images_dir")
    out = Path(args.out)
    scoring_only = any(getattr(args, key, None) for key in ("answers", "generated", "build_only"))
    if not shard_of(args).main and (scoring_only or not args.model):
        return 0  # scoring a file or building questions under torchrun: rank 0 does it
    if args.eval_command not in ("pope", "chair"):
        return _run_benchmark(args, out)
    if args.new_run and (args.eval_command == "pope" and args.answers or args.eval_command == "chair" and args.generated):
        raise VsinkError("--new-run applies to runs of a model; scoring a file writes its results as one set")
    if args.eval_command == "pope":
        if args.answers:
            rows = pope_mod.read_answers(args.answers)
            scores = {"answers": pope_mod.score_answers(rows, args.parser)}
            protocol = {"answers": str(args.answers), "parser": args.parser}
            paths = hal.save_results(out, "pope", protocol, scores, {}, Bootstrap.from_args(args))
            return _report(paths)
        built = not args.questions
        if args.questions:
            questions = hal.load_questions(args.questions)
        else:
            _require(args, "annotations")
            questions = pope_mod.build_questions(args.annotations, splits=args.splits, num_images=args.num_images,
                                                 seed=args.seed)
            if args.build_only:
                write_jsonl(out / "questions.jsonl", questions)
                print(f"wrote {count(len(questions), 'question')} to {out / 'questions.jsonl'}")
                return 0
        items = questions[: args.limit] if args.limit else questions
        source = {"questions_file": file_sha256(args.questions)} if args.questions else \
            {"annotations_file": file_sha256(args.annotations)}
        inputs = {"splits": sorted({q["split"] for q in questions}), "questions": content_hash(questions), **source,
                  "parser": args.parser}
        return _run_model(args, out, "pope", items, "question_id", "answer",
                          lambda it: args.prompt.format(question=it["text"]),
                          lambda rows: pope_mod.score_answers(rows, args.parser),
                          hal.pope_protocol(args.prompt, args.max_new_tokens, args.parser, args.seed, items, {}),
                          inputs, {"questions.jsonl": questions} if built else {})
    _require(args, "annotations")
    vocab = chair_mod.load_vocabulary(args.vocabulary, args.synonyms)
    truth = chair_mod.ground_truth(args.annotations, args.captions, vocab)
    scoring = {"annotations": str(args.annotations), "captions": str(args.captions) if args.captions else None,
               "vocabulary": vocab.name, "synonyms": vocab.source}
    if args.generated:
        rows = chair_mod.read_generated(args.generated)
        scores = {"generated": chair_mod.score_captions(rows, truth, str(args.generated), vocab)}
        protocol = {"generated": str(args.generated), **scoring}
        return _report(hal.save_results(out, "chair", protocol, scores, {}, Bootstrap.from_args(args)))
    if args.samples_per_image == 1 and (args.temperature != 1.0 or args.top_p != 1.0):
        raise VsinkError("--temperature and --top-p apply to sampled captions (--samples-per-image 2 or more); "
                         "one caption per image is decoded greedily")
    images = _chair_images(args.annotations, args.num_images, args.seed)
    chosen = images[: args.limit] if args.limit else images
    items = [{**it, "sample": s} for it in chosen for s in range(args.samples_per_image)]
    protocol = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "greedy": args.samples_per_image == 1, "images": [it["image"] for it in chosen], **scoring}
    inputs: dict[str, Any] = {"images": content_hash(images), "annotations_file": file_sha256(args.annotations),
                              "captions_file": file_sha256(args.captions) if args.captions else None,
                              "vocabulary": vocab.name, "synonyms": vocab.source}
    sampling = None
    if args.samples_per_image > 1:
        sampling = {"seed": args.seed, "temperature": args.temperature, "top_p": args.top_p}
        protocol.update(samples_per_image=args.samples_per_image, sampling=sampling)
        inputs.update(samples_per_image=args.samples_per_image, sampling=sampling)
    return _run_model(args, out, "chair", items, ("image_id", "sample"), "caption", lambda it: args.prompt,
                      lambda rows: chair_mod.score_captions(rows, truth, vocabulary=vocab), protocol,
                      inputs, sampling=sampling)


def _run_benchmark(args: argparse.Namespace, out: Path) -> int:
    """``vsink eval NAME`` for a benchmark of :mod:`vsink.evaluate.benchmarks`: score --answers, or
    run the model over the items of --data."""
    from .evaluate import hallucination as hal
    from .evaluate.benchmarks import get, read_answers

    bench = get(args.eval_command)
    settings = {o.key: getattr(args, o.key) for o in bench.options}
    scoring = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
               "comparable": bench.comparable}
    settings["data"] = args.data
    score = bench.scorer(settings)
    if args.answers:
        if args.new_run:
            raise VsinkError("--new-run applies to runs of a model; scoring a file writes its results as one set")
        rows = read_answers(bench, args.answers)
        protocol = {"answers": str(args.answers), **scoring}
        return _report(hal.save_results(out, bench.name, protocol, {"answers": score(rows)}, {},
                                        Bootstrap.from_args(args)))
    _require(args, "data")
    items = bench.read_items(args.data, settings)
    if not args.images:
        args.images = str(Path(args.data) if Path(args.data).is_dir() else Path(args.data).parent)
    chosen = bench.limit(items, args.limit) if args.limit else items
    protocol = {"data": str(args.data), "prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "greedy": True,
                "items": len(chosen), "images": sorted({it["image"] for it in chosen}), **scoring}
    return _run_model(args, out, bench.name, chosen, bench.key, bench.field,
                      lambda it: args.prompt.format(question=it["question"]), score, protocol,
                      {"items": content_hash(items), **_benchmark_files(bench, args.data, settings),
                       **{k: v for k, v in scoring.items() if k != "comparable"}})


def _benchmark_files(bench, data: str, settings: dict[str, Any]) -> dict[str, Optional[str]]:
    """The bytes of what makes or scores a benchmark's answers, for the run record: the data file
    (or the data folder's files the benchmark names) and every file option (annotations, captions)."""
    from .manifest import files_fingerprint

    path = Path(data)
    files = {"data_file": file_sha256(path) if path.is_file() else files_fingerprint(path, bench.data_files(settings))}
    for option in bench.options:
        value = settings.get(option.key)
        if value is not None and Path(str(value)).is_file():
            files[f"{option.key}_file"] = file_sha256(value)
    return files


def _chair_images(annotations: str, num_images: int, seed: int) -> list[dict[str, Any]]:
    from .evaluate.coco import read_coco_objects

    files = read_coco_objects(annotations).files
    ids = sorted(random.Random(seed).sample(sorted(files), min(num_images, len(files))))
    return [{"image_id": i, "image": files[i]} for i in ids]


def _run_model(args: argparse.Namespace, out: Path, kind: str, items: list[dict[str, Any]], key, field: str,
               prompt, score, protocol: dict[str, Any], inputs: dict[str, Any],
               written: Optional[dict[str, list]] = None, sampling: Optional[dict[str, Any]] = None) -> int:
    """Run every mitigation over ``items`` into ``out`` (or, with --new-run, a fresh folder when
    ``out`` holds a run made otherwise), holding the folder's lock, then score. ``inputs``: what
    identifies the whole question or image list (before --limit) and the files and settings that
    make or score the answers, for the run record; the bytes of the images ``items`` use, the
    images folder, --limit and --batch-size are added here. ``key``: the field(s) identifying an
    item (:func:`vsink.evaluate.hallucination.key_of`); ``sampling``: sample instead of decoding
    greedily."""
    from .cli_common import load_lvlm_for, setting_files, shard_of
    from .evaluate import hallucination as hal
    from .manifest import StaleRun, check_resume, files_fingerprint, fresh_folder, weights_fingerprint
    from .mitigate import make_mitigations
    from .outputs import RunLock
    from .version import __version__

    _require(args, "model", "images")
    names = args.mitigation
    settings = _mitigation_settings(args, names)
    resolved = {name: make_mitigations(name, settings[name], args.protocol) for name in names}  # fail before loading
    lvlm = load_lvlm_for(args)
    protocol = {**protocol, "model": args.model, "synthetic": lvlm.synthetic, "settings": settings,
                "mitigation_protocol": args.protocol,
                "resolved_settings": {name: _resolved(mits) for name, mits in resolved.items()}}
    common = {"kind": kind, "model": args.model, "weights": weights_fingerprint(lvlm.model),
              "protocol": args.protocol, "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
              "decoding": "sampled" if sampling else "greedy", **inputs,
              "images_dir": str(Path(args.images).resolve()),
              "image_bytes": files_fingerprint(args.images, list(dict.fromkeys(it["image"] for it in items))),
              "limit": args.limit, "batch_size": args.batch_size, "vsink_version": __version__}
    determining = {name: {**common, "mitigation": name, "settings": settings[name],
                          "resolved_settings": protocol["resolved_settings"][name],
                          "setting_files": setting_files(settings[name])} for name in names}
    files = {name: out / name / ("generated.jsonl" if field == "caption" else "answers.jsonl") for name in names}

    def folder() -> Path:
        try:
            for name in names:
                # a damaged file is named first; repeated answers are reported by the run below
                if files[name].exists() and hal.read_rows(files[name], key, report=False):
                    check_resume(files[name].parent, determining[name], f"the answers in {files[name].name}")
        except StaleRun:
            if not args.new_run:
                raise
            fresh = fresh_folder(out)
            print(f"vsink: {args.out} holds a run made with other settings; this run writes {fresh}", file=sys.stderr)
            return fresh
        return out

    shard = shard_of(args)
    out = shard.on_main(folder)
    command = f"vsink eval {kind}"
    lock = RunLock(out, command)  # rank 0 holds it for every rank
    shard.on_main(lambda: lock.__enter__() and None)
    try:
        if shard.main:
            for name, rows in (written or {}).items():
                write_jsonl(out / name, rows)
        scores, skipped = {}, {}
        for name in names:
            rows, skipped[name] = hal.run_items(
                lvlm, items, key, out / name / files[name].name,
                images_dir=Path(args.images), prompt=prompt, field=field, mitigation=name, settings=settings[name],
                protocol=args.protocol, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                progress=not args.no_progress, determining=determining[name], command=command, sampling=sampling,
                shard=shard)
            if not shard.main:
                continue
            wanted = {hal.key_of(it, key) for it in items}
            rows = [r for r in rows if hal.key_of(r, key) in wanted]
            if not rows:
                raise VsinkError(f"{name}: no item could be run (first problem: "
                                 f"{skipped[name][0]['reason'] if skipped[name] else 'none'})")
            scores[name] = score(rows)
        return _report(hal.save_results(out, kind, protocol, scores, skipped, Bootstrap.from_args(args))) if shard.main else 0
    finally:
        if shard.main:
            lock.__exit__(None, None, None)



def _resolved(mitigations: list) -> Optional[dict[str, Any]]:
    """Settings as used: one mitigation's dict, several keyed by name, None for none."""
    if len(mitigations) == 1:
        return mitigations[0].settings_dict()
    return {m.name: m.settings_dict() for m in mitigations} or None


def _report(paths: dict[str, Path]) -> int:
    print(paths["markdown"].read_text())
    for p in paths.values():
        print(f"wrote {p}", file=sys.stderr)
    return 0
