"""Training throughput of the vsink loop against a plain PyTorch loop.

Same timm ViT (with registers), same images held in memory, same batch, AdamW and warm-up +
cosine schedule, CPU. The vsink side is :func:`vsink.train.loop.train` with everything it does
each step (deterministic sample order and flips, metrics to JSONL, progress bookkeeping) plus
its final checkpoint; held-out evaluation is switched off on both sides. Runs alternate
(plain, vsink, plain, vsink, ...) and the median images/s of each side is compared.
Target: vsink ≥ 0.95× plain.

    python benchmarks/finetune_throughput.py      # ViT-Ti/16 at 224 px, batch 16, 12 steps x 3 rounds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import vsink
from vsink.train.config import DataConfig, Recipe
from vsink.train.data import TrainImages, to_input
from vsink.train.loop import lr_factor, no_decay_parameters, param_groups, train
from vsink.train.recipes import ScratchTask


class NoEvalScratch(ScratchTask):
    def evaluate(self):
        return {}

    def finish(self, directory):
        return {}


def plain_loop(backbone, images, steps, batch, seed) -> float:
    model = backbone.model.train()
    opt = torch.optim.AdamW(param_groups(list(model.named_parameters()), 0.05, no_decay_parameters(backbone)),
                            lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps, 2, 0.0))
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(images.pixels), (batch,), generator=torch.Generator().manual_seed(seed + step))
        x = to_input(images.pixels[idx], backbone.mean, backbone.std, torch.device("cpu"), torch.float32)
        loss = F.cross_entropy(model(x), images.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return steps * batch / (time.perf_counter() - t0)


def vsink_loop(backbone, images, steps, batch, seed) -> float:
    cfg = Recipe(recipe="scratch", seed=seed, data=DataConfig(flip=True))
    settings = replace(cfg.train, steps=steps, batch_size=batch, warmup_steps=2, eval_every=10 ** 9,
                       checkpoint_every=10 ** 9, log_every=10 ** 9)
    task = NoEvalScratch(cfg, backbone, images, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train(task, settings, Path(out), seed=seed, device=torch.device("cpu"), progress=False)
        return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--registers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    n = 4 * args.batch_size
    g = torch.Generator().manual_seed(0)
    images = TrainImages(torch.randint(0, 256, (n, 3, args.img_size, args.img_size), dtype=torch.uint8, generator=g),
                         torch.zeros(1, 3, args.img_size, args.img_size, dtype=torch.uint8),
                         torch.randint(0, 10, (n,), generator=g), torch.zeros(1, dtype=torch.long),
                         [str(i) for i in range(10)])
    plain, ours = [], []
    for r in range(args.rounds):
        for side, fn in (("plain", plain_loop), ("vsink", vsink_loop)):
            torch.manual_seed(0)
            backbone = vsink.load(f"timm:{args.model}", img_size=args.img_size, pretrained=False,
                                  model_kwargs={"num_classes": 10, "reg_tokens": args.registers})
            rate = fn(backbone, images, args.steps, args.batch_size, r)
            (plain if side == "plain" else ours).append(rate)
    mp, mv = statistics.median(plain), statistics.median(ours)
    print(f"{args.model} {args.img_size}px + {args.registers} registers, batch {args.batch_size}, "
          f"{args.steps} steps x {args.rounds} rounds, {args.threads} threads")
    print(f"plain PyTorch loop: {', '.join(f'{v:.1f}' for v in plain)} images/s (median {mp:.1f})")
    print(f"vsink loop:         {', '.join(f'{v:.1f}' for v in ours)} images/s (median {mv:.1f})")
    print(f"vsink / plain = {mv / mp:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
