"""The same commands under ``torchrun`` (two gloo processes on CPU) give the outputs of one process.

Each test runs a command once as ``python -m vsink`` and once as ``python -m torch.distributed.run
--standalone --nproc-per-node 2 -m vsink`` on tiny inputs, and compares the output files: the
batches are cut as one process cuts them and rank 0 pools over all items, so the numbers are
equal, not close (both runs use one thread per process)."""

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


def _command(args: list[str], world: int) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "vsink", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "vsink", *args]


def one(*args: str) -> None:
    """The command as one process, in this process (today's behaviour; saves an interpreter start)."""
    from vsink.cli import main

    assert main([*args, "--no-progress"]) == 0


def vsink(*args: str, world: int = 1, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command([*args, "--no-progress"], world), env=_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if ok:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Five small images of different sizes and one file that is not an image (skipped in its batch)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "im2b.png").write_bytes(b"not an image")
    return folder


def _same_npz(a: Path, b: Path) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files)
        for name in x.files:
            assert np.array_equal(x[name], y[name]), name


def _record(folder: Path) -> dict:
    return json.loads((folder / "vsink-run.json").read_text())


def test_scan_two_processes_equal_one(tmp_path, images):
    common = ["scan", str(images), "--model", "demo", "--img-size", "112", "--batch-size", "2"]
    one(*common, "--out", str(tmp_path / "one"))
    two = vsink(*common, "--out", str(tmp_path / "two"), world=2)
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    scan = json.loads((one_dir / "scan.json").read_text())
    # 5 images in batches of 2 (im2b.png is skipped in batch 2): each rank scanned some, rank 0 pooled
    assert len(scan["images"]) == 5 and [Path(s["image"]).name for s in scan["skipped"]] == ["im2b.png"]
    assert (two_dir / "scan.json").read_text() == (one_dir / "scan.json").read_text()
    assert (two_dir / "report.html").read_text() == (one_dir / "report.html").read_text()
    _same_npz(one_dir / "trace.npz", two_dir / "trace.npz")
    assert _record(two_dir)["determining"] == _record(one_dir)["determining"]
    assert _record(two_dir)["files"] == _record(one_dir)["files"]
    assert two.stdout.count("scanned 5 images (1 skipped)") == 1  # rank 0 alone reports
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in one_dir.iterdir())


def test_commands_that_do_not_split_their_work_are_refused_under_torchrun(tmp_path, images):
    done = vsink("ablate", str(images), "--model", "demo", "--out", str(tmp_path / "a"), ok=False,
                 WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("vsink: error: vsink ablate does not split its work")
    assert not (tmp_path / "a").exists()
