"""Cost of a full vsink scan (all layers: token norms + attention statistics) vs a plain forward.

Prints, for one model and batch, in one run:

* plain: the library's default forward (timm, fused attention);
* vsink: the same forward inside the Probe ``vsink.scan`` uses (norms, attention statistics and
  massive-activation top-k on every layer);
* hf_eager: the anchor users have today, HF ``output_attentions=True, output_hidden_states=True``
  with eager attention on an equivalent Dinov2 model (same width, depth, heads, patch, size);

each as median wall time over ``--repeats`` runs (the variants interleaved in one process, so
machine noise hits all of them alike) and peak memory (each variant in its own subprocess, so
peaks are not shared), then the ratios to plain.

Then, as a user's machine sees it, **whole processes** (issue 12): a fresh ``python`` that
imports, builds the model and runs the timm fused forward on two photos, against one that runs
``vsink.scan`` on the same two photos (preprocessing, the probe, every detector; no files
written). Each pair runs ``--process-repeats`` times, interleaved; the table gives the median
process wall time, the median time of the forward / scan call alone, and the median peak
process RSS, with ratios to plain. Memory on CPU is the
peak RSS above the RSS just before the measured forward (activation memory; weights and
inputs excluded), the whole-process peak RSS, and the peak of live tensor bytes from the torch
profiler's allocation events (exact, the steadiest of the three); on CUDA it is
``max_memory_allocated`` above the allocation before the forward, and in total.

Targets (issues 2 and 12): vsink <= 1.5x plain time and <= 1.3x plain peak memory on ViT-S/14 at
518 px; for whole processes, batch 2, peak process RSS.
Weights are random (no download); cost does not depend on their values.

    python benchmarks/scan_overhead.py                       # ViT-S/14, 518 px, batch 4, CPU
    python benchmarks/scan_overhead.py --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _peak_kib() -> int:
    """This process's peak RSS (VmHWM). Not ``getrusage``'s ru_maxrss: Linux carries that across
    fork and exec, so a child would report its parent's peak when the parent was larger."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _build(variant: str, args):
    import timm

    if variant == "hf_eager":
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                           image_size=args.img_size, mlp_ratio=4)
        model = Dinov2Model(cfg)
        model.set_attn_implementation("eager")
        model = model.eval().to(args.device)
        return lambda x: model(pixel_values=x, output_attentions=True, output_hidden_states=True)

    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=0).eval().to(args.device)
    if variant == "plain":
        return model.forward_features

    import vsink
    from vsink.scan import MASSIVE_TOP_K

    backbone = vsink.wrap(model)

    def run(x):  # what vsink.scan runs per batch
        with vsink.Probe(backbone, massive=MASSIVE_TOP_K) as probe:
            probe.run(x)
        return probe.trace()

    return run


def _sync(args):
    import torch

    return torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)


def _input(args):
    import torch

    torch.manual_seed(0)
    return torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)


def measure_memory(variant: str, args) -> dict:
    """One forward in a fresh process: activation and whole-process peak memory (MiB)."""
    import torch

    torch.set_num_threads(args.threads)
    fn, x = _build(variant, args), _input(args)
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_kib()
        fn(x)
        _sync(args)()
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            return {"activation_mib": (peak - base) / 2**20, "peak_mib": peak / 2**20}
        peak_kib = _peak_kib()
        return {"activation_mib": (peak_kib - base) / 1024, "peak_mib": peak_kib / 1024,
                "tensor_mib": _tensor_peak_mib(fn, x)}


def _tensor_peak_mib(fn, x) -> float:
    """Peak of live tensor bytes during ``fn(x)`` from the torch profiler's allocation events
    (exact and repeatable, unlike RSS)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


PROCESS_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np, skimage.data, timm, torch
from PIL import Image
variant, model_name, size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
images = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]
model = timm.create_model(model_name, pretrained=False, img_size=size, num_classes=0).eval()
t1 = time.perf_counter()
if variant == "plain":
    mean, std = np.array(model.pretrained_cfg["mean"], np.float32), np.array(model.pretrained_cfg["std"], np.float32)
    arrays = [(np.asarray(im.resize((size, size), Image.BICUBIC), np.float32) / 255 - mean) / std for im in images]
    with torch.inference_mode():
        model.forward_features(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous())
else:
    import vsink
    vsink.scan(vsink.wrap(model), images, img_size=size, batch_size=2, progress=False)
t2 = time.perf_counter()
with open("/proc/self/status") as f:  # VmHWM: ru_maxrss would carry the parent's peak across fork and exec
    peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"process_s": t2 - t0, "call_s": t2 - t1, "peak_mib": peak_kib / 1024}))
"""


def measure_processes(args) -> dict[str, dict[str, float]]:
    """Whole processes (plain forward vs ``vsink.scan``, two photos, batch 2), interleaved."""
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "vsink": []}
    for _ in range(args.process_repeats):
        for variant in runs:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", PROCESS_SCRIPT, variant, args.model, str(args.img_size),
                                  str(args.threads)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["process_s"] = time.perf_counter() - t0
            runs[variant].append(row)
    return {v: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for v, rows in runs.items()}


def measure_times(variants: list[str], args) -> dict[str, float]:
    """Median wall time per variant, the variants interleaved so machine noise hits all alike."""
    import torch

    torch.set_num_threads(args.threads)
    fns, x, sync = {v: _build(v, args) for v in variants}, _input(args), _sync(args)
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
        for _ in range(args.repeats):
            for v, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn(x)
                sync()
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=518)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-hf", action="store_true", help="omit the HF eager anchor")
    p.add_argument("--process-repeats", type=int, default=3, help="whole-process runs per variant (0: skip)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure_memory(args.worker, args)))
        return
    variants = ["plain", "vsink"] + ([] if args.skip_hf else ["hf_eager"])
    rows = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--worker", v] + sys.argv[1:]
        # glibc otherwise keeps freed blocks below a growing mmap threshold in the heap, and RSS
        # then measures the allocator's cache instead of live tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        rows[v] = json.loads(out)
    for v, t in measure_times(variants, args).items():
        rows[v]["time_s"] = t
    tokens = (args.img_size // 14) ** 2 + 1
    print(f"{args.model} at {args.img_size}px (~{tokens} tokens), batch {args.batch_size}, {args.device}, "
          f"{args.threads} threads, median of {args.repeats} interleaved runs")
    cols = ["time_s", "activation_mib", "peak_mib"] + (["tensor_mib"] if "tensor_mib" in rows["plain"] else [])
    names = {"time_s": "time s", "activation_mib": "act MiB", "peak_mib": "peak MiB", "tensor_mib": "tensor MiB"}
    print(f"{'variant':<10}" + "".join(f"{names[c]:>12}" for c in cols) + "".join(f"{names[c].split()[0] + ' x':>10}" for c in cols))
    plain = rows["plain"]
    for v, r in rows.items():
        print(f"{v:<10}" + "".join(f"{r[c]:>12.3f}" for c in cols) + "".join(f"{r[c] / plain[c]:>10.2f}" for c in cols))
    if args.process_repeats and args.device == "cpu":
        procs = measure_processes(args)
        print(f"\nwhole processes: plain timm forward vs vsink.scan, two photos at {args.img_size}px, batch 2, "
              f"median of {args.process_repeats}")
        print(f"{'variant':<10}{'process s':>12}{'call s':>12}{'peak MiB':>12}{'process x':>12}{'call x':>10}{'peak x':>10}")
        base = procs["plain"]
        for v, r in procs.items():
            print(f"{v:<10}{r['process_s']:>12.2f}{r['call_s']:>12.2f}{r['peak_mib']:>12.1f}"
                  f"{r['process_s'] / base['process_s']:>12.2f}{r['call_s'] / base['call_s']:>10.2f}"
                  f"{r['peak_mib'] / base['peak_mib']:>10.2f}")


if __name__ == "__main__":
    main()
