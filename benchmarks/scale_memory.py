"""Peak memory per rank of sharded commands under ``torchrun`` as the number of items grows
(issue 24 item 4: memory per rank stays flat in the number of items).

For each command, a 2-process launch (``python -m torch.distributed.run --standalone
--nproc-per-node 2``, gloo, one thread per process) on N items and one on ``--factor`` x N items;
each rank runs :func:`vsink.cli.main` as ``torchrun -m vsink`` does and then reads its own peak
RSS (``VmHWM`` of ``/proc/self/status``: the process's high-water mark, not ``ru_maxrss``, which
Linux carries across exec from the launcher). Printed per command and rank: the two peaks and their
ratio. Items: 64 x 64 crops of the scikit-image photos (as ``benchmarks/scan_memory.py`` writes
them); ``scan`` on the demo ViT (224 px, batch 8), ``generate`` on the demo LVLM (one prompt,
batches of 2, 4 new tokens, texts to ``--out``), ``eval pope`` on the demo LVLM (6 questions per
image, batches of 4, 2 new tokens).

Target: at the larger count each rank's peak is <= 1.2x its peak at the smaller.

    python benchmarks/scale_memory.py                          # scan, generate, pope; N = 40, 160 (~17 min here)
    python benchmarks/scale_memory.py --commands scan --items 100 --factor 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scan_memory import write_pngs  # noqa: E402  (the sibling benchmark's deterministic crops)

COMMANDS = ("scan", "generate", "pope")
#: POPE's questions need images with at least 3 object classes; these 6 classes, 3 per image
CLASSES = ["apple", "bird", "car", "dog", "person", "umbrella"]


def _coco(folder: Path, count: int) -> Path:
    """Instances naming 3 of :data:`CLASSES` in each of ``count`` images ``folder/<i>.png``."""
    data = {"categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
            "images": [{"id": i + 1, "file_name": f"{i:05d}.png"} for i in range(count)],
            "annotations": [{"image_id": i + 1, "category_id": (i + k) % len(CLASSES) + 1, "bbox": [0, 0, 1, 1]}
                            for i in range(count) for k in range(3)]}
    path = folder.parent / f"{folder.name}.json"
    path.write_text(json.dumps(data))
    return path


def _argv(command: str, folder: Path, count: int, out: Path) -> list[str]:
    if command == "scan":
        return ["scan", str(folder), "--model", "demo", "--batch-size", "8", "--out", str(out)]
    if command == "generate":
        return ["generate", str(folder), "--model", "demo-llava", "--prompt", "Describe the image.",
                "--batch-size", "2", "--max-new-tokens", "4", "--out", str(out)]
    return ["eval", "pope", str(folder), "--model", "demo-llava", "--annotations", str(_coco(folder, count)),
            "--num-images", str(count), "--splits", "random", "--batch-size", "4", "--max-new-tokens", "2",
            "--out", str(out)]


def worker(report: str, argv: list[str]) -> None:
    """One rank: the command, then this process's peak RSS into ``report/rank<R>.json``."""
    from vsink.cli import main

    code = main([*argv, "--no-progress"])
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    rank = int(os.environ.get("RANK", "0"))
    (Path(report) / f"rank{rank}.json").write_text(json.dumps({"kib": peak, "code": code}))


def launch(argv: list[str], report: Path) -> dict[int, float]:
    """Peak RSS in MiB per rank of a 2-process launch of ``vsink ARGV`` (each rank's in ``report``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    report.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(Path(__file__).resolve()), "--worker", str(report), *argv], env=env,
                          capture_output=True, text=True)
    peaks = {}
    for rank in (0, 1):
        path = report / f"rank{rank}.json"
        if done.returncode != 0 or not path.exists():
            sys.exit(f"launch of vsink {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        row = json.loads(path.read_text())
        if row["code"] != 0:
            sys.exit(f"rank {rank} of vsink {' '.join(argv)} exited {row['code']}:\n{done.stderr[-3000:]}")
        peaks[rank] = row["kib"] / 1024
    return peaks


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--commands", default=",".join(COMMANDS), help=f"comma-separated, of {', '.join(COMMANDS)}")
    p.add_argument("--items", type=int, default=40, help="the smaller count N (images)")
    p.add_argument("--factor", type=int, default=4, help="the larger count is FACTOR x N")
    args = p.parse_args(argv)
    commands = [c for c in args.commands.split(",") if c]
    unknown = sorted(set(commands) - set(COMMANDS))
    if unknown:
        p.error(f"--commands: unknown {', '.join(unknown)} (known: {', '.join(COMMANDS)})")
    counts = (args.items, args.items * args.factor)
    results: dict[str, dict[int, dict[int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            write_pngs(Path(tmp) / f"pngs{count}", count)
        for command in commands:
            results[command] = {count: launch(_argv(command, Path(tmp) / f"pngs{count}", count,
                                                    Path(tmp) / f"{command}{count}"), Path(tmp) / f"peaks-{command}{count}")
                                for count in counts}
    print(f"peak RSS per rank (MiB), 2 processes (gloo, one thread each), {counts[0]} and {counts[1]} images")
    print(f"{'command':>9} {'rank':>5} {f'{counts[0]} items':>10} {f'{counts[1]} items':>10} {'ratio':>7}")
    worst = 0.0
    for command, rows in results.items():
        for rank in (0, 1):
            small, large = rows[counts[0]][rank], rows[counts[1]][rank]
            worst = max(worst, large / small)
            print(f"{command:>9} {rank:>5} {small:>10.0f} {large:>10.0f} {large / small:>6.2f}x")
    print(f"target: each rank's peak at {counts[1]} items <= 1.2x at {counts[0]}: "
          f"{'MET' if worst <= 1.2 else 'NOT MET'} (worst {worst:.2f}x)")


if __name__ == "__main__":
    main()
