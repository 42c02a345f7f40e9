"""Cost of test-time registers, and register-neuron discovery throughput.

Prints, in one run on the same model and batch:

* plain: timm's default forward (fused attention);
* ttr: the same forward with test-time registers applied (1 appended token, 10 neurons spread
  over the middle blocks, ``mode="max"``) — target <= 1.05x plain;
* discovery throughput (images/s) of ``find_register_neurons`` at ``--find-batch`` images per
  batch, on a model with one planted register neuron so there are outliers to explain.

Time is the median of interleaved runs (machine noise hits both alike). Random weights; cost
does not depend on their values.

    python benchmarks/ttr_overhead.py              # ViT-S/14, 518 px, batch 4, CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import vsink
from vsink.registers import NeuronSpec, RegisterNeuron, TestTimeRegisters, find_register_neurons


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=518)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--find-batch", type=int, default=16)
    p.add_argument("--find-images", type=int, default=32)
    p.add_argument("--find-img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, num_classes=0).eval()
    backbone = vsink.wrap(model)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    middle = backbone.num_layers // 2
    spec = NeuronSpec(backbone.spec, [RegisterNeuron(middle - 1 + i % 3, 17 * i, 1.0) for i in range(10)])
    ttr = TestTimeRegisters(spec)
    plain, fixed = [], []
    with torch.inference_mode():
        backbone.forward(x)
        for _ in range(args.repeats):
            plain += timed(lambda: backbone.forward(x), 1)
            with ttr.applied(backbone):
                fixed += timed(lambda: backbone.forward(x), 1)
    t_plain, t_fixed = statistics.median(plain), statistics.median(fixed)
    print(f"{args.model} at {args.img_size}px, batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs")
    print(f"plain {t_plain:.3f} s   test-time registers {t_fixed:.3f} s   ratio {t_fixed / t_plain:.3f}")

    small = timm.create_model(args.model, pretrained=False, img_size=args.find_img_size, num_classes=0).eval()
    finder = vsink.wrap(small)
    proj = finder._mlp_out_proj(2)
    with torch.no_grad():
        proj.weight[:, 5] = torch.randn(proj.out_features) * 200 / proj.out_features ** 0.5
        if hasattr(small.blocks[2], "ls2"):  # DINOv2 layer scale starts at 1e-5
            small.blocks[2].ls2.gamma.fill_(1.0)
    mask_pick = finder.hook("mlp_hidden", 2, _planted_fire(finder, 5))
    generator = torch.Generator().manual_seed(0)
    images = [_random_image(args.find_img_size, generator) for _ in range(args.find_images)]
    t0 = time.perf_counter()
    spec = find_register_neurons(finder, images, top_k=5, batch_size=args.find_batch, progress=False)
    elapsed = time.perf_counter() - t0
    mask_pick.remove()
    print(f"discovery: {args.find_images} images at {args.find_img_size}px, batch {args.find_batch}: "
          f"{args.find_images / elapsed:.2f} images/s (two passes); top neuron {spec.neurons[0]}")


def _planted_fire(backbone, neuron):
    """Fire ``neuron`` on the first two patches of every image (a planted register neuron)."""
    def fire(h):
        layout = backbone.current_layout()
        h = h.clone()
        patches = layout.patches(h, dim=1)
        patches[..., neuron] = 0.0
        patches[:, :2, neuron] = 1.0
        return h

    return fire


def _random_image(size, generator):
    from PIL import Image

    arr = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


if __name__ == "__main__":
    main()
