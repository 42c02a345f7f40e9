"""Dense-evaluation throughput on the synthetic dataset.

Prints, in one run on the same model and images:

* plain: the backbone's own forward over the train + val images (preprocessing included), the
  baseline cost of any dense evaluation;
* eval: ``evaluate_dense`` with linear-seg, a LOST sweep (``--lost-settings`` combinations) and
  artifacts — its ratio to plain shows the cost of the probes, the sweep and the head training on
  top of one forward per image;
* forward images / dataset images (1.0 = every image through the backbone exactly once);
* LOST runs per second (one run = one image x one sweep setting) and linear-probe training time.

Random-weight ViT (cost does not depend on the weight values), CPU.

    python benchmarks/dense_eval.py          # ViT-S/16 at 224 px, 64 train + 32 val images
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import vsink
from vsink.data.synthetic import synthetic_dataset
from vsink.evaluate import LostSettings, ProbeSettings, evaluate_dense


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--train-images", type=int, default=64)
    p.add_argument("--val-images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=0).eval()
    backbone = vsink.wrap(model)
    train = synthetic_dataset("train", num_images=args.train_images, size=args.img_size)
    val = synthetic_dataset("val", num_images=args.val_images, size=args.img_size)
    images = [s.load().image for s in train.samples + val.samples]

    t0 = time.perf_counter()
    for start in range(0, len(images), args.batch_size):
        backbone.forward(backbone.preprocess(images[start:start + args.batch_size]))
    plain = time.perf_counter() - t0

    lost = LostSettings(layers=(-1, -2, -3), kinds=("k", "q", "v"), biases=(0.0,), normalize=(False, True))
    t0 = time.perf_counter()
    result = evaluate_dense(backbone, val, train_set=train, lost_settings=lost,
                            probe_settings=ProbeSettings(epochs=args.epochs), batch_size=args.batch_size,
                            progress=False)
    total = time.perf_counter() - t0
    timing = result.variants["baseline"]["timing"]
    sweep = len(result.variants["baseline"]["lost"]["sweep"])

    print(f"model {args.model} {args.img_size}px, {len(train)} train + {len(val)} val images, "
          f"batch {args.batch_size}, {args.threads} threads")
    print(f"plain forward (train + val):  {plain:7.2f} s")
    print(f"evaluate_dense (all tasks):   {total:7.2f} s  = {total / plain:.2f}x plain")
    print(f"forward images / dataset images: {timing['forward_images'] / len(images):.2f}")
    print(f"LOST: {sweep} settings x {len(val)} images, {timing['lost_s']:.2f} s, "
          f"{timing['lost_runs_per_s']:.0f} runs/s ({timing['lost_runs_per_s'] / sweep:.1f} images/s for the sweep)")
    print(f"linear probe: {args.epochs} epochs on {len(train)} images, {timing['linear_probe_train_s']:.2f} s")


if __name__ == "__main__":
    main()
