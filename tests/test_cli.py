"""`vsink scan` end to end: outputs, schema, bad input, interruption."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vsink
from vsink.cli import main
from vsink.data import demo_model as D
from conftest import printed


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_scan_demo_writes_schema(demo_scan):
    """``vsink scan`` with every default (run once for the suite: conftest.py)."""
    out, err = printed(demo_scan)
    assert "SYNTHETIC" in err
    data = json.loads((demo_scan / "scan.json").read_text())
    assert data["model"] == "demo" and data["synthetic"] is True
    assert data["layout"] == {"cls": 1, "registers": 0, "register_position": "none", "registers_after_cls": 0,
                              "registers_appended": 0, "grid": [14, 14], "tokens": 197}
    assert data["images"] == ["sklearn:china.jpg", "sklearn:flower.jpg"] and data["skipped"] == []
    assert [layer["index"] for layer in data["layers"]] == list(range(6))
    for layer in data["layers"]:
        assert set(layer["norm"]) >= {"median", "max", "ratio", "threshold", "outlier_fraction"}
        assert set(layer["attention"]) == {"cls_received", "register_received", "max_patch_received", "entropy"}
    assert data["high_norm"]["emergence_layer"] == D.PLANTED_BLOCK
    token = data["high_norm"]["tokens"][0]
    assert set(token) == {"image", "layer", "token", "row", "col", "norm"}
    assert {"layer", "token", "kind", "share"} <= set(data["sinks"][0])
    html = (demo_scan / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Synthetic demo model" in html
    trace = vsink.Trace.load(demo_scan / "trace.npz")
    assert trace.norms.shape == (6, 2, 197)
    assert f"emergence layer {D.PLANTED_BLOCK}" in out


def make_image_dir(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).convert("CMYK").save(root / "b.jpg")
    (root / "c.jpg").write_bytes((root / "b.jpg").read_bytes()[:100])
    (root / "d.png").write_bytes(b"")
    (root / "e.gif").write_text("not an image")
    return root


def test_bad_files_are_skipped_and_listed(tmp_path, capsys):
    images = make_image_dir(tmp_path / "imgs")
    code, out, err = run(capsys, "scan", str(images), "--out", str(tmp_path / "out"), "--batch-size", "2",
                         "--no-progress")
    assert code == 0, err
    data = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert data["images"] == [str(images / "a.png"), str(images / "b.jpg")]
    skipped = {s["image"]: s["reason"] for s in data["skipped"]}
    assert set(skipped) == {str(images / n) for n in ("c.jpg", "d.png", "e.gif")}
    assert "truncated" in skipped[str(images / "c.jpg")] and "empty" in skipped[str(images / "d.png")]
    assert "skipped" in err


def test_nothing_scannable_exits_nonzero(tmp_path, capsys):
    (tmp_path / "x.jpg").write_bytes(b"")
    code, out, err = run(capsys, "scan", str(tmp_path / "x.jpg"), "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 2 and "no image could be scanned" in err
    assert err.count("vsink: skipped") == 1  # reported once, as the scan met it
    assert not (tmp_path / "out" / "scan.json").exists()


@pytest.mark.parametrize("args, message", [
    (["scan", "/no/such/image.jpg"], "no such file or directory"),
    (["scan", "--model", "nope:thing"], "supported model specs"),
    (["scan", "--img-size", "100"], "not a multiple of the patch size"),
    (["scan", "--threshold", "loud"], "must be auto, sigma:K (K a finite number >= 0) or an absolute norm"),
])
def test_clear_errors(args, message, tmp_path, capsys):
    code, out, err = run(capsys, *args, "--out", str(tmp_path), "--no-progress")
    assert code == 2 and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "scan.json").exists()


def test_empty_directory_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "scan", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 2 and "contains no image files" in err


def test_interrupted_scan_leaves_no_json(tmp_path, capsys, monkeypatch):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(images / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "scan.json").write_text('{"previous": true}')
    calls = {"n": 0}
    original = vsink.Probe.run

    def interrupt_second_batch(self, pixel_values):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, pixel_values)

    monkeypatch.setattr(vsink.Probe, "run", interrupt_second_batch)
    code, _, err = run(capsys, "scan", str(images), "--batch-size", "2", "--out", str(out), "--no-progress")
    assert code == 130 and "interrupted" in err
    assert json.loads((out / "scan.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in out.iterdir()) == ["scan.json"]


def test_threshold_options(tmp_path, capsys):
    code, out, _ = run(capsys, "scan", "--threshold", "1e9", "--out", str(tmp_path), "--no-progress")
    assert code == 0
    data = json.loads((tmp_path / "scan.json").read_text())
    assert data["high_norm"]["method"] == "absolute" and data["high_norm"]["tokens"] == []
    code, out, _ = run(capsys, "scan", "--threshold", "sigma:2", "--out", str(tmp_path), "--no-progress")
    assert json.loads((tmp_path / "scan.json").read_text())["high_norm"]["settings"] == {"method": "sigma", "k": 2.0}


def test_console_script_entry_point():
    script = shutil.which("vsink") or str(Path(sys.executable).parent / "vsink")
    result = subprocess.run([script, "models"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "hf:REPO_OR_LOCAL_DIR" in result.stdout
