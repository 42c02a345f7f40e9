"""The same commands under ``torchrun`` (two gloo processes on CPU) give the outputs of one process.

Each command runs once as one process (``vsink.cli.main`` in this process: today's behaviour) and
once in the two processes of ``python -m torch.distributed.run --standalone --nproc-per-node 2``,
and the output files are compared: the batches are cut as one process cuts them and rank 0 pools
over all items, so the numbers are equal, not close (one thread per process). To spare the suite a
launch per command, the 2-process runs of every command go through one launch
(``tests/torchrun_commands.py`` runs them in turn through ``vsink.cli.main``, as ``torchrun -m vsink``
does), and the one-process runs are made while that launch runs; the kill-and-resume tests launch
``torchrun -m vsink`` themselves (their one-process run is made while the resuming launch runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]


def one(*args: str) -> None:
    """The command as one process, in this process (saves an interpreter start)."""
    from vsink.cli import main

    assert main([*args, "--no-progress"]) == 0


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Five small images of different sizes and one file that is not an image (skipped in its batch)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "im2b.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six crops of the demo photos (4 with high-norm outliers at 112 px) and an unreadable file."""
    from vsink.data.demo_images import demo_images

    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(item.image for item in demo_images()):
        w, h = image.size
        for j, box in enumerate([(0, 0, w, h), (0, 0, w // 2, h // 2), (w // 3, h // 4, w, h)]):
            image.crop(box).resize((64, 48)).save(folder / f"p{i}{j}.png")
    (folder / "p05.png").write_bytes(b"not an image")
    return folder


CLASSES = ["apple", "bird", "car", "dog", "person", "umbrella"]
OBJECTS = {1: ["person", "dog", "car"], 2: ["person", "dog", "umbrella"], 3: ["apple", "bird"]}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """Three 40x40 images and COCO-style instances naming their objects (for POPE's questions)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(1)
    for i in OBJECTS:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"img{i}.jpg")
    data = {"categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
            "images": [{"id": i, "file_name": f"img{i}.jpg"} for i in OBJECTS],
            "annotations": [{"image_id": i, "category_id": CLASSES.index(c) + 1, "bbox": [0, 0, 1, 1]}
                            for i, objs in OBJECTS.items() for c in objs]}
    (root / "instances.json").write_text(json.dumps(data))
    return root


def _pope(coco: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "pope", str(coco / "images"), "--model", "demo-llava", "--annotations",
            str(coco / "instances.json"), "--num-images", "2", "--max-new-tokens", "2", "--out", str(out), *extra]


#: three prompts of different lengths: a batch of the first two is left-padded
PROMPTS = ("Is there a dog?", "Describe the picture in a few words.", "What is it?")


def _generate(coco: Path, *extra: str) -> list[str]:
    images = [str(coco / "images" / f"img{i}.jpg") for i in OBJECTS]
    return ["generate", *images, "--model", "demo-llava", *(a for p in PROMPTS for a in ("--prompt", p)),
            "--max-new-tokens", "3", *extra]


#: every command checked: its arguments (images, coco, photos, out) → vsink's argument list
COMMANDS = {
    "scan": lambda im, co, ph, out: ["scan", str(im), "--model", "demo", "--img-size", "112", "--batch-size", "2",
                                     "--out", str(out)],
    "maps": lambda im, co, ph, out: ["maps", str(im), "--model", "demo", "--img-size", "112", "--layers", "1,2",
                                     "--kind", "cls,norm", "--out", str(out)],
    "find": lambda im, co, ph, out: ["registers", "find", str(ph), "--model", "demo", "--img-size", "112",
                                     "--batch-size", "2", "--out", str(out) + ".json"],
    "pope": lambda im, co, ph, out: _pope(co, out, "--splits", "random", "--batch-size", "2"),
    "dense": lambda im, co, ph, out: ["eval", "dense", "--synthetic-images", "5", "--img-size", "64", "--epochs", "2",
                                      "--batch-size", "2", "--out", str(out)],
    "generate": lambda im, co, ph, out: _generate(co, "--mitigation", "var", "--batch-size", "2", "--out", str(out),
                                                  "--export-attention", str(out) + "-attention"),
    "generate-one-batch": lambda im, co, ph, out: _generate(co),
    "generate-skip": lambda im, co, ph, out: ["generate", str(im), "--model", "demo-llava", "--prompt", "What is it?",
                                              "--max-new-tokens", "2", "--batch-size", "2", "--out", str(out)],
    # noise images have no high-norm outliers: rank 0 finds that after gathering the norms
    "no-outliers": lambda im, co, ph, out: ["registers", "find", str(im), "--model", "demo", "--img-size", "112",
                                            "--batch-size", "2", "--out", str(out) + ".json"],
}


def _question(qid: int, image: str, text: str = "Is there a dog in the image?") -> dict:
    return {"question_id": qid, "image": image, "object": "dog", "split": "random", "label": "yes", "text": text}


@pytest.fixture(scope="module")
def rank1(tmp_path_factory) -> Path:
    """POPE inputs whose batches of 2 deal rank 1 a failure of its own (``bad.jsonl``: a question
    thousands of tokens long, past the demo LVLM's 2,048 positions) or an unreadable image
    (``good.jsonl``); the images are in ``images/``."""
    root = tmp_path_factory.mktemp("rank1")
    images = root / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "broken.png").write_bytes(b"not an image")
    # batches of 2: questions 0-1 on rank 0, 2-3 on rank 1, 4-5 on rank 0 (rank 1 has no third batch)
    long = "Is there a dog " + "and a dog " * 1500 + "in the image?"  # thousands of tokens: past 2,048
    bad = [_question(0, "a.png"), _question(1, "a.png"), _question(2, "a.png", long), _question(3, "a.png"),
           _question(4, "a.png"), _question(5, "a.png")]
    good = [_question(0, "a.png"), _question(1, "a.png"), _question(2, "broken.png"), _question(3, "a.png")]
    for name, questions in (("bad", bad), ("good", good)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


def _rank1_pope(rank1: Path, name: str, out: Path) -> list[str]:
    return ["eval", "pope", str(rank1 / "images"), "--model", "demo-llava", "--questions",
            str(rank1 / f"{name}.jsonl"), "--max-new-tokens", "1", "--batch-size", "2", "--out", str(out)]


#: the commands whose one-process outputs the tests compare with the launch's
COMPARED = ("scan", "maps", "find", "pope", "dense", "generate", "generate-skip")


@pytest.fixture(scope="module")
def launch(tmp_path_factory, images, coco, photos, rank1) -> tuple[Path, Path]:
    """Every command of :data:`COMMANDS`, then the two POPE runs of :func:`rank1` (``rank1-bad``,
    ``rank1-good``), run by two processes, in one ``torchrun`` launch, killed with its workers
    after 10 minutes (a rank left waiting would wait for half an hour, gloo's timeout); and
    meanwhile (the launch's ranks wait on each other and on their interpreters' start) each
    command of :data:`COMPARED` as one process, in this process: (the launch's folder, the one
    process's folder, where ``NAME.out`` / ``NAME.err`` hold what each command printed)."""
    import contextlib
    import signal

    out, one_dir = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    plan = {name: [*args(images, coco, photos, out / name), "--no-progress"] for name, args in COMMANDS.items()}
    plan.update({f"rank1-{name}": [*_rank1_pope(rank1, name, out / f"rank1-{name}"), "--no-progress"]
                 for name in ("bad", "good")})
    (out / "plan.json").write_text(json.dumps(plan))
    started = subprocess.Popen(_torchrun(str(ROOT / "tests" / "torchrun_commands.py"), str(out / "plan.json"),
                                         str(out)), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for name in COMPARED:
            with open(one_dir / f"{name}.out", "w") as stdout, open(one_dir / f"{name}.err", "w") as stderr:
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                    one(*COMMANDS[name](images, coco, photos, one_dir / name))
    finally:
        try:
            _, err = started.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(started.pid, signal.SIGKILL)  # torchrun and both workers
            started.communicate()
            raise
    assert started.returncode == 0, err[-4000:]
    return out, one_dir


@pytest.fixture(scope="module")
def two(launch) -> Path:
    """The folder of the ``torchrun`` launch of every command of :data:`COMMANDS`."""
    return launch[0]


@pytest.fixture(scope="module")
def ones(launch) -> Path:
    """The folder of the one-process runs of :data:`COMPARED`."""
    return launch[1]


def _ran(two: Path, name: str, ok: bool = True) -> tuple[str, str]:
    """Rank 0's stdout and stderr of a command of the launch; both ranks' exit codes checked."""
    codes = [int((two / f"{name}.rank{r}.rc").read_text()) for r in (0, 1)]
    err = (two / f"{name}.rank0.err").read_text()
    if ok:
        assert codes == [0, 0], err[-3000:] + (two / f"{name}.rank1.err").read_text()[-3000:]
    else:
        assert codes == [2, 2]
    return (two / f"{name}.rank0.out").read_text(), err


def _same_npz(a: Path, b: Path) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for name in x.files:
            assert np.array_equal(x[name], y[name]), name


def _record(folder: Path) -> dict:
    return json.loads((folder / "vsink-run.json").read_text())


def test_scan_two_processes_equal_one(ones, two):
    stdout, _ = _ran(two, "scan")
    one_dir, two_dir = ones / "scan", two / "scan"
    scan = json.loads((one_dir / "scan.json").read_text())
    # 5 images in batches of 2 (im2b.png is skipped in batch 2): each rank scanned some, rank 0 pooled
    assert len(scan["images"]) == 5 and [Path(s["image"]).name for s in scan["skipped"]] == ["im2b.png"]
    assert (two_dir / "scan.json").read_text() == (one_dir / "scan.json").read_text()
    assert (two_dir / "report.html").read_text() == (one_dir / "report.html").read_text()
    _same_npz(one_dir / "trace.npz", two_dir / "trace.npz")
    assert _record(two_dir)["determining"] == _record(one_dir)["determining"]
    assert _record(two_dir)["files"] == _record(one_dir)["files"]
    assert "scanned 5 images (1 skipped)" in stdout and not (two / "scan.rank1.out").read_text()  # rank 0 reports
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in one_dir.iterdir())


def test_maps_two_processes_equal_one(ones, two):
    """Image i on rank i % 2: each rank writes its npz files and draws its PNGs into rank 0's staging
    folder on the colour scales rank 0 folded over every image in order."""
    _ran(two, "maps")
    one_dir, two_dir = ones / "maps", two / "maps"
    files = sorted(p.relative_to(one_dir) for p in one_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two_dir) for p in two_dir.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) > 5 * 4  # 5 images, 4 overlays each and contact sheets
    for name in files:
        if name.name != "vsink-run.json":
            assert (two_dir / name).read_bytes() == (one_dir / name).read_bytes(), name
    assert _record(two_dir)["determining"] == _record(one_dir)["determining"]


def test_registers_find_two_processes_equal_one(ones, two):
    """Rank 0 finds the outliers over every image's norms and adds the per-batch neuron sums in order."""
    stdout, _ = _ran(two, "find")
    reference = Path(str(ones / "find") + ".json")
    spec = json.loads(reference.read_text())
    # the score-gap cut keeps exactly the demo's planted neurons (block 2, MLP units 0-3; docs/demo.md)
    assert [(n["layer"], n["neuron"]) for n in spec["neurons"]] == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert spec["settings"]["images"] == 6
    assert spec["settings"]["images_with_outliers"] == 4 and len(spec["settings"]["unreadable"]) == 1
    assert (two / "find.json").read_text() == reference.read_text()
    assert stdout.count("register neurons of demo") == 1


def test_eval_pope_two_processes_equal_one(ones, two):
    _ran(two, "pope")
    a, b = ones / "pope", two / "pope"
    assert len(_lines(a / "none" / "answers.jsonl")) == 12  # 2 images x 6 questions: 6 batches, 3 per rank
    for name in ("none/answers.jsonl", "questions.jsonl", "results.json", "results.md", "results.html"):
        assert (b / name).read_text() == (a / name).read_text(), name
    assert _record(b / "none")["determining"] == _record(a / "none")["determining"]
    assert sorted(p.name for p in (b / "none").iterdir()) == ["answers.jsonl", "vsink-run.json"]  # rank files folded in
    assert not (b / ".vsink.lock").exists()


def test_eval_dense_two_processes_equal_one(ones, two):
    _ran(two, "dense")
    one_dir = ones / "dense"
    a, b = (json.loads((folder / "results.json").read_text()) for folder in (one_dir, two / "dense"))
    assert a["tasks"] == ["linear-seg", "lost", "artifacts"] and a["dataset"]["images_evaluated"] == 5
    for result in (a, b):  # measured times differ; everything else is equal
        for variant in result["variants"].values():
            assert variant.pop("timing")["forward_images"] == 10  # 5 training + 5 evaluation images
    assert b == a
    assert (two / "dense" / "results.md").read_text() == (one_dir / "results.md").read_text()
    assert _record(two / "dense")["determining"] == _record(one_dir)["determining"]


def test_generate_two_processes_equal_one(ones, two):
    """3 items in batches of 2 (the first left-padded): batch 1 on rank 0, batch 2 on rank 1; rank 0
    folds the texts, every rank writes its attention rows into rank 0's set, rank 0 reports."""
    stdout, err = _ran(two, "generate")
    a = ones / "generate"
    one_out, one_err = (ones / "generate.out").read_text(), (ones / "generate.err").read_text()
    b = two / "generate"
    rows = _lines(a / "generated.jsonl")
    assert [r["item"] for r in rows] == [0, 1, 2] and [r["prompt"] for r in rows] == list(PROMPTS)
    assert (b / "generated.jsonl").read_bytes() == (a / "generated.jsonl").read_bytes()
    assert sorted(p.name for p in b.iterdir()) == ["generated.jsonl", "vsink-run.json"]  # rank files folded in
    assert _record(b)["determining"] == _record(a)["determining"]
    att_a, att_b = Path(f"{a}-attention"), Path(f"{b}-attention")
    files = sorted(p.relative_to(att_a) for p in att_a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(att_b) for p in att_b.rglob("*") if p.is_file())
    assert {f.name for f in files} >= {"row0.npz", "row1.npz", "row2.npz", "step002.png"}
    for name in files:
        if name.name != "vsink-run.json":
            assert (att_b / name).read_bytes() == (att_a / name).read_bytes(), name
    assert _record(att_b)["determining"] == _record(att_a)["determining"]
    # what rank 0 prints is what one process prints (but the folders' names); rank 1 prints nothing
    assert stdout.replace(str(b), "OUT") == one_out.replace(str(a), "OUT")
    assert stdout.count("\n[") == 2 and "wrote 12 files to" in stdout  # 3 texts; 3 npz + 9 overlays
    reports = [line for line in err.splitlines() if line.startswith("vsink: batch ")]
    assert reports == [line for line in one_err.splitlines() if line.startswith("vsink: batch ")]
    assert [line.split(":")[1] for line in reports] == [" batch 1/2 (items 0-1)", " batch 2/2 (item 2)"]
    assert not (two / "generate.rank1.out").read_text()


def test_generate_in_one_batch_under_torchrun_says_the_other_ranks_idle(two):
    stdout, err = _ran(two, "generate-one-batch")
    assert "3 items in 1 batch for 2 processes: 1 of them have nothing to do (give a smaller --batch-size)" in err
    assert stdout.count("[") == 3


def test_generate_skips_an_unreadable_file_on_every_rank_as_one_process_does(ones, two):
    """im2b.png cannot be read: every rank leaves it out before the batches are cut, so the 5 items
    in 3 batches, the texts and the record (its skipped entry) are those of one process; rank 0
    alone reports it."""
    stdout, err = _ran(two, "generate-skip")
    a = ones / "generate-skip"
    one_out = (ones / "generate-skip.out").read_text()
    b = two / "generate-skip"
    assert [r["item"] for r in _lines(a / "generated.jsonl")] == [0, 1, 2, 3, 4]
    assert (b / "generated.jsonl").read_bytes() == (a / "generated.jsonl").read_bytes()
    assert _record(b)["determining"] == _record(a)["determining"]
    assert [Path(s["image"]).name for s in _record(b)["determining"]["skipped"]] == ["im2b.png"]
    assert err.count("vsink: skipped ") == 1 and "im2b.png" in err
    assert "vsink: skipped" not in (two / "generate-skip.rank1.err").read_text()
    assert stdout.replace(str(b), "OUT") == one_out.replace(str(a), "OUT")
    assert "generated 5 images (1 skipped)" in stdout


def test_an_error_on_rank_0_stops_every_rank_with_one_line(two):
    """The other rank, waiting for rank 0's verdict, stops too (exit code 2 on both, no hang) and
    says nothing more."""
    _, err = _ran(two, "no-outliers", ok=False)
    errors = [line for line in err.splitlines() if "vsink: error:" in line]
    assert len(errors) == 1 and "no high-norm outliers in these images" in errors[0]
    assert "vsink: error:" not in (two / "no-outliers.rank1.err").read_text()
    assert not (two / "no-outliers.json").exists()


def test_an_error_on_rank_1_stops_every_rank_with_one_line_naming_it(two):
    """A real failure on the batch dealt to rank 1 alone (a POPE question far longer than the demo
    LVLM's context, which one process refuses too: ``LVLM.check_context``) stops both ranks with one
    line naming the rank, within the launch's timeout; an unreadable image dealt to rank 1 stays a
    skipped and reported item, as for one process."""
    codes = [int((two / f"rank1-bad.rank{r}.rc").read_text()) for r in (0, 1)]
    err0, err1 = ((two / f"rank1-bad.rank{r}.err").read_text() for r in (0, 1))
    assert codes == [2, 2], err0[-2000:] + err1[-2000:]
    lines = [line for line in err0.splitlines() if "vsink: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("vsink: error: rank 1: the prompt is ")
    assert "beyond demo-llava's context of 2,048 tokens" in lines[0]
    assert "vsink: error:" not in err1 and "Traceback" not in err0 + err1
    # rank 0's answers (its first batch, written before rank 1 failed) stay for the next run to fold in
    kept = two / "rank1-bad" / "none" / "answers.rank0.jsonl"
    assert [json.loads(line)["question_id"] for line in kept.read_text().splitlines()][:2] == [0, 1]
    assert (two / "rank1-bad" / "none" / "vsink-run.json").exists()
    assert not (two / "rank1-bad" / "results.json").exists()

    # an unreadable image on rank 1's batch: skipped and reported, the others scored, as one process does
    _, err0 = _ran(two, "rank1-good")
    err1 = (two / "rank1-good.rank1.err").read_text()
    assert "vsink: skipped" in err1 and "broken.png" in err1
    results = json.loads((two / "rank1-good" / "results.json").read_text())
    assert [s["item"] for s in results["skipped"]["none"]] == ["2"]
    answered = (two / "rank1-good" / "none" / "answers.jsonl").read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in answered] == [0, 1, 3]


def test_commands_that_do_not_split_their_work_are_refused_under_torchrun(tmp_path, images, capsys, monkeypatch):
    from vsink.cli import main

    for key, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    assert main(["ablate", str(images), "--model", "demo", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "vsink: error: vsink ablate does not split its work")
    assert not (tmp_path / "a").exists()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _resume(args: list[str], meanwhile) -> subprocess.CompletedProcess:
    """``torchrun -m vsink ARGS`` run again after the kill, with ``meanwhile()`` (the uninterrupted
    one-process run) done in this process while the launch runs; the launch must succeed."""
    launch = subprocess.Popen(_torchrun("-m", "vsink", *args), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        meanwhile()
    finally:
        out, err = launch.communicate(timeout=600)
    assert launch.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(launch.args, launch.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_eval_pope_killed_on_every_rank_resumes_where_each_stopped(tmp_path, coco):
    import signal
    import time

    args = _pope(coco, tmp_path / "run", "--splits", "random,popular", "--batch-size", "1", "--no-progress")
    agent = subprocess.Popen(_torchrun("-m", "vsink", *args), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    ranks = [tmp_path / "run" / "none" / f"answers.rank{r}.jsonl" for r in (0, 1)]
    deadline = time.time() + 300
    while not all(_complete_lines(p) for p in ranks) and agent.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = _children(agent.pid)
    assert len(workers) == 2 and agent.poll() is None
    for pid in workers:  # both ranks die at once, wherever each one is
        os.kill(pid, signal.SIGKILL)
    assert agent.wait(timeout=120) != 0
    assert not (tmp_path / "run" / "results.json").exists()
    # each rank's answers so far (a line the kill cut short is not one: it is redone)
    before = [json.loads(line) for p in ranks for line in p.read_text().split("\n")[:-1]]
    assert 2 <= len(before) < 24

    resumed = _resume(args, lambda: one(*_pope(coco, tmp_path / "one", "--splits", "random,popular",
                                                  "--batch-size", "1")))  # the same command again resumes
    final = _lines(tmp_path / "run" / "none" / "answers.jsonl")
    assert sorted(r["question_id"] for r in final) == list(range(24))  # every question exactly once
    kept = {r["question_id"]: r for r in before}
    assert [r for r in final if r["question_id"] in kept] == sorted(kept.values(), key=lambda r: r["question_id"])
    assert sorted(final, key=lambda r: r["question_id"]) == _lines(tmp_path / "one" / "none" / "answers.jsonl")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results == json.loads((tmp_path / "one" / "results.json").read_text())
    assert not list((tmp_path / "run" / "none").glob("*.rank*"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_generate_killed_on_every_rank_resumes_to_the_texts_of_one_process(tmp_path, images, coco):
    """16 items (8 files twice) in batches of 2; both workers killed once each has written texts;
    the same command again runs only the batches with a text missing (the batches of an
    uninterrupted run), so the texts are byte for byte those of one process."""
    import signal
    import time

    files = 2 * (sorted(str(p) for p in images.glob("im?.png")) + [str(coco / "images" / f"img{i}.jpg")
                                                                   for i in OBJECTS])
    args = ["generate", *files, "--model", "demo-llava", "--prompt", "Describe.", "--batch-size", "2",
            "--max-new-tokens", "6", "--no-progress", "--out", str(tmp_path / "run")]
    agent = subprocess.Popen(_torchrun("-m", "vsink", *args), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    ranks = [tmp_path / "run" / f"generated.rank{r}.jsonl" for r in (0, 1)]
    deadline = time.time() + 300
    while not all(_complete_lines(p) for p in ranks) and agent.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = _children(agent.pid)
    assert len(workers) == 2 and agent.poll() is None
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert agent.wait(timeout=120) != 0
    before = [json.loads(line) for p in ranks for line in p.read_text().split("\n")[:-1]]
    assert 2 <= len(before) < 16

    resumed = _resume(args, lambda: one(*args[:-1], str(tmp_path / "one")))
    assert f"{len(before)} items of 16 already in" in resumed.stderr
    final = tmp_path / "run" / "generated.jsonl"
    assert final.read_bytes() == (tmp_path / "one" / "generated.jsonl").read_bytes()
    assert all(row in _lines(final) for row in before)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["generated.jsonl", "vsink-run.json"]


def test_shard_cuts_batches_as_one_process_and_deals_them_by_rank():
    from vsink.shard import Shard

    # 7 items in batches of 3: [0, 3), [3, 6), [6, 7) → batches 0 and 2 on rank 0, batch 1 on rank 1
    assert list(Shard(0, 2).batches(7, 3)) == [(0, 0, 3), (2, 6, 7)]
    assert list(Shard(1, 2).batches(7, 3)) == [(1, 3, 6)]
    assert list(Shard().batches(7, 3)) == [(0, 0, 3), (1, 3, 6), (2, 6, 7)]
    # rounds: every rank takes as many steps (one collective each); rank 1 has none in the last round
    assert list(Shard(1, 2).rounds(7, 3)) == [(1, (3, 6)), (3, None)]
    assert list(Shard(0, 2).rounds(7, 3)) == [(0, (0, 3)), (2, (6, 7))]
    assert Shard(3, 4).rank_file("out/none/answers.jsonl") == Path("out/none/answers.rank3.jsonl")


def test_shard_from_the_environment(monkeypatch):
    from vsink.errors import VsinkError
    from vsink.shard import Shard, from_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert from_env() == Shard()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(VsinkError, match="RANK=5 WORLD_SIZE=4"):
        from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(VsinkError, match="must be integers"):
        from_env()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_env() == Shard(3, 4, 1) and not from_env().main
