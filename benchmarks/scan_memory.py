"""Peak memory of ``vsink scan`` as the number of images grows (issue 12: flat memory).

Writes small PNGs (64 x 64 crops of the photos bundled with scikit-image, deterministic) into a
temporary folder, then runs ``vsink scan FOLDER --out OUT`` on the built-in demo model as a whole
process for each image count, and prints per count: the process's peak RSS (VmHWM, read by the
process itself when the scan is done), wall time, the size of ``scan.json`` with the number of
outlier tokens flagged, listed there and left out (the list is capped; ``trace.npz``, whose size
is printed too, keeps every token's norm). The last column is the peak relative to the smallest
count.

Target (issue 12): the peak for 2,000 images is <= 1.2x the peak for 20.

    python benchmarks/scan_memory.py                    # 20 and 2000 images, ~2 minutes on 2 cores
    python benchmarks/scan_memory.py --counts 20,200,2000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: run in the child: the CLI, then this process's own peak RSS (not getrusage's ru_maxrss, which
#: Linux carries across fork and exec from the parent)
CHILD = """
import sys
from vsink.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print("VMHWM_KIB", next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")))
sys.exit(code)
"""


def write_pngs(folder: Path, count: int) -> None:
    """``count`` 64 x 64 RGB crops of the scikit-image photos, cycling over photos and positions."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photos = [np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
              for name in ("astronaut", "coffee", "chelsea", "rocket")]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        y = (i * 37) % (h - 64)
        x = (i * 53) % (w - 64)
        Image.fromarray(photo[y:y + 64, x:x + 64]).save(folder / f"{i:05d}.png")


def scan(folder: Path, out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "scan", str(folder), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"vsink scan failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    peak_kib = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("VMHWM_KIB")))
    doc = json.loads((out / "scan.json").read_text())
    high = doc["high_norm"]
    return {"peak_mib": peak_kib / 1024, "wall_s": wall, "json_mib": (out / "scan.json").stat().st_size / 2**20,
            "total": high["tokens_total"], "listed": len(high["tokens"]), "left_out": high["tokens_omitted"],
            "trace_mib": (out / "trace.npz").stat().st_size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="20,2000", help="comma-separated image counts (default 20,2000)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the scan (default 2)")
    args = p.parse_args()
    counts = sorted({int(c) for c in args.counts.split(",")})
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            folder = Path(tmp) / f"pngs{count}"
            write_pngs(folder, count)
            rows[count] = scan(folder, Path(tmp) / f"out{count}", args.threads)
    base = rows[counts[0]]["peak_mib"]
    print(f"vsink scan on the demo model, 64x64 PNG crops of scikit-image photos, {args.threads} threads")
    print(f"{'images':>7} {'peak MiB':>9} {'wall s':>7} {'scan.json MiB':>14} {'flagged':>8} {'listed':>7} "
          f"{'left out':>9} {'trace.npz MiB':>14} {'peak x':>7}")
    for count, r in rows.items():
        print(f"{count:>7} {r['peak_mib']:>9.0f} {r['wall_s']:>7.1f} {r['json_mib']:>14.2f} {r['total']:>8} "
              f"{r['listed']:>7} {r['left_out']:>9} {r['trace_mib']:>14.2f} {r['peak_mib'] / base:>7.2f}")
    worst = max(r["peak_mib"] for r in rows.values()) / base
    print(f"target: peak at the largest count <= 1.2x the smallest: {'MET' if worst <= 1.2 else 'NOT MET'} "
          f"({worst:.2f}x)")


if __name__ == "__main__":
    main()
