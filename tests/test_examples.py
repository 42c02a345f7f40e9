"""The examples run as written."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_scan_demo_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["scan_demo.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "scan_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "emergence layer: 2" in out and (tmp_path / "scan.json").exists()


def test_sites_example(capsys):
    runpy.run_path(str(EXAMPLES / "sites.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "1 cls + 4 registers + 7x7 patches" in out and "output change" in out


def test_export_maps_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["export_maps.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "export_maps.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "register model, block 3" in out
    assert (tmp_path / "demo" / "china" / "contact.png").exists()
    assert (tmp_path / "registers" / "flower.npz").exists()


def test_test_time_registers_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ttr_demo.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "ttr_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "register neurons: [(2, 0), (2, 1), (2, 2), (2, 3)]" in out
    assert "after: no high-norm tokens found; layout" in out
    assert (tmp_path / "after" / "report.html").exists()


def test_dense_eval_example(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setattr(sys, "argv", ["dense_eval.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "dense_eval.py"), run_name="__main__")
    assert "| LOST CorLoc (%) |" in capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    base, ttr = data["variants"]["baseline"], data["variants"]["ttr"]
    assert base["artifacts"]["outlier_fraction"] > 0 and ttr["artifacts"]["outlier_fraction_max"] == 0
    assert len(base["lost"]["sweep"]) == 4 and base["linear_seg"]["n_train"] == 32
    assert (tmp_path / "results.html").exists()


def test_posthoc_registers_example(posthoc_example_run):
    """The example's run is a session fixture (conftest.py): tests/test_finetune.py checks its metrics."""
    folder, out = posthoc_example_run
    assert "original: 1 cls + 0 registers + 7x7 patches; emergence layer 2" in out
    assert "student: 1 cls + 4 registers + 7x7 patches; no high-norm tokens found" in out
    assert (folder / "final" / "vsink.json").exists() and (folder / "metrics.jsonl").exists()


def test_lvlm_mitigations_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lvlm_mitigations.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "lvlm_mitigations.py"), run_name="__main__")
    out = capsys.readouterr().out
    for name in ("none", "var", "pai", "fastv", "opera"):
        assert f"{name:>5}: [" in out
    assert (tmp_path / "var-attention" / "row1.npz").exists()


def test_llava15_gpu_script_runs_on_a_tiny_saved_model(tmp_path, monkeypatch, capsys):
    """The GPU reproduction script, pointed at a tiny LLaVA saved locally, on the CPU."""
    from vsink.data.demo_lvlm import build_tiny_llava

    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    monkeypatch.setattr(sys, "argv", ["llava15_gpu.py", "--model", str(tmp_path / "tiny"), "--device", "cpu",
                                      "--dtype", "float32", "--sink-dims", "3,7", "--max-new-tokens", "3",
                                      "--out", str(tmp_path / "out")])
    runpy.run_path(str(EXAMPLES / "llava15_gpu.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "--- var (" in out and "--- fastv (" in out
    assert (tmp_path / "out" / "pai" / "1" / "row1.npz").exists()


def test_pope_chair_example(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setattr(sys, "argv", ["pope_chair.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "pope_chair.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "fastv (Δ vs none)" in out and "over 2 captions" in out
    results = json.loads((tmp_path / "pope" / "results.json").read_text())
    assert results["results"]["none"]["mean"]["n"] == 2 * 3 * 6  # 2 images, 3 splits, 6 questions


@pytest.mark.parametrize("argv, message", [
    (["--model", "vsink-tests/never-published-llava", "--device", "cpu"],
     "hf:vsink-tests/never-published-llava: cannot load a config ("),
    pytest.param([], "device 'cuda' requested but CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
], ids=["hub-unreachable", "no-gpu"])
def test_llava15_gpu_script_without_hub_or_gpu_is_one_line(monkeypatch, capsys, argv, message):
    """Offline (HF_HUB_OFFLINE=1, set by conftest) or without a GPU: a one-line error, exit code 2."""
    monkeypatch.setattr(sys, "argv", ["llava15_gpu.py", *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(EXAMPLES / "llava15_gpu.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"llava15_gpu.py: error: {message}") and "needs network access" in err


def test_ablate_demo_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ablate_demo.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "ablate_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "neurons    block 2 zero" in out and "high-norm tokens 69 -> 0" in out
    assert (tmp_path / "report.html").exists() and (tmp_path / "vsink-run.json").exists()


def test_sinder_repair_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSINK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["sinder_repair.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "sinder_repair.py"), run_name="__main__")
    out = capsys.readouterr().out
    # 3 lit patches per image, flagged after each of the 3 blocks (the construction), none after
    assert "per held-out image (all blocks): 9 before, 0 after" in out and "stopped early" in out
    assert (tmp_path / "run" / "final" / "vsink.json").exists()
