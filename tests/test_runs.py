"""Run folders: the run record (vsink-run.json) and stale-run refusal for each field that
determines a resumable run's answers, one writer per folder, answers never scored twice, outputs
replaced as one set (interrupted, killed, out of space, a swap cut short), vsink's outputs never
read as inputs, and output targets refused before any work."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vsink.errors import VsinkError

CLASSES = ["apple", "bird", "car", "dog", "elephant", "fork", "horse", "orange", "person", "umbrella"]
OBJECTS = {1: ["person", "dog", "car"], 2: ["person", "dog", "horse", "umbrella"], 3: ["apple", "orange", "fork"],
           4: ["person", "car", "bird"]}
ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _vsink(*args, **kwargs):
    kwargs.setdefault("env", _env())
    return subprocess.Popen([sys.executable, "-m", "vsink.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaVA saved to disk, four random images and their COCO annotations."""
    from vsink.data.demo_lvlm import build_tiny_llava

    root = tmp_path_factory.mktemp("runs")
    model, processor = build_tiny_llava()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    other, _ = build_tiny_llava(seed=1)  # same architecture, other weights
    other.save_pretrained(root / "other")
    processor.save_pretrained(root / "other")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in OBJECTS:
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / "images" / f"img{i}.jpg")
    data = {"categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
            "images": [{"id": i, "file_name": f"img{i}.jpg"} for i in OBJECTS],
            "annotations": [{"image_id": i, "category_id": CLASSES.index(c) + 1, "bbox": [0, 0, 1, 1]}
                            for i, objs in OBJECTS.items() for c in objs]}
    (root / "instances.json").write_text(json.dumps(data))
    return root


def _pope(tiny, out, *extra, model="model"):
    return ["eval", "pope", str(tiny / "images"), "--model", str(tiny / model), "--annotations",
            str(tiny / "instances.json"), "--num-images", "1", "--splits", "random", "--max-new-tokens", "1",
            "--batch-size", "6", "--no-progress", "--out", str(out), *extra]


def _chair(tiny, out, *extra):
    return ["eval", "chair", str(tiny / "images"), "--model", str(tiny / "model"), "--annotations",
            str(tiny / "instances.json"), "--num-images", "1", "--max-new-tokens", "1", "--no-progress",
            "--out", str(out), *extra]


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _refused(capsys, code, *fields):
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("vsink: error: ") and "were made with other settings" in line, err
    for field in fields:
        assert f"{field}: " in line, line
    assert "Traceback" not in err
    return line


def test_pope_record_and_refusal_of_each_field(tiny, tmp_path, capsys, monkeypatch):
    from vsink.cli import main

    out = tmp_path / "pope"
    assert main(_pope(tiny, out, "--mitigation", "none,pai", "--set", "pai.alpha=0.5")) == 0
    record = json.loads((out / "pai" / "vsink-run.json").read_text())["determining"]
    assert record["model"] == str(tiny / "model") and record["weights"].startswith("sha256:")
    assert record["mitigation"] == "pai" and record["settings"] == {"alpha": 0.5}
    assert record["resolved_settings"]["alpha"] == 0.5 and record["protocol"] == "paper"
    assert record["splits"] == ["random"] and record["max_new_tokens"] == 1 and record["prompt"].startswith("{question}")
    answers = _lines(out / "pai" / "answers.jsonl")
    capsys.readouterr()
    # the same run again resumes: nothing is generated twice
    assert main(_pope(tiny, out, "--mitigation", "none,pai", "--set", "pai.alpha=0.5")) == 0
    assert _lines(out / "pai" / "answers.jsonl") == answers
    # each field that determines the answers, changed alone, is refused and named with old → new
    line = _refused(capsys, main(_pope(tiny, out, "--mitigation", "pai", "--set", "pai.alpha=0.6")),
                    "settings", "resolved_settings")
    assert '{"alpha": 0.5} → {"alpha": 0.6}' in line
    line = _refused(capsys, main(_pope(tiny, out, "--splits", "popular")), "splits", "questions")
    assert '["random"] → ["popular"]' in line
    line = _refused(capsys, main(_pope(tiny, out, "--max-new-tokens", "2")), "max_new_tokens")
    assert "max_new_tokens: 1 → 2" in line and "prompt:" not in line
    _refused(capsys, main(_pope(tiny, out, "--prompt", "{question} Answer yes or no.")), "prompt")
    _refused(capsys, main(_pope(tiny, out, "--protocol", "official")), "protocol")
    _refused(capsys, main(_pope(tiny, out, "--seed", "3", "--num-images", "2")), "questions")
    # another model, and the same path holding other weights: the fingerprint tells them apart
    _refused(capsys, main(_pope(tiny, out, model="other")), "model", "weights")
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny / "model", swapped)
    argv = _pope(tiny, tmp_path / "weights_only")
    argv[argv.index("--model") + 1] = str(swapped)
    assert main(argv) == 0
    shutil.copy(tiny / "other" / "model.safetensors", swapped / "model.safetensors")
    capsys.readouterr()
    line = _refused(capsys, main(argv), "weights")
    assert "model: " not in line  # the same path, other weights
    # another vsink version
    import vsink.version

    monkeypatch.setattr(vsink.version, "__version__", "999.0")
    line = _refused(capsys, main(_pope(tiny, out)), "vsink_version")
    assert '→ "999.0"' in line
    monkeypatch.undo()
    # the refused runs changed nothing
    assert _lines(out / "pai" / "answers.jsonl") == answers


def test_a_settings_file_changed_in_place_is_refused(tiny, tmp_path, capsys):
    """A mitigation setting that names a file (ttr.neurons) determines the answers by the file's
    bytes, not its path: the same path with other neurons must not resume the earlier answers."""
    from vsink.cli import main

    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"model": "tiny", "neurons": [{"layer": 0, "neuron": 1, "score": 2.0}]}))
    out = tmp_path / "pope"
    argv = _pope(tiny, out, "--mitigation", "ttr", "--set", f"ttr.neurons={neurons}")
    assert main(argv) == 0
    answers = _lines(out / "ttr" / "answers.jsonl")
    capsys.readouterr()
    neurons.write_text(json.dumps({"model": "tiny", "neurons": [{"layer": 0, "neuron": 3, "score": 2.0}]}))
    _refused(capsys, main(argv), "setting_files")
    assert _lines(out / "ttr" / "answers.jsonl") == answers


def test_chair_prompt_and_max_new_tokens_are_refused_and_new_run_goes_elsewhere(tiny, tmp_path, capsys):
    from vsink.cli import main

    out = tmp_path / "chair"
    assert main(_chair(tiny, out)) == 0
    captions = _lines(out / "none" / "generated.jsonl")
    capsys.readouterr()
    line = _refused(capsys, main(_chair(tiny, out, "--prompt", "Describe every object.")), "prompt")
    assert '"Please describe this image in detail." → "Describe every object."' in line
    _refused(capsys, main(_chair(tiny, out, "--max-new-tokens", "3")), "max_new_tokens")
    # --new-run: the run goes to OUT-2, OUT is left as it was
    assert main(_chair(tiny, out, "--prompt", "Describe every object.", "--new-run")) == 0
    assert "this run writes" in capsys.readouterr().err
    moved = tmp_path / "chair-2"
    assert json.loads((moved / "results.json").read_text())["protocol"]["prompt"] == "Describe every object."
    assert json.loads((out / "results.json").read_text())["protocol"]["prompt"].startswith("Please")
    assert _lines(out / "none" / "generated.jsonl") == captions
    # answers an older vsink left without a record are not reused
    (out / "none" / "vsink-run.json").unlink()
    code = main(_chair(tiny, out))
    err = capsys.readouterr().err
    assert code == 2 and "have no record of what made them" in err


def _with(argv, flag, value):
    """``argv`` with ``flag``'s value (or, for ``IMAGE_DIR``, the image folder) replaced."""
    argv = list(argv)
    argv[2 if flag == "IMAGE_DIR" else argv.index(flag) + 1] = str(value)
    return argv


def test_pope_records_input_bytes_folder_limit_batch_size_and_parser(tiny, tmp_path, capsys):
    """The images' bytes, the images folder, --limit, --batch-size, --parser and the questions'
    source file each determine a POPE run: each, changed alone, is refused and named."""
    from vsink.cli import main
    from vsink.manifest import content_hash, file_sha256

    images = tmp_path / "images"
    shutil.copytree(tiny / "images", images)
    out = tmp_path / "pope"
    argv = _with(_pope(tiny, out, "--limit", "4"), "IMAGE_DIR", images)
    assert main(argv) == 0
    record = json.loads((out / "none" / "vsink-run.json").read_text())["determining"]
    asked = {r["image"] for r in _lines(out / "none" / "answers.jsonl")}  # the one image of the 4 questions
    assert record["image_bytes"] == content_hash({name: file_sha256(images / name) for name in asked})
    assert record["images_dir"] == str(images.resolve()) and record["limit"] == 4 and record["batch_size"] == 6
    assert record["parser"] == "official" and record["annotations_file"] == file_sha256(tiny / "instances.json")
    answers = _lines(out / "none" / "answers.jsonl")
    capsys.readouterr()
    assert main(argv) == 0  # the same run resumes
    capsys.readouterr()
    assert "limit: 4 → 5" in _refused(capsys, main(_with(argv, "--limit", 5)), "limit")
    assert "batch_size: 6 → 2" in _refused(capsys, main(_with(argv, "--batch-size", 2)), "batch_size")
    assert 'parser: "official" → "strict"' in _refused(capsys, main(argv + ["--parser", "strict"]), "parser")
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)  # the same bytes in another folder
    line = _refused(capsys, main(_with(argv, "IMAGE_DIR", moved)), "images_dir")
    assert "image_bytes" not in line
    (name,) = asked
    Image.open(images / name).transpose(Image.FLIP_LEFT_RIGHT).save(images / name)  # same name, other pixels
    line = _refused(capsys, main(argv), "image_bytes")
    assert "images_dir" not in line
    shutil.copy(moved / name, images / name)
    annotations = tmp_path / "instances.json"
    annotations.write_text((tiny / "instances.json").read_text() + "\n")  # same questions, other file
    line = _refused(capsys, main(_with(argv, "--annotations", annotations)), "annotations_file")
    assert "questions: " not in line
    assert _lines(out / "none" / "answers.jsonl") == answers  # the refused runs changed nothing
    # questions given as a file: its bytes are recorded
    questions = tmp_path / "questions.jsonl"
    questions.write_text((out / "questions.jsonl").read_text())
    from_file = _with(_with(argv, "--out", tmp_path / "from-file"), "--annotations", tiny / "instances.json")
    from_file[from_file.index("--annotations"):from_file.index("--annotations") + 2] = ["--questions", str(questions)]
    assert main(from_file) == 0
    capsys.readouterr()
    questions.write_text(questions.read_text() + "\n")
    _refused(capsys, main(from_file), "questions_file")


def test_chair_records_its_annotation_and_caption_files(tiny, tmp_path, capsys):
    from vsink.cli import main
    from vsink.manifest import file_sha256

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"annotations": [{"image_id": i, "caption": "a dog on a road"} for i in OBJECTS]}))
    out = tmp_path / "chair"
    argv = _chair(tiny, out, "--captions", str(captions))
    assert main(argv) == 0
    record = json.loads((out / "none" / "vsink-run.json").read_text())["determining"]
    assert record["captions_file"] == file_sha256(captions)
    assert record["annotations_file"] == file_sha256(tiny / "instances.json")
    assert record["limit"] is None and record["batch_size"] == 4
    capsys.readouterr()
    captions.write_text(json.dumps({"annotations": [{"image_id": i, "caption": "a cat"} for i in OBJECTS]}))
    line = _refused(capsys, main(argv), "captions_file")
    assert "annotations_file" not in line
    annotations = tmp_path / "instances.json"
    annotations.write_text((tiny / "instances.json").read_text() + "\n")
    _refused(capsys, main(_with(_chair(tiny, out), "--annotations", annotations)), "annotations_file", "captions_file")


def test_runner_refuses_another_mitigation_in_the_same_file(tiny, tmp_path):
    from vsink.evaluate.hallucination import run_items
    from vsink.lvlm import load_lvlm
    from vsink.manifest import StaleRun

    lvlm = load_lvlm(str(tiny / "model"))
    items = [{"image_id": 1, "image": "img1.jpg"}]
    base = {"model": "m", "prompt": "p", "max_new_tokens": 1}
    kwargs = dict(images_dir=tiny / "images", prompt=lambda it: "describe", field="caption", settings=None,
                  max_new_tokens=1, batch_size=1, progress=False)
    rows, _ = run_items(lvlm, items, "image_id", tmp_path / "generated.jsonl", mitigation="none",
                        determining={**base, "mitigation": "none"}, **kwargs)
    assert len(rows) == 1
    with pytest.raises(StaleRun, match=r'mitigation: "none" → "fastv"'):
        run_items(lvlm, items, "image_id", tmp_path / "generated.jsonl", mitigation="fastv",
                  determining={**base, "mitigation": "fastv"}, **kwargs)


def test_a_second_writer_is_refused_while_the_lock_is_held(tiny, tmp_path, capsys):
    from vsink.cli import main

    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vsink.outputs import RunLock\n"
                               f"with RunLock({str(out)!r}, 'vsink eval pope (test)'):\n"
                               "    print('held', flush=True); time.sleep(120)"],
                              env=_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(_pope(tiny, out))
        err = capsys.readouterr().err
        assert code == 2 and f"is being written by pid {holder.pid} on " in err and "vsink eval pope (test)" in err
        assert not (out / "none").exists()  # nothing was written
        # a concurrent set writer (scan) is refused the same way
        assert main(["scan", "--out", str(out), "--no-progress"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is taken over with a warning, and the run goes ahead
    assert (out / ".vsink.lock").exists()
    assert main(_pope(tiny, out)) == 0
    err = capsys.readouterr().err
    assert "taking over the lock" in err and f"pid {holder.pid}" in err
    assert not (out / ".vsink.lock").exists()


def test_two_writers_at_once_never_score_duplicates(tiny, tmp_path, capsys):
    from vsink.cli import main

    out = tmp_path / "both"
    first, second = _vsink(*_pope(tiny, out)), _vsink(*_pope(tiny, out))
    results = [p.communicate(timeout=300) for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    rows = _lines(out / "none" / "answers.jsonl")
    ids = [r["question_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6, results  # never two answers to one question
    if codes == [0, 2]:  # one ran while the other held the folder
        # the holder is named, or (caught between creating its lock and filling it in) said to be making it
        assert any("is being written by pid" in err or "(its lock" in err and "is being made)" in err
                   for _, err in results), results
    else:  # one finished before the other started: the second resumed with nothing to do
        assert codes == [0, 0]
    assert json.loads((out / "results.json").read_text())["results"]["none"]["mean"]["n"] == 6


def test_repeated_answers_are_scored_once(tiny, tmp_path, capsys):
    from vsink.cli import main
    from vsink.evaluate.pope import score_answers

    out = tmp_path / "dup"
    assert main(_pope(tiny, out)) == 0
    path = out / "none" / "answers.jsonl"
    rows = _lines(path)
    # an older vsink's interleaved runs appended every answer twice (n = 12 for 6 questions)
    path.write_text("".join(json.dumps({**r, "answer": "no"}) + "\n" for r in rows)
                    + "".join(json.dumps({**r, "answer": "yes"}) + "\n" for r in rows))
    capsys.readouterr()
    assert main(_pope(tiny, out)) == 0
    err = capsys.readouterr().err
    assert err.count("6 repeated question_id line(s) ignored") == 1
    result = json.loads((out / "results.json").read_text())["results"]["none"]
    assert result["mean"]["n"] == 6 and result["mean"]["yes_ratio"] == 0.0  # the first answer of each: "no"
    with pytest.raises(VsinkError, match="question_id 0 was answered before"):
        score_answers(rows + rows[:1])


# ------------------------------------------------------------------------------------------------- sets


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _demo_images(tmp_path, n, name="imgs"):
    from vsink.data.demo_images import demo_images

    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    demos = demo_images()
    for i in range(n):  # the demo photos, then their mirror images
        item = demos[i % len(demos)]
        image = item.image if i < len(demos) else item.image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(folder / f"{Path(item.name.split(':')[-1]).stem}{'' if i < len(demos) else f'-{i}'}.png")
    return folder


def _view_works(folder):
    from vsink.cli import main

    assert main(["view", str(folder), "--out", str(folder.parent / "viewer.html")]) == 0


def test_an_interrupted_scan_leaves_the_earlier_set(tmp_path, monkeypatch, demo_scan):
    """The earlier set: a copy of the demo's scan (run once for the suite: conftest.py)."""
    import importlib

    from vsink.cli import main

    scan_mod = importlib.import_module("vsink.scan")
    out = Path(shutil.copytree(demo_scan, tmp_path / "scan"))
    earlier = _snapshot(out)
    assert json.loads((out / "vsink-run.json").read_text())["files"] == ["report.html", "scan.json", "trace.npz",
                                                                        "vsink-run.json"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_mod, "write_text", interrupted)  # after trace.npz is written, before report.html
    assert main(["scan", str(_demo_images(tmp_path, 2, "two")), "--out", str(out), "--no-progress"]) == 130
    assert _snapshot(out) == earlier
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "scan.json", "trace.npz", "vsink-run.json"]
    _view_works(out)


def test_an_interrupted_registers_apply_leaves_before_after_and_compare_as_they_were(tmp_path, monkeypatch,
                                                                                     demo_registers):
    """The earlier set: a copy of ``registers apply`` on the demo photos (run once for the suite:
    conftest.py); the rerun, on the same photos saved as files, is interrupted at its last output."""
    import vsink.export.compare as compare_mod
    from vsink.cli import main

    spec, done, _ = demo_registers
    images = _demo_images(tmp_path, 2)
    out = Path(shutil.copytree(done, tmp_path / "apply"))
    earlier = _snapshot(out)
    assert {"before/scan.json", "after/scan.json", "compare.html"} <= set(earlier)
    monkeypatch.setattr(compare_mod, "render_scan_comparison", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["registers", "apply", str(images), "--neurons", str(spec), "--out", str(out), "--no-progress"]) == 130
    assert _snapshot(out) == earlier
    _view_works(out / "before")


def test_a_killed_export_leaves_the_earlier_set_and_the_next_run_cleans_up(tmp_path):
    from vsink.cli import main

    out = tmp_path / "maps"
    images = _demo_images(tmp_path, 4)
    argv = ["maps", str(images), "--out", str(out), "--layers", "0", "--kind", "norm", "--no-progress"]
    assert main(argv) == 0
    earlier = _snapshot(out)
    # kill -9 in the middle of the rerun: its first image is written (in its staging folder), the rest not
    proc = _vsink(*argv)
    deadline = time.time() + 120
    while not list(out.glob(".vsink-stage-*/*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert list(out.glob(".vsink-stage-*/*.npz")), proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith(".")} == earlier
    _view_works(out)
    assert main(argv) == 0  # the dead writer's lock is taken over, its staging folder removed
    assert not list(out.glob(".vsink-*")) and not (out / ".vsink.lock").exists()


def test_out_of_space_is_one_line_and_replaces_nothing(tmp_path, demo_scan):
    """The earlier set: a copy of the demo's scan (run once for the suite: conftest.py)."""
    out = Path(shutil.copytree(demo_scan, tmp_path / "scan"))
    images = _demo_images(tmp_path, 3)
    earlier = _snapshot(out)
    limit = 64 * 1024  # the trace of two images is larger, the rewrite's of three too: it passes `ulimit -f`
    assert (out / "trace.npz").stat().st_size > limit
    proc = _vsink("scan", str(images), "--out", str(out), "--no-progress",
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("vsink: error: ") and "file-size limit" in err
    assert "nothing was replaced" in err and "Traceback" not in err
    assert _snapshot(out) == earlier
    _view_works(out)


def test_a_swap_cut_short_is_refused_by_view_and_completed_by_the_next_writer(tmp_path, monkeypatch):
    import vsink.outputs as outputs
    from vsink.io import write_text
    from vsink.outputs import OutputSet

    out = tmp_path / "set"
    with OutputSet(out, "test") as stage:
        for name in ("a.txt", "b.txt", "c.txt"):
            write_text(stage / name, "old " + name)
    real, calls = os.rename, []

    def dies(src, dst):  # a hard kill after two renames of the swap
        if len(calls) == 2:
            raise SystemExit("killed")
        calls.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(outputs.os, "rename", dies)
    with pytest.raises(SystemExit):
        with OutputSet(out, "test") as stage:
            for name in ("a.txt", "b.txt"):
                write_text(stage / name, "new " + name)
    monkeypatch.setattr(outputs.os, "rename", real)
    (out / ".vsink.lock").unlink(missing_ok=True)
    with pytest.raises(VsinkError, match="were being replaced when the writing process was killed"):
        outputs.check_complete(out)
    with pytest.raises(KeyboardInterrupt):  # the next writer completes the swap first; its own failure keeps it
        with OutputSet(out, "test"):
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "vsink-run.json"]  # c.txt: of the earlier set
    assert (out / "a.txt").read_text() == "new a.txt" and (out / "b.txt").read_text() == "new b.txt"
    outputs.check_complete(out)


def test_run_records_have_the_permissions_of_the_other_outputs(tmp_path, tiny, capsys):
    """vsink-run.json was written owner-only (0600, a temporary file's mode) beside 0644 outputs:
    another user of a shared folder could read the results but not their record."""
    from vsink.cli import main

    umask = os.umask(0o022)
    try:
        assert main(["scan", str(tiny / "images"), "--no-progress", "--out", str(tmp_path / "scan")]) == 0
        assert main(_chair(tiny, tmp_path / "chair")) == 0
    finally:
        os.umask(umask)
    for record in (tmp_path / "scan" / "vsink-run.json", tmp_path / "chair" / "vsink-run.json",
                   tmp_path / "chair" / "none" / "vsink-run.json"):
        assert record.stat().st_mode & 0o777 == 0o644, record
    assert (tmp_path / "scan" / "scan.json").stat().st_mode & 0o777 == 0o644


def test_a_set_replaces_the_earlier_set_whole(tmp_path):
    from vsink.io import write_text
    from vsink.outputs import OutputSet

    out = tmp_path / "set"
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")
    with OutputSet(out, "test") as stage:
        for name in ("row0.npz", "row1.npz"):
            write_text(stage / name, name)
    with OutputSet(out, "test") as stage:
        write_text(stage / "row0.npz", "again")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "row0.npz", "vsink-run.json"]
    assert (out / "row0.npz").read_text() == "again"


def test_maps_twice_into_the_image_folder(tmp_path, capsys):
    from vsink.cli import main

    images = _demo_images(tmp_path, 2)
    out = images / "maps"
    argv = ["maps", str(images), "--out", str(out), "--layers", "2", "--kind", "norm", "--no-progress"]
    assert main(argv) == 0
    first = json.loads((out / "maps.json").read_text())
    assert len(first["images"]) == 2 and any(p.suffix == ".png" for p in out.rglob("*.png"))
    assert main(argv) == 0
    second = json.loads((out / "maps.json").read_text())
    assert [i["image"] for i in second["images"]] == [i["image"] for i in first["images"]]  # its overlays are not inputs
    assert "exported maps for 2 images" in capsys.readouterr().out
    # a maps folder elsewhere under the image folder (an earlier --out) is skipped too
    shutil.copytree(out, images / "old_maps")
    assert main(["maps", str(images), "--out", str(tmp_path / "m"), "--layers", "2", "--kind", "norm",
                 "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "m" / "maps.json").read_text())["images"]) == 2
    # fewer images: the earlier export's files of the dropped image are gone
    (images / sorted(p.name for p in images.glob("*.png"))[0]).unlink()
    assert main(argv) == 0
    assert len(json.loads((out / "maps.json").read_text())["images"]) == 1
    assert len(list(out.glob("*.npz"))) == 1


def test_export_attention_leaves_no_stale_rows(tiny, tmp_path):
    from vsink.cli import main

    out = tmp_path / "att"
    base = ["generate", "--model", str(tiny / "model"), "--max-new-tokens", "2", "--prompt", "describe",
            "--export-attention", str(out), "--no-progress"]
    assert main(base[:1] + [str(tiny / "images" / "img1.jpg"), str(tiny / "images" / "img2.jpg")] + base[1:]) == 0
    assert (out / "row1.npz").exists() and (out / "row1").is_dir()
    assert main(["view", str(out)]) == 0  # OUT/viewer.html shows this export
    assert main(base[:1] + [str(tiny / "images" / "img3.jpg")] + base[1:]) == 0
    assert not (out / "row1.npz").exists() and not (out / "row1").exists()
    assert not (out / "viewer.html").exists()  # the earlier export's page went with it
    assert json.loads((out / "vsink-run.json").read_text())["determining"]["rows"] == 1
    _view_works(out)


@pytest.mark.parametrize("case", ["dangling", "loop", "too_long", "read_only"])
def test_output_targets_refused_before_any_work(tmp_path, case, request, capsys):
    from vsink.cli import main

    if case == "dangling":
        target = tmp_path / "link"
        target.symlink_to(tmp_path / "missing" / "folder")
        expect = "is a symbolic link to"
    elif case == "loop":  # a → b → a: the link's target exists (as a link), the message must say loop
        (tmp_path / "b").symlink_to(tmp_path / "a")
        target = tmp_path / "a"
        target.symlink_to(tmp_path / "b")
        expect = "is a symbolic link in a loop"
    elif case == "too_long":
        target = tmp_path / ("x" * 300)
        expect = "too long for the file system"
    else:  # a read-only folder: for root (who writes through permission bits) an immutable one
        locked = tmp_path / "ro"
        locked.mkdir()
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(locked)], check=True)
            request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(locked)], check=True))
        else:
            locked.chmod(0o555)
        target = locked / "out"
        expect = "is not writable"
    for argv in (["scan", "--out", str(target)], ["maps", "--out", str(target)],
                 ["eval", "dense", "--out", str(target)], ["registers", "find", "--out", str(target / "n.json")]):
        code = main([*argv, "--no-progress"])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("vsink: error: "), err
        assert expect in lines[0], err
        assert "SYNTHETIC" not in err  # refused before the model was loaded
    assert not (tmp_path / "missing").exists()


def test_finetune_is_one_writer_too(tmp_path):
    import socket

    from vsink.outputs import OutputError
    from vsink.train import load_config, run_finetune

    configs = ROOT / "configs"
    tiny = ["model.spec=timm:vit_tiny_patch16_224", "model.img_size=32",
            "model.model_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}", "registers.n=2",
            "data.num_images=8", "data.eval_images=4", "train.eval_every=1000", "train.log_every=1000",
            "train.warmup_steps=1", "train.steps=1", f"out={tmp_path}"]
    sleeper = subprocess.Popen(["sleep", "60"])  # a live process of this host holds the folder
    try:
        (tmp_path / ".vsink.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(),
                                                          "command": "vsink finetune", "started": "now"}))
        with pytest.raises(OutputError, match=f"is being written by pid {sleeper.pid} on .*'vsink finetune'"):
            run_finetune(load_config(configs / "scratch.yaml", tiny), progress=False)
        assert not (tmp_path / "config.yaml").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(UserWarning, match="taking over the lock"):
        run_finetune(load_config(configs / "scratch.yaml", tiny), progress=False)
    assert (tmp_path / "final" / "vsink.json").exists() and not (tmp_path / ".vsink.lock").exists()


def test_an_lvlm_scan_that_fails_midway_leaves_the_earlier_set(tiny, tmp_path, monkeypatch, capsys):
    import importlib

    from vsink.cli import main

    scan_mod = importlib.import_module("vsink.scan")
    out = tmp_path / "lvlm"
    argv = ["scan", str(tiny / "images" / "img1.jpg"), str(tiny / "images" / "img2.jpg"), "--model",
            str(tiny / "model"), "--prompt", "describe", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert (out / "vision" / "scan.json").exists() and (out / "vision" / "vsink-run.json").exists()
    earlier = _snapshot(out)
    real = scan_mod.ScanResult.save

    def full_disk(self, out_dir):  # the tower's scan is written, then the disk is full
        real(self, out_dir)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scan_mod.ScanResult, "save", full_disk)
    capsys.readouterr()
    assert main(argv[:1] + [str(tiny / "images" / "img3.jpg")] + argv[3:]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"vsink: error: {out}: no space left on the device while writing its outputs; nothing was replaced"
    assert _snapshot(out) == earlier
    _view_works(out)
