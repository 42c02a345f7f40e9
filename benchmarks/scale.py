"""Throughput of ``vsink scan`` on 1 and on 2 processes under ``torchrun`` (one thread each), and
the 2-process speed-up (issue 24 target: >= 1.6x).

Each configuration is a fresh launch: ``python benchmarks/scale.py --worker`` for one process,
``python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/scale.py --worker``
for two, with ``OMP_NUM_THREADS=1``. A worker loads the model, makes ``--images`` synthetic
images, and times ``vsink.scan`` over them ``--repeats`` times after one warm-up, every process
starting together (a barrier) and the clock stopping when rank 0 has the pooled result (the
detectors over every image included). The launches alternate (1, 2, 1, 2, ...) so machine noise
hits both alike; the table gives the median scan time, images per second and the speed-up, and
the median wall time of whole launches (interpreter start, imports and model load included).

Weights are random (no download); cost does not depend on their values. On a machine whose cores
are shared with other work the speed-up is lower than on idle cores: say which when quoting it.

    python benchmarks/scale.py                                  # demo model, 64 images, 224 px
    python benchmarks/scale.py --model timm:vit_small_patch14_dinov2 --no-pretrained --img-size 224
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _images(count: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(count)]


def worker(args: argparse.Namespace) -> None:
    import torch

    import vsink
    from vsink.shard import join, leave

    torch.set_num_threads(1)
    shard = join()
    backbone = vsink.load(args.model, img_size=args.img_size, pretrained=not args.no_pretrained)
    images = _images(args.images)
    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        shard.barrier()
        start = time.perf_counter()
        result = vsink.scan(backbone, images, batch_size=args.batch_size, progress=False, shard=shard)
        times.append(time.perf_counter() - start)
    if shard.main:
        assert len(result.images) == args.images
        print("SCALE " + json.dumps({"world": shard.world, "times": times[1:]}))
    leave()


def _launch(world: int, args: argparse.Namespace) -> tuple[list[float], float]:
    flags = ["--worker", "--model", args.model, "--images", str(args.images), "--batch-size", str(args.batch_size),
             "--img-size", str(args.img_size), "--repeats", str(args.repeats)] + (["--no-pretrained"] if args.no_pretrained else [])
    script = str(Path(__file__).resolve())
    command = ([sys.executable, script] if world == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", script])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run(command + flags, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{world}-process launch failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("SCALE "))
    return json.loads(line[len("SCALE "):])["times"], wall


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--no-pretrained", action="store_true")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed scans per launch (after one warm-up)")
    parser.add_argument("--launches", type=int, default=2, help="launches per process count, alternating")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    times: dict[int, list[float]] = {1: [], 2: []}
    walls: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.launches):
        for world in (1, 2):
            t, wall = _launch(world, args)
            times[world] += t
            walls[world].append(wall)
    print(f"vsink scan of {args.images} images ({args.model}, {args.img_size} px, batch {args.batch_size}), "
          f"one thread per process, {os.cpu_count()} CPU cores on this machine")
    print(f"{'processes':>9}  {'scan s':>8}  {'images/s':>9}  {'speed-up':>8}  {'launch wall s':>13}")
    base = statistics.median(times[1])
    for world in (1, 2):
        t = statistics.median(times[world])
        print(f"{world:>9}  {t:>8.3f}  {args.images / t:>9.1f}  {base / t:>7.2f}x  {statistics.median(walls[world]):>13.1f}")
    speedup = base / statistics.median(times[2])
    print(f"2-process speed-up: {speedup:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
