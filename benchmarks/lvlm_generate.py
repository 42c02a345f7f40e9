"""Generation speed and memory with each mitigation against vanilla HF ``generate``: SDPA (the
default users run: the headline) and eager.

The model is the demo LVLM's mechanism at LLaVA-1.5's shape (:func:`vsink.data.demo_llava.build_demo_llava`
with ``--layers`` decoder layers, hidden 1024, 336 px images in 14 px patches: 576 image tokens per
row), random weights apart from the planted sinks, so VAR finds visual sinks and really edits rows.
One batch, greedy, ``--new-tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``, so every run
decodes the same count). Times: the variants alternate within each of ``--rounds`` rounds and the
median tokens/s of each is compared with vanilla SDPA and with vanilla eager. Peak RSS: each
variant once in a fresh subprocess, for the whole process and for the generate call alone. FastV's prefill (one new token) is compared with vanilla
SDPA's.

Targets (issue 17): VAR and PAI (without guidance) >= 0.9x vanilla SDPA tokens/s; FastV (R = 50 %)
faster than vanilla SDPA in prefill; peak RSS <= 1.1x vanilla. Issue 21: VAF >= 0.9x; VCD, M3ID
and DAMRO >= 0.45x (VCD's noised image stacked with the main pass in one forward per token;
``vcd unstacked``: in a forward of its own, as the released code runs it; M3ID's and DAMRO's
shorter prompts: one extra pass per token); DoLa (one LM-head
readout per candidate layer, no extra pass) >= 0.8x; OPERA (5 beams, 5 candidates) >= 0.5x of HF
beam search with the same 5 beams (``beams``; both without EOS so that both decode
``--new-tokens``), also compared on the decoding steps alone (a 1-token call subtracted).
``--variants`` picks a subset (``--variants beams,opera`` for OPERA's pair). ``--device cuda --attn flash_attention_2``
runs the same comparison against flash attention on a GPU.

    python benchmarks/lvlm_generate.py            # ~117 M parameters, batch 2, 16 new tokens, CPU, ~6 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

VARIANTS = {"vanilla": ("none", {}), "vanilla eager": ("none", {}), "vsink none": ("none", {}),
            "var": ("var", {}), "pai": ("pai", {}), "fastv": ("fastv", {"k": 2, "ratio": 0.5}),
            "vaf": ("vaf", {}), "vcd": ("vcd", {}), "vcd unstacked": ("vcd", {}), "m3id": ("m3id", {"threshold": 1.0}), "damro": ("damro", {}),
            "dola": ("dola", {}), "beams": ("none", {}), "opera": ("opera", {})}
#: run with ``stack_main=False``: the branch in a forward of its own, beside the main pass
UNSTACKED = {"vcd unstacked"}
#: OPERA's beams (its default) and those of the HF beam search it is compared with
BEAMS = 5


def _setup(args):
    import numpy as np
    import torch
    from PIL import Image

    from vsink.data.demo_llava import build_demo_llava
    from vsink.lvlm import LVLM

    torch.set_num_threads(args.threads)
    model, processor = build_demo_llava(layers=args.layers, image_size=336, patch_size=14)
    model = model.to(args.device)
    model.set_attn_implementation(args.attn)
    lvlm = LVLM(model, processor, "vsink/demo-llava")
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((336, 336, 3)) * 255).astype(np.uint8)) for _ in range(args.batch_size)]
    inputs = lvlm.prepare(images, ["describe this image please ."] * args.batch_size)
    return lvlm, inputs


def _runner(lvlm, inputs, args):
    import torch

    from vsink.lvlm import MitigationWarning, generate

    model = lvlm.model
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(name: str, new: int) -> float:
        sync()
        t0 = time.perf_counter()
        if name in ("beams", "opera"):
            eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
            try:
                if name == "opera":
                    r = generate(lvlm, inputs, mitigation="opera", settings={"beams": BEAMS}, max_new_tokens=new)
                    assert r.new_tokens.shape[1] == new, (name, r.new_tokens.shape)
                else:
                    with torch.no_grad():
                        model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       num_beams=BEAMS)
            finally:
                model.generation_config.eos_token_id = eos
        elif name.startswith("vanilla"):
            impl = "eager" if name == "vanilla eager" else args.attn
            model.set_attn_implementation(impl)
            try:
                with torch.no_grad():
                    model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            finally:
                model.set_attn_implementation(args.attn)
        else:
            mitigation, settings = VARIANTS[name]
            with warnings.catch_warnings():
                warnings.simplefilter("error", MitigationWarning)  # a mitigation that edits nothing costs nothing
                r = generate(lvlm, inputs, mitigation=mitigation, settings=settings, max_new_tokens=new,
                             stack_main=name not in UNSTACKED)
            assert r.new_tokens.shape[1] == new, (name, r.new_tokens.shape)
        sync()
        return time.perf_counter() - t0

    return run


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _worker(name: str, args) -> dict:
    """Peak RSS of one generate call in a fresh process: the whole process's peak, and the peak
    during the call alone (the kernel's high-water mark reset after the model is built; Linux)."""
    import gc

    lvlm, inputs = _setup(args)
    run = _runner(lvlm, inputs, args)
    run(name, 2)  # first-call allocations (kernels, caches) belong to the setup
    gc.collect()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so this worker
    # would report the parent's peak (the parent held a model during the timing rounds)
    setup_peak = _status_mib("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_mib("VmRSS")
    except OSError:
        before = None
    run(name, args.new_tokens)
    call_peak = _status_mib("VmHWM")
    out = {"process_peak_mib": max(setup_peak, call_peak)}
    if before is not None:
        out["call_peak_mib"] = call_peak
        out["call_rise_mib"] = call_peak - before
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
    p.add_argument("--batch-size", type=int, default=2, help="images per generate call (default 2)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per call (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--attn", default="sdpa", help="the vanilla implementation: sdpa (default) or flash_attention_2")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--variants", help="comma-separated subset of the variants (vanilla is always run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variants:
        unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
        if unknown:
            p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        for name in [n for n in VARIANTS if n != "vanilla" and n not in args.variants.split(",")]:
            del VARIANTS[name]
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return
    import torch

    lvlm, inputs = _setup(args)
    run = _runner(lvlm, inputs, args)
    n, batch = args.new_tokens, args.batch_size
    for name in VARIANTS:  # warm-up
        run(name, 2)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    prefill: dict[str, list[float]] = {"vanilla": [], "fastv": []} if "fastv" in VARIANTS else {}
    if "opera" in VARIANTS and "beams" in VARIANTS:
        prefill.update({"beams": [], "opera": []})
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name].append(run(name, n))
        for name in prefill:
            prefill[name].append(run(name, 1))
    peaks = {}
    if not args.skip_memory:
        for name in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--worker", name, *sys.argv[1:]], capture_output=True,
                                 text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
            peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])
    decoder = sum(p.numel() for p in lvlm.model.model.language_model.parameters())
    print(f"demo LVLM at LLaVA-1.5 shape: decoder {decoder / 1e6:.0f} M parameters ({args.layers} layers, hidden "
          f"1024), {inputs['input_ids'].shape[1]} prompt tokens, batch {batch}, {n} new tokens, {args.rounds} rounds, "
          f"{args.threads} threads, {args.device}, torch {torch.__version__}")
    sdpa = batch * n / statistics.median(times["vanilla"])
    eager = batch * n / statistics.median(times["vanilla eager"]) if "vanilla eager" in times else float("nan")
    print(f"{'variant':>14} {'tokens/s':>9} {'x ' + args.attn:>10} {'x eager':>8} {'peak MiB':>9} {'peak x':>7} "
          f"{'call MiB':>9} {'call x':>7}")
    base = peaks.get("vanilla", {})
    for name, ts in times.items():
        rate = batch * n / statistics.median(ts)
        mem = ""
        for key in ("process_peak_mib", "call_rise_mib"):
            value = peaks.get(name, {}).get(key)
            mem += f" {value:9.0f} {value / base[key]:7.3f}" if value else f" {'—':>9} {'—':>7}"
        label = f"vanilla {args.attn}" if name == "vanilla" else name
        print(f"{label:>14} {rate:9.2f} {rate / sdpa:10.3f} {rate / eager:8.3f}{mem}")
    if peaks:
        print("peak: whole-process peak RSS; call: peak RSS during one generate call above the RSS before it")
    if "fastv" in prefill:
        a, b = statistics.median(prefill["vanilla"]), statistics.median(prefill["fastv"])
        print(f"prefill (1 new token): vanilla {args.attn} {a:.2f} s, FastV (k=2, R=50%) {b:.2f} s -> {a / b:.2f}x")
    if "opera" in prefill:
        _opera_lines(times, prefill, peaks, batch, n)


def _opera_lines(times: dict, prefill: dict, peaks: dict, batch: int, n: int) -> None:
    """OPERA against HF beam search with the same beams: tokens/s of the whole call and of the
    decoding steps alone (the call minus a 1-token call: OPERA runs the prompt once per prompt,
    transformers once per beam), and peak RSS of each."""
    beam = batch * n / statistics.median(times["beams"])
    opera = batch * n / statistics.median(times["opera"])
    steps = {name: batch * (n - 1) / (statistics.median(times[name]) - statistics.median(prefill[name]))
             for name in ("beams", "opera")}
    line = (f"OPERA ({BEAMS} beams, 5 candidates) {opera:.2f} tokens/s vs HF beam search ({BEAMS} beams) "
            f"{beam:.2f} tokens/s -> {opera / beam:.3f}x (target >= 0.5x); decoding steps alone "
            f"{steps['opera']:.2f} vs {steps['beams']:.2f} tokens/s -> {steps['opera'] / steps['beams']:.3f}x")
    if peaks:
        a, b = peaks["beams"]["process_peak_mib"], peaks["opera"]["process_peak_mib"]
        line += f"; peak RSS {b:.0f} MiB vs {a:.0f} MiB ({b / a:.2f}x)"
    print(line)


if __name__ == "__main__":
    main()
