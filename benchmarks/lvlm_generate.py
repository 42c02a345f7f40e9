"""Generation speed with each mitigation against vanilla eager ``generate``, and FastV's prefill.

One LLaVA-style model (random weights, built offline: Llama decoder ``--hidden``×``--layers``,
576 image tokens like LLaVA-1.5), one batch, greedy. Runs alternate between variants; the median
tokens/s of each is compared with vanilla HF eager generate (``attn_implementation="eager"``).
Targets: VAR and PAI (without guidance) ≥ 0.9× vanilla. FastV (k=2, R=50%): prefill time
(``max_new_tokens=1``) against vsink's ``none``.

    python benchmarks/lvlm_generate.py          # ~126 M decoder parameters, batch 2, 16 new tokens, CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from vsink.data.demo_lvlm import build_tiny_llava
from vsink.lvlm import LVLM, generate

VARIANTS = {"vsink none": ("none", {}), "var": ("var", {"sink_dims": [11, 29], "tau": 20.0}),
            "pai": ("pai", {}), "fastv": ("fastv", {"k": 2, "ratio": 0.5})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build_tiny_llava(hidden=args.hidden, layers=args.layers, heads=16, kv_heads=16,
                                        image_size=336, patch=14)
    lvlm = LVLM(model, processor, "bench")
    decoder = sum(p.numel() for p in model.model.language_model.parameters())
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((336, 336, 3)) * 255).astype(np.uint8)) for _ in range(args.batch_size)]
    inputs = lvlm.prepare(images, ["describe this image please ."] * args.batch_size)
    n = args.new_tokens

    def vanilla(max_new: int) -> float:
        model.set_attn_implementation("eager")
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
            return time.perf_counter() - t0
        finally:
            model.set_attn_implementation("sdpa")

    def ours(name: str, max_new: int) -> float:
        mitigation, settings = VARIANTS[name]
        t0 = time.perf_counter()
        r = generate(lvlm, inputs, mitigation=mitigation, settings=settings, max_new_tokens=max_new)
        assert r.new_tokens.shape[1] == max_new
        return time.perf_counter() - t0

    for name in ("vsink none", "var"):  # warm-up
        ours(name, 2)
    times: dict[str, list[float]] = {"vanilla eager": [], **{k: [] for k in VARIANTS}}
    prefill: dict[str, list[float]] = {"vsink none": [], "fastv": []}
    for _ in range(args.rounds):
        times["vanilla eager"].append(vanilla(n))
        for name in VARIANTS:
            times[name].append(ours(name, n))
        for name in prefill:
            prefill[name].append(ours(name, 1))
    base = args.batch_size * n / statistics.median(times["vanilla eager"])
    print(f"decoder {decoder / 1e6:.0f} M parameters ({args.layers} layers, hidden {args.hidden}), "
          f"{inputs['input_ids'].shape[1]} prompt tokens, batch {args.batch_size}, {n} new tokens, "
          f"{args.rounds} rounds, {args.threads} threads")
    for name, ts in times.items():
        rate = args.batch_size * n / statistics.median(ts)
        print(f"{name:>14}: {rate:7.2f} tokens/s  = {rate / base:.3f}x vanilla eager")
    a, b = statistics.median(prefill["vsink none"]), statistics.median(prefill["fastv"])
    print(f"prefill (1 new token): none {a:.2f} s, FastV {b:.2f} s  -> speed-up {a / b:.2f}x")


if __name__ == "__main__":
    main()
