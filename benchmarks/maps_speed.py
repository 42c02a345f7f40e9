"""Time of ``vsink maps`` against ``vsink scan`` on the same photos, as a user runs them.

Each command runs as a fresh process (``python -m vsink.cli ...``, ``OMP_NUM_THREADS=1``) on
the same skimage photos (astronaut, camera, chelsea, coffee, rocket: square and non-square), into
a temporary folder, ``--repeats`` times interleaved. Printed per command: the median wall time,
the median CPU time (user + sys of the child), both per image, and the files written. CPU time is
the steadier figure on a shared machine.

``--checkout DIR`` runs the commands from another checkout of vsink (e.g. a ``git worktree`` of
an older commit), so a change is measured before and after in the same way:

    python benchmarks/maps_speed.py                        # this checkout, demo model
    python benchmarks/maps_speed.py --checkout /tmp/vsink-before
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket")


def _photos(folder: Path) -> list[Path]:
    import numpy as np
    import skimage.data
    from PIL import Image

    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.png"
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(path)
        paths.append(path)
    return paths


def _run(command: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: "list[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the vsink checkout whose code runs (default: this one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        photos = [str(p) for p in _photos(tmp / "photos")]
        commands = {
            "maps": [sys.executable, "-m", "vsink.cli", "maps", *photos, "--model", args.model, "--no-progress",
                     "--out", str(tmp / "maps")],
            "scan": [sys.executable, "-m", "vsink.cli", "scan", *photos, "--model", args.model, "--no-progress",
                     "--out", str(tmp / "scan")],
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(_run(command, args.checkout))
        n = len(photos)
        print(f"checkout {args.checkout}, model {args.model}, {n} photos, OMP_NUM_THREADS=1, "
              f"{args.repeats} repeat(s), medians")
        for name, runs in times.items():
            wall = statistics.median(w for w, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            files = sum(1 for _ in (tmp / name).rglob("*") if _.is_file())
            print(f"  vsink {name}: wall {wall:6.1f} s ({wall / n:5.2f} s/image), CPU {cpu:6.1f} s "
                  f"({cpu / n:5.2f} s/image), {files} files")


if __name__ == "__main__":
    main()
