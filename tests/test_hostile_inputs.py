"""Hostile and unusual inputs (issue 14): what vsink refuses, and how.

Every case ends in a correct result or in one line ``vsink: error: ...`` with exit code 2 — never
a traceback — and a refused run changes no file. The sections follow the issue: unsafe writes and
data loss, silent miscounts, bad values accepted silently, then the inputs that used to end in a
traceback (output paths, NaN and infinity, weights and saved models, readers, generate settings
and placeholders, recipe values). Cases that share a cause share a parametrised test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vsink
from vsink.cli import main
from vsink.registers import NeuronSpec, RegisterNeuron

TINY_RECIPE = ["recipe=scratch", "model.spec=timm:vit_tiny_patch16_224", "model.img_size=32",
               "model.model_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3}", "registers.n=2",
               "data.num_images=8", "data.eval_images=4", "train.steps=2", "train.batch_size=4",
               "train.eval_every=1000", "train.warmup_steps=1", "train.checkpoint_every=1"]


# --- helpers ----------------------------------------------------------------------------------

def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, match: str) -> str:
    """Run the command; assert exit code 2 and a single ``vsink: error:`` line (the last) that
    matches ``match``; return the stderr."""
    code, _, err = cli(capsys, *argv)
    assert "Traceback" not in err
    assert code == 2, err
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith("vsink: error: ") and err.count("vsink: error:") == 1, err
    assert re.search(match, lines[-1]), lines[-1]
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (a refused run must leave this unchanged)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def png(path: Path, seed: int = 0, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path, format="PNG")
    return path


def jsonl(path: Path, rows, tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def deep_json(path: Path, depth: int = 100_000) -> Path:
    path.write_text("[" * depth + "]" * depth)
    return path


@contextmanager
def read_only_dir():
    """A directory nobody may write into — as root (who ignores permission bits) the test acts as
    the unprivileged user ``nobody`` while it runs."""
    d = Path(tempfile.mkdtemp(prefix="vsink-ro-"))
    d.chmod(0o555)
    try:
        if os.geteuid() == 0:
            os.seteuid(65534)
            try:
                yield d
            finally:
                os.seteuid(0)
        else:
            yield d
    finally:
        d.chmod(0o755)
        shutil.rmtree(d)


ANSWERS = [{"question_id": i, "split": "random", "label": "yes" if i % 2 else "no", "answer": "Yes" if i % 3 else "No"}
           for i in range(7)]
CATEGORIES = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "car"}, {"id": 4, "name": "person"},
              {"id": 5, "name": "bus"}, {"id": 6, "name": "train"}, {"id": 7, "name": "boat"}]


def coco(path: Path, **override) -> Path:
    data = {"images": [{"id": 1, "file_name": "img1.png", "width": 40, "height": 40},
                       {"id": 2, "file_name": "img2.png", "width": 40, "height": 40}],
            "annotations": [{"id": k, "image_id": 1 + k % 2, "category_id": 1 + k % 4, "bbox": [2, 2, 20, 20],
                             "iscrowd": 0, "area": 400} for k in range(8)],
            "categories": CATEGORIES}
    data.update(override)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in (1, 2):
        png(root / f"img{i}.png", seed=i)
    return root


@pytest.fixture(scope="module")
def neurons(tmp_path_factory):
    """A neuron spec of the demo model's planted register neurons (block 2, neurons 0-3)."""
    return NeuronSpec("demo", [RegisterNeuron(2, n, 1.0) for n in range(4)]).save(
        tmp_path_factory.mktemp("spec") / "neurons.json")


@pytest.fixture(scope="module")
def demo_state():
    return {k: v.clone().contiguous() for k, v in vsink.load("demo").model.state_dict().items()}


@pytest.fixture(scope="module")
def saved_demo(tmp_path_factory):
    return vsink.load("demo").save(tmp_path_factory.mktemp("saved") / "demo")


@pytest.fixture(scope="module")
def scanned(demo_scan):
    """An output folder holding a finished scan: the demo's (run once for the suite: conftest.py)."""
    return demo_scan


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-step fine-tuning run (tiny timm ViT, 2 registers)."""
    out = tmp_path_factory.mktemp("finetune") / "run"
    assert main(["finetune", *TINY_RECIPE, f"out={out}", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_lvlm(tmp_path_factory):
    """A tiny LLaVA saved like a hub model (4 decoder layers, hidden size 64), two images and
    their COCO instances."""
    from vsink.data.demo_lvlm import build_tiny_llava

    root = tmp_path_factory.mktemp("lvlm")
    model, processor = build_tiny_llava()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    for i in (1, 2):
        png(root / "images" / f"img{i}.png", seed=i)
    coco(root / "instances.json")
    return root


# --- unsafe writes and data loss ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["...png", "..png"], ids=["stem-dotdot", "stem-dot"])
def test_maps_writes_nothing_outside_out(tmp_path, capsys, name):
    png(tmp_path / "in" / name)
    area = tmp_path / "area"
    out = area / "out"
    code, _, err = cli(capsys, "maps", tmp_path / "in", "--out", out, "--kind", "norm", "--layers", "0",
                       "--no-progress")
    assert code == 0, err
    assert [p.name for p in area.iterdir()] == ["out"]  # nothing landed beside OUT
    entry = json.loads((out / "maps.json").read_text())["images"][0]
    assert entry["stem"] == "image"  # never '.' or '..'
    assert sorted(p.name for p in out.iterdir()) == ["image", "image.npz", "maps.json", "vsink-run.json"]  # no PNG in OUT itself
    for f in entry["files"]:
        assert (out / f).resolve().is_relative_to((out / "image").resolve()) or f == "image.npz"


def test_maps_outputs_of_two_inputs_never_collide(tmp_path, capsys):
    for i, rel in enumerate(["a/x.png", "b/x.png", "b/X.jpg", "c/x.npz.png", "c/maps.json.png", "c/.hidden.png"]):
        png(tmp_path / "in" / rel, seed=i)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "maps", tmp_path / "in", "--out", out, "--kind", "norm", "--layers", "0",
                       "--no-progress")
    assert code == 0, err
    stems = [m["stem"] for m in json.loads((out / "maps.json").read_text())["images"]]
    entries = [e.casefold() for s in stems for e in (s, f"{s}.npz")]
    assert len(stems) == 6 and len(set(entries)) == len(entries) and "maps.json" not in entries
    assert (out / "maps.json").is_file() and not any(s.startswith(".") for s in stems)


def test_maps_of_images_whose_names_fill_the_file_system_limit(tmp_path, capsys):
    # A 251-byte stem is a legal file name (255 bytes with '.png'), but the temporary file beside
    # '<stem>.npz' ('.<name>.XXXXXXXX.tmp', 14 bytes more) and a second image of that stem ('-2')
    # would exceed 255 bytes: derived names and temporary names must both stay within it.
    long = "é" * 100 + "a" * 47  # 247 bytes in UTF-8: multi-byte characters must not be cut in half
    png(tmp_path / "in" / "d1" / f"{long}.png", seed=1)
    png(tmp_path / "in" / "d2" / f"{long}.png", seed=2)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "maps", tmp_path / "in", "--out", out, "--kind", "norm", "--layers", "0",
                       "--no-progress")
    assert code == 0, err
    stems = [m["stem"] for m in json.loads((out / "maps.json").read_text())["images"]]
    assert len(set(stems)) == 2
    for s in stems:
        assert len(os.fsencode(f"{s}.npz")) <= 255 and (out / f"{s}.npz").is_file() and (out / s).is_dir()
    assert stems[0].startswith("é" * 100)


def test_a_refused_finetune_changes_no_file(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = snapshot(run)
    refused(capsys, "finetune", *TINY_RECIPE, "train.lr=0.5", f"out={run}", "--no-progress",
            match="holds checkpoints of an earlier run")
    assert snapshot(run) == before  # config.yaml included


def test_stale_temp_files_of_a_killed_run_are_removed(tmp_path, capsys):
    png(tmp_path / "in" / "cat.png")
    out = tmp_path / "out"
    argv = ["maps", tmp_path / "in", "--out", out, "--kind", "norm", "--layers", "0", "--no-progress"]
    assert cli(capsys, *argv)[0] == 0
    # what SIGKILL during atomic writes leaves: .<name>.<8 random characters>.tmp
    fd, stale_png = tempfile.mkstemp(prefix=".norm_layer5.png.", suffix=".tmp", dir=out / "cat")
    os.close(fd)
    fd, stale_index = tempfile.mkstemp(prefix=".maps.json.", suffix=".tmp", dir=out)
    os.close(fd)
    (out / "notes.tmp").write_text("the user's")
    assert cli(capsys, *argv)[0] == 0
    assert not Path(stale_png).exists() and not Path(stale_index).exists()
    assert (out / "notes.tmp").read_text() == "the user's"


# --- silent miscounts ---------------------------------------------------------------------------

def test_pope_answers_with_a_cut_last_line_are_not_scored(tmp_path, capsys):
    answers = jsonl(tmp_path / "answers.jsonl", ANSWERS[:6], tail='{"question_id": 6, "split": "random", "lab')
    refused(capsys, "eval", "pope", "--answers", answers, "--out", tmp_path / "out",
            match=r"answers\.jsonl:7: not valid JSON .*cut by an interrupted write")
    assert not (tmp_path / "out").exists()


def test_pope_answers_with_repeated_question_ids_are_refused(tmp_path, capsys):
    answers = jsonl(tmp_path / "answers.jsonl", ANSWERS + [ANSWERS[3]])
    refused(capsys, "eval", "pope", "--answers", answers, "--out", tmp_path / "out",
            match=r"answers\.jsonl:8: question_id 3 repeats line 4")


@pytest.mark.parametrize("first, repeat", [(3, "3"), ("3", 3)], ids=["int-then-text", "text-then-int"])
def test_pope_answers_with_an_id_repeated_as_another_json_type_are_refused(tmp_path, capsys, first, repeat):
    rows = [dict(r) for r in ANSWERS]
    rows[3]["question_id"] = first
    answers = jsonl(tmp_path / "answers.jsonl", rows + [{**ANSWERS[3], "question_id": repeat}])
    refused(capsys, "eval", "pope", "--answers", answers, "--out", tmp_path / "out",
            match=rf"answers\.jsonl:8: question_id {re.escape(json.dumps(repeat))} repeats line 4")
    assert not (tmp_path / "out").exists()


def test_chair_generated_with_repeated_image_and_sample_are_refused(tmp_path, capsys):
    # several captions of an image are each scored (as the reference chair.py does); the same image
    # and sample index twice would score one caption twice
    rows = [{"image_id": 1, "caption": "A dog.", "sample": 0}, {"image_id": 2, "caption": "A cat and a car."},
            {"image_id": 1, "caption": "A bus.", "sample": 0}]
    generated = jsonl(tmp_path / "generated.jsonl", rows)
    refused(capsys, "eval", "chair", "--generated", generated, "--annotations", coco(tmp_path / "instances.json"),
            "--out", tmp_path / "out", match=r"generated\.jsonl:3: image_id 1 sample 0 repeats line 1; each must appear once")
    assert not (tmp_path / "out").exists()
    # a caption without a sample index is the image's next one: sample 0 given, then an unnumbered
    # caption of image 1 (sample 1), then sample 1 given again
    jsonl(generated, [rows[0], rows[1], {"image_id": 1, "caption": "A bus."}, {"image_id": 1, "caption": "x", "sample": 1}])
    refused(capsys, "eval", "chair", "--generated", generated, "--annotations", tmp_path / "instances.json",
            "--out", tmp_path / "out", match=r"item 3: image_id 1 sample 1 was captioned before \(item 2\)")
    jsonl(generated, [rows[0], rows[1], {"image_id": 1, "caption": "A bus."}])
    assert cli(capsys, "eval", "chair", "--generated", generated, "--annotations", tmp_path / "instances.json",
               "--out", tmp_path / "out")[0] == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["generated"]
    assert (results["n"], results["images"]) == (3, 2)
    assert [(c["image_id"], c["sample"]) for c in results["captions"]] == [(1, 0), (2, 0), (1, 1)]


@pytest.mark.parametrize("caption", [None, 42, ["a", "dog"]], ids=["null", "number", "list"])
def test_chair_captions_that_are_not_text_are_refused(tmp_path, capsys, caption):
    generated = jsonl(tmp_path / "generated.jsonl", [{"image_id": 1, "caption": "A dog."},
                                                     {"image_id": 2, "caption": caption}])
    refused(capsys, "eval", "chair", "--generated", generated, "--annotations", coco(tmp_path / "instances.json"),
            "--out", tmp_path / "out", match=r"generated\.jsonl:2: field 'caption' must be text")


# --- values out of range (and of the wrong type) ---------------------------------------------------

@pytest.mark.parametrize("mitigation, setting, message", [
    ("var", "p=1.5", r"var setting 'p' must be a finite number in \[0, 1\], got 1\.5"),
    ("var", "p=-1", r"var setting 'p' must be a finite number in \[0, 1\], got -1"),
    ("var", "rho=2", r"var setting 'rho' must be a finite number in \[0, 1\], got 2"),
    ("var", "tau=-1", r"var setting 'tau' must be a finite number > 0, got -1"),
    ("pai", "alpha=-5", r"pai setting 'alpha' must be a finite number >= 0, got -5"),
    ("pai", "plausibility=2", r"pai setting 'plausibility' must be a finite number in \[0, 1\], got 2"),
    ("pai", "end_layer=1", r"pai setting 'end_layer' must be above start_layer \(2\), got 1"),
    ("var", "p=abc", r"var setting 'p' must be a finite number in \[0, 1\], got 'abc'"),
    ("var", "sink_dims=abc", r"var setting 'sink_dims' must be a non-empty list, each an integer >= 0, or null, got 'abc'"),
    ("fastv", "k=2.5", r"fastv setting 'k' must be an integer >= 1, got 2\.5"),
    ("fastv", "ratio=half", r"fastv setting 'ratio' must be a finite number in \[0, 1\), got 'half'"),
    ("var", "p=.nan", r"var setting 'p' must be a finite number in \[0, 1\], got nan"),
], ids=["var-p-1.5", "var-p--1", "var-rho-2", "var-tau--1", "pai-alpha--5", "pai-plausibility-2",
        "pai-end-below-start", "var-p-abc", "var-sink_dims-abc", "fastv-k-2.5", "fastv-ratio-half", "var-p-nan"])
def test_mitigation_settings_are_refused_before_the_model_loads(photos, tmp_path, capsys, mitigation, setting,
                                                                 message):
    err = refused(capsys, "generate", "--model", tmp_path / "never-loaded", photos / "img1.png",
                  "--prompt", "is there a cat ?", "--mitigation", mitigation, "--set", setting, match=message)
    assert "decoder layers" not in err  # refused before loading


@pytest.mark.parametrize("mitigation, setting", [("var", "start_layer=99"), ("pai", "start_layer=4"),
                                                 ("fastv", "k=4")])
def test_mitigation_layers_beyond_the_decoder_are_refused(tiny_lvlm, capsys, mitigation, setting):
    key = setting.partition("=")[0]
    dims = ["--set", "sink_dims=[1,2]"] if mitigation == "var" else []
    refused(capsys, "generate", "--model", tiny_lvlm / "model", tiny_lvlm / "images" / "img1.png",
            "--prompt", "is there a cat ?", "--mitigation", mitigation, "--set", setting, *dims,
            match=rf"{mitigation} setting '{key}' must be below the 4 decoder layers")


@pytest.mark.parametrize("dims, message", [
    ("0", r"--num-dims: must be an integer >= 1, got '0'"),
    ("-1", r"--num-dims: must be an integer >= 1, got '-1'"),
    ("100000", r"num_dims must be an integer in \[1, 64\]"),
], ids=["0", "-1", "100000"])
def test_calibrate_num_dims_out_of_range(tiny_lvlm, tmp_path, capsys, dims, message):
    refused(capsys, "lvlm", "calibrate", "--model", tiny_lvlm / "model", tiny_lvlm / "images" / "img1.png",
            "--num-dims", dims, "--out", tmp_path / "sinks.json", match=message)
    assert not (tmp_path / "sinks.json").exists()


@pytest.mark.parametrize("flag, value", [("--detection-layer", "99"), ("--highest-layer", "-99")])
def test_register_layers_never_wrap_around_the_depth(tmp_path, capsys, flag, value):
    refused(capsys, "registers", "find", flag, value, "--out", tmp_path / "neurons.json", "--no-progress",
            match=rf"{flag[2:].replace('-', '_')} must be a block index in \[-6, 5\] for the 6 blocks of demo, got {value}")


def test_scan_sink_ratio_below_zero(tmp_path, capsys):
    refused(capsys, "scan", "--sink-ratio", "-1", "--out", tmp_path, match=r"--sink-ratio: must be a finite number > 0")


@pytest.mark.parametrize("overrides, message", [
    (["train.weight_decay=-1"], r"'train\.weight_decay' must be a finite number >= 0, got -1"),
    (["data.eval_images=-5"], r"'data\.eval_images' must be an integer >= 1, got -5"),
    (["loss.cosine=0", "loss.mse=0", "loss.cls=0"], r"loss weights .* are all 0"),
], ids=["weight_decay", "eval_images", "loss-weights"])
def test_finetune_values_out_of_range(tmp_path, capsys, overrides, message):
    refused(capsys, "finetune", *overrides, f"out={tmp_path / 'run'}", match=message)
    assert not (tmp_path / "run").exists()


# --- output paths: checked before the work starts ----------------------------------------------------

@pytest.mark.parametrize("command", ["scan", "eval pope", "generate"])
def test_out_that_is_a_file(tmp_path, capsys, photos, command):
    existing = tmp_path / "existing"
    existing.write_text("keep")
    argv, flag = {
        "scan": (["scan"], "--out"),
        "eval pope": (["eval", "pope", "--answers", jsonl(tmp_path / "answers.jsonl", ANSWERS)], "--out"),
        "generate": (["generate", "--model", tmp_path / "never-loaded", photos / "img1.png", "--prompt", "x"],
                     "--export-attention"),
    }[command]
    err = refused(capsys, *argv, flag, existing, match=rf"argument {flag}: .*exists and is not a directory")
    assert "SYNTHETIC" not in err and existing.read_text() == "keep"  # refused before anything was loaded


@pytest.mark.parametrize("argv", [["registers", "find"], ["lvlm", "calibrate", "--model", "never-loaded"]],
                         ids=["registers-find", "lvlm-calibrate"])
def test_out_that_is_a_directory_where_a_file_is_expected(tmp_path, capsys, argv):
    err = refused(capsys, *argv, "--out", tmp_path, match=r"argument --out: .*it is a directory; give a file path")
    assert "SYNTHETIC" not in err


@pytest.mark.parametrize("command", ["scan", "maps", "finetune"])
def test_out_in_a_read_only_directory(capsys, command):
    with read_only_dir() as ro:
        out = ro / "out"
        argv = [command, f"out={out}"] if command == "finetune" else [command, "--out", out]
        err = refused(capsys, *argv, match=r"not writable")
        assert not out.exists() and "SYNTHETIC" not in err


# --- NaN and infinity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--threshold", "nan"), ("--threshold", "inf"), ("--threshold", "sigma:nan"),
                                         ("--sink-ratio", "nan")])
def test_scan_nan_settings_replace_nothing(scanned, capsys, flag, value):
    before = snapshot(scanned)
    refused(capsys, "scan", flag, value, "--out", scanned, "--no-progress", match=rf"argument {flag}: must be")
    assert snapshot(scanned) == before


def test_register_find_min_selectivity_nan(tmp_path, capsys):
    refused(capsys, "registers", "find", "--min-selectivity", "nan", "--out", tmp_path / "n.json",
            match=r"--min-selectivity: must be a finite number >= 0, got 'nan'")


def test_dense_lost_biases_nan(tmp_path, capsys):
    refused(capsys, "eval", "dense", "--lost-biases", "0,nan", "--out", tmp_path,
            match=r"--lost-biases: must be a non-empty list, each a finite number, got '0,nan'")


@pytest.mark.parametrize("scale", ["nan", "inf"])
def test_ttr_scale_not_finite(neurons, tmp_path, capsys, scale):
    refused(capsys, "scan", "--test-time-registers", neurons, "--ttr-scale", scale, "--out", tmp_path,
            match=r"--ttr-scale: must be a finite number")


def test_nan_weights_are_named_with_their_block(demo_state, tmp_path, capsys):
    state = dict(demo_state)
    state["blocks.3.mlp.fc1.weight"] = state["blocks.3.mlp.fc1.weight"].clone()
    state["blocks.3.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    refused(capsys, "scan", "--weights", tmp_path / "nan.safetensors", "--out", tmp_path / "out", "--no-progress",
            match=r"'blocks\.3\.mlp\.fc1\.weight' holds NaN or infinite values \(first in block 3\)")
    assert not (tmp_path / "out").exists()


def test_infinite_activations_are_named_with_their_block(neurons, tmp_path, capsys):
    """A finite scale too large for float32 makes the moved activations infinite at block 2."""
    refused(capsys, "scan", "--test-time-registers", neurons, "--ttr-scale", "1e39", "--out", tmp_path / "out",
            "--no-progress", match=r"non-finite activations \(NaN or inf\) first appear in the output of block 2")
    assert not (tmp_path / "out").exists()


# --- weights and saved models ----------------------------------------------------------------------------

def test_a_wrong_shaped_tensor_is_reported_like_a_missing_key(demo_state, tmp_path, capsys):
    state = dict(demo_state)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(10, 10)
    del state["blocks.5.norm1.bias"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    qkv = list(demo_state["blocks.0.attn.qkv.weight"].shape)
    refused(capsys, "scan", "--weights", tmp_path / "bad.safetensors", "--out", tmp_path / "out",
            match=rf"does not match the model: missing blocks\.5\.norm1\.bias; wrong shape blocks\.0\.attn\.qkv\.weight "
                  rf"\[10, 10\] \(the model's: \[{qkv[0]}, {qkv[1]}\]\)")


@pytest.mark.parametrize("field, value, message", [
    ("spec", "SELF", r"field 'spec' must be demo, timm:NAME"),
    ("mean", 5, r"field 'mean' must be a list of 3 entries, each a finite number, got 5"),
    ("img_size", "abc", r"field 'img_size' must be a list of 2 entries"),
    ("hooked_registers", -3, r"field 'hooked_registers' must be an integer in \[0, 1024\], got -3"),
], ids=["spec-is-its-own-folder", "mean-5", "img_size-abc", "hooked_registers--3"])
def test_tampered_vsink_json(saved_demo, tmp_path, capsys, field, value, message):
    model = shutil.copytree(saved_demo, tmp_path / "model")
    meta = json.loads((model / "vsink.json").read_text())
    meta[field] = str(model) if value == "SELF" else value
    (model / "vsink.json").write_text(json.dumps(meta))
    refused(capsys, "scan", "--model", model, "--out", tmp_path / "out", match=rf"vsink\.json: {message}")


def test_tampered_spec_in_a_folder_named_like_a_spec_cannot_recurse(saved_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = shutil.copytree(saved_demo, tmp_path / "timm:loop")
    meta = json.loads((model / "vsink.json").read_text())
    (model / "vsink.json").write_text(json.dumps({**meta, "spec": "timm:loop"}))
    code, _, err = cli(capsys, "scan", "--model", "timm:loop", "--out", tmp_path / "out")
    assert code == 2 and "Traceback" not in err  # the folder's spec is read as a timm name, never as the folder
    assert err.startswith("vsink: error: cannot load model 'timm:loop': timm has no model named 'loop'")


def test_resume_with_another_register_count(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = snapshot(run)
    refused(capsys, "finetune", *TINY_RECIPE, "registers.n=3", "train.steps=4", f"out={run}", "--resume",
            "--no-progress",
            match=r"--resume: the run in .* was made with registers\.n=2, this recipe has 3")
    assert snapshot(run) == before


def test_resume_without_the_earlier_recipe_checks_the_checkpoint_first(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    (run / "config.yaml").unlink()
    before = snapshot(run)
    refused(capsys, "finetune", *TINY_RECIPE, "registers.n=3", "train.steps=4", f"out={run}", "--resume",
            "--no-progress",
            match=r"checkpoint .*step_0000002 does not match the model: wrong shape reg_token \[1, 2, 48\] "
                  r"\(the model's: \[1, 3, 48\]\)")
    assert snapshot(run) == before


# --- readers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line", ["5", "null"])
def test_jsonl_line_that_is_not_an_object(tmp_path, capsys, line):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps(ANSWERS[0]) + "\n" + line + "\n")
    refused(capsys, "eval", "pope", "--answers", answers, "--out", tmp_path / "out",
            match=r"answers\.jsonl:2: not a JSON object")


def test_invalid_utf8_in_pope_answers(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(json.dumps(ANSWERS[0]).encode() + b'\n{"answer": "\xff"}\n')
    refused(capsys, "eval", "pope", "--answers", answers, "--out", tmp_path / "out",
            match=r"answers\.jsonl:2: not UTF-8 text")


def test_invalid_utf8_in_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"recipe: posthoc\nseed: 0\nout: caf\xe9\n")
    refused(capsys, "finetune", "--config", recipe, match=r"recipe\.yaml:3: not UTF-8 text")


def test_invalid_utf8_in_a_voc_split_list(tmp_path, capsys):
    root = tmp_path / "VOC"
    png(root / "JPEGImages" / "a.png")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_bytes(b"a\n\xff\xfe\n")
    refused(capsys, "eval", "dense", "--format", "voc", "--data", root, "--tasks", "lost", "--out", tmp_path / "out",
            match=r"val\.txt:2: not UTF-8 text")


@pytest.mark.parametrize("where", ["pope-line", "chair-instances", "dense-coco", "neuron-spec"])
def test_pathological_nesting(tmp_path, capsys, where):
    deep = deep_json(tmp_path / "deep.json")
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps(ANSWERS[0]) + "\n" + deep.read_text() + "\n")
    generated = jsonl(tmp_path / "generated.jsonl", [{"image_id": 1, "caption": "A dog."}])
    argv, named = {
        "pope-line": (["eval", "pope", "--answers", answers], r"answers\.jsonl:2"),
        "chair-instances": (["eval", "chair", "--generated", generated, "--annotations", deep], r"deep\.json"),
        "dense-coco": (["eval", "dense", "--format", "coco", "--data", deep], r"deep\.json"),
        "neuron-spec": (["scan", "--test-time-registers", deep], r"deep\.json"),
    }[where]
    refused(capsys, *argv, "--out", tmp_path / "out", match=rf"{named}: nested too deeply")


def yaml_alias_bomb(levels: int = 9) -> str:
    """``levels`` levels of nine aliases in flow style: ~600 bytes, 9**levels values expanded."""
    parts = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    parts += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "{" + ", ".join(parts) + "}"


@pytest.mark.parametrize("where", ["recipe-override", "mitigation-set"])
def test_yaml_alias_bombs_are_refused_where_yaml_enters(tmp_path, capsys, where):
    """Every YAML value goes through one reader, which refuses a document whose aliases expand it
    past its own size (issue 20: nine levels of nine aliases used to hang the checks)."""
    bomb = yaml_alias_bomb()
    argv, named = {
        "recipe-override": (["finetune", *TINY_RECIPE, f"model.model_kwargs={bomb}", f"out={tmp_path / 'run'}"],
                            r"model\.model_kwargs=\.\.\."),
        "mitigation-set": (["generate", png(tmp_path / "a.png"), "--model", "demo-llava", "--prompt", "<image> hi",
                            "--mitigation", "var", "--set", f"var.start_layer={bomb}"], r"var\.start_layer=\.\.\."),
    }[where]
    refused(capsys, *argv, match=rf"{named}: its aliases \(\*name\) expand it to more than")


@pytest.mark.parametrize("override, message", [
    ({"annotations": {"1": {"image_id": 1, "category_id": 1}}}, r"field 'annotations' must be a list, got an object"),
    ({"categories": [1, 2, 3]}, r"categories\[0\] must be an object, got 1"),
], ids=["annotations-dict", "categories-ints"])
@pytest.mark.parametrize("reader", ["pope", "dense"])
def test_coco_files_of_the_wrong_shape(tmp_path, capsys, override, message, reader):
    instances = coco(tmp_path / "instances.json", **override)
    png(tmp_path / "images" / "img1.png")
    if reader == "pope":
        argv = ["eval", "pope", "--annotations", instances, "--build-only", "--out", tmp_path / "out"]
    else:
        argv = ["eval", "dense", tmp_path / "images", "--format", "coco", "--data", instances,
                "--out", tmp_path / "out"]
    refused(capsys, *argv, match=rf"instances\.json: {message}")


def test_neuron_spec_settings_not_a_mapping(tmp_path, capsys):
    spec = tmp_path / "neurons.json"
    spec.write_text(json.dumps({"model": "demo", "neurons": [{"layer": 2, "neuron": 0}], "settings": [1, 2]}))
    refused(capsys, "scan", "--test-time-registers", spec, "--out", tmp_path / "out",
            match=r"neurons\.json: field 'settings' must be a mapping with string keys, got \[1, 2\]")


@pytest.mark.parametrize("answer", [7, ["yes"]], ids=["number", "list"])
def test_pope_answer_that_is_not_text(tmp_path, capsys, answer):
    answers = jsonl(tmp_path / "answers.jsonl", ANSWERS[:3] + [{**ANSWERS[3], "answer": answer}])
    refused(capsys, "eval", "pope", "--answers", answers, "--out", tmp_path / "out",
            match=r"answers\.jsonl:4: field 'answer' must be text")


def test_resuming_over_answers_without_question_ids(tiny_lvlm, tmp_path, capsys):
    questions = jsonl(tmp_path / "questions.jsonl", [
        {"question_id": i, "image": "img1.png", "object": "dog", "split": "random", "label": "yes",
         "text": "Is there a dog in the image?"} for i in range(2)])
    (tmp_path / "out" / "none").mkdir(parents=True)
    jsonl(tmp_path / "out" / "none" / "answers.jsonl", [{"split": "random", "label": "yes", "answer": "yes"}])
    refused(capsys, "eval", "pope", tiny_lvlm / "images", "--model", tiny_lvlm / "model", "--questions",
            questions, "--out", tmp_path / "out", "--no-progress",
            match=r"answers\.jsonl:1: missing field\(s\) question_id")


def test_pope_prompt_with_an_unknown_field(tmp_path, capsys):
    refused(capsys, "eval", "pope", "--answers", jsonl(tmp_path / "a.jsonl", ANSWERS), "--prompt", "Q: {0}",
            "--out", tmp_path / "out", match=r"--prompt: must be text with the field\(s\) \{question\}.*unknown field \{0\}")


# --- generate: image placeholders ----------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, images", [(["<image> <image> is there a cat ?"], 1),
                                             (["<image> <image> is there a cat ?", "<image> is there a dog ?"], 2)],
                         ids=["two-for-one-image", "three-for-two-images"])
def test_more_image_placeholders_than_images(tiny_lvlm, capsys, prompts, images):
    argv = ["generate", *[tiny_lvlm / "images" / f"img{i + 1}.png" for i in range(images)], "--model",
            tiny_lvlm / "model", "--max-new-tokens", "1"]
    for p in prompts:
        argv += ["--prompt", p]
    refused(capsys, *argv, match=r"prompt 0 has 2 '<image>' placeholders for its one image")


# --- recipe values ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.lr=-0.001", r"'train\.lr' must be a finite number > 0, got -0\.001"),
    ("train.lr=.nan", r"'train\.lr' must be a finite number > 0, got nan"),
    (f"seed={2 ** 70}", rf"'seed' must be an integer in \[0, 4294967295\], got {2 ** 70}"),
    ("seed=2**70", r"'seed' must be an integer in \[0, 4294967295\], got '2\*\*70'"),
], ids=["lr-negative", "lr-nan", "seed-2^70", "seed-text"])
def test_recipe_values_out_of_range(tmp_path, capsys, override, message):
    refused(capsys, "finetune", override, f"out={tmp_path / 'run'}", match=message)
    assert not (tmp_path / "run").exists()


def test_dense_lr_nan(tmp_path, capsys):
    refused(capsys, "eval", "dense", "--lr", "nan", "--out", tmp_path, match=r"--lr: must be a finite number > 0")


def test_absurd_batch_size_is_refused_with_an_estimate(tmp_path, capsys):
    refused(capsys, "finetune", *TINY_RECIPE, "train.batch_size=100000000", f"out={tmp_path / 'run'}",
            match=r"train\.batch_size=100000000 needs about [\d.]+ [TP]iB of activations for one step .* more than "
                  r"the [\d.]+ [GMT]iB of cpu")
    assert not (tmp_path / "run").exists()


# --- issue 20, item 5: the LVLM's context --------------------------------------------------------

def test_generation_beyond_the_lvlm_context_is_refused_naming_the_limit(capsys, tmp_path):
    from vsink.data.demo_llava import TEXT

    photo = tmp_path / "p.png"
    Image.new("RGB", (32, 32), (90, 120, 30)).save(photo)
    limit = f"{TEXT['max_position_embeddings']:,}"  # the demo LVLM's config: 2,048 positions
    err = refused(capsys, "generate", photo, "--model", "demo-llava", "--prompt", "describe", "--max-new-tokens",
                  "5000", match=rf"max_new_tokens 5,000 after a prompt of \d+ tokens goes beyond demo-llava's context "
                                rf"of {limit} tokens \(max_position_embeddings\): at most [\d,]+ here")
    prompt, room = re.search(r"prompt of (\d+) tokens.*at most ([\d,]+) here", err).groups()
    assert int(room.replace(",", "")) == TEXT["max_position_embeddings"] - int(prompt)
    # a prompt far beyond the context: ~6,000 words for 2,048 positions
    refused(capsys, "generate", photo, "--model", "demo-llava", "--prompt", "a cat " * 3000, "--max-new-tokens", "1",
            match=rf"the prompt is [\d,]+ tokens with its image, beyond demo-llava's context of {limit} tokens")


def test_generate_api_refuses_a_fractional_max_new_tokens(demo_lvlm_inputs):
    from vsink.lvlm.generate import generate
    from vsink.options import OptionError

    lvlm, inputs = demo_lvlm_inputs
    with pytest.raises(OptionError, match=r"'max_new_tokens' must be an integer >= 1, got 2.5"):
        generate(lvlm, inputs, max_new_tokens=2.5)


@pytest.fixture(scope="module")
def demo_lvlm_inputs():
    from vsink.backbones.hf_lvlm import load_lvlm

    lvlm = load_lvlm("demo-llava")
    return lvlm, lvlm.prepare([Image.new("RGB", (32, 32), (90, 120, 30))], ["describe"])
