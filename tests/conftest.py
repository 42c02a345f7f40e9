"""Small models of every supported family, built from configs with random weights (no downloads)."""

from __future__ import annotations

import os

# Before torch is imported (it reads OMP_NUM_THREADS once, when it loads): one thread unless the
# caller chose. The suite's models are tiny, so more threads mostly wait on each other, and on
# shared cores they stall (README, Development: the suite's time on 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from vsink.data import demo_model  # noqa: E402

HF_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def sharpen(model: torch.nn.Module, std: float = 0.15, seed: int = 0) -> torch.nn.Module:
    """Re-draw every matrix with a larger std and set layer-scale gains to 1, so attention is
    far from uniform and an indexing mistake cannot hide behind near-equal probabilities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "gamma" in name or "lambda1" in name or "lambda2" in name or name.endswith("ls_1") or name.endswith("ls_2"):
                p.fill_(1.0)
    return model.eval()


def timm_model(name: str, **kwargs) -> torch.nn.Module:
    import timm

    cfg = dict(pretrained=False, img_size=32, depth=2, embed_dim=64, num_heads=4, num_classes=0)
    cfg.update(kwargs)
    torch.manual_seed(0)
    return timm.create_model(name, **cfg).eval()


TIMM_CASES = {
    "deit": ("deit_tiny_patch16_224", dict(patch_size=8)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(patch_size=8)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=42)),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=42)),
    "vit_dynamic": ("vit_tiny_patch16_224", dict(patch_size=8, dynamic_img_size=True)),
}


#: timm's ``Eva`` models (rotary positions): EVA-02 with fused qkv + q/v biases + SwiGLU and with
#: separate q/k/v projections; timm's SBB RoPE ViT (no class token, 1 register, layer scale);
#: DINOv3 (class token + 4 storage tokens, half-rotation RoPE, dynamic size); Naver's RoPE-ViT on
#: ``AttentionRope``, axial and mixed (learned per-block frequencies), and with grouped k/v heads
ROPE_CASES = {
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28)),
    "eva02_qkv_separate": ("eva02_base_patch14_224", dict(img_size=28)),
    "rope_reg1_gap": ("vit_base_patch16_rope_reg1_gap_256", dict(patch_size=8)),
    "dinov3": ("vit_small_patch16_dinov3", dict(patch_size=8)),
    "rope_axial": ("vit_small_patch16_rope_224", dict(patch_size=8)),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(patch_size=8)),
    "rope_gqa": ("vit_small_patch16_rope_224", dict(patch_size=8, qkv_fused=False, num_kv_heads=2)),
}


def timm_case(case: str) -> torch.nn.Module:
    name, kwargs = {**TIMM_CASES, **ROPE_CASES}[case]
    return timm_model(name, **kwargs)


def hf_model(kind: str, attn_implementation: str = "eager") -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(intermediate_size=128, **HF_COMMON))
    elif kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **HF_COMMON))
    elif kind == "dinov2_reg":
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **HF_COMMON))
    elif kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(intermediate_size=128, **HF_COMMON))
    elif kind == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(intermediate_size=128, **HF_COMMON))
    elif kind in HF_NEW_CASES:
        model = _hf_new_model(transformers, kind)
    else:
        raise KeyError(kind)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


#: the HF vision families added for issue 22, with the transformers class each needs
HF_NEW_CASES = {"dinov3": "DINOv3ViTModel", "dinov3_reg": "DINOv3ViTModel", "siglip2": "Siglip2VisionModel",
                "aimv2": "Aimv2VisionModel", "aimv2_native": "Aimv2VisionModel", "internvl_vision": "InternVLVisionModel"}
HF_CASES = ("vit", "dinov2", "dinov2_reg", "clip", "siglip", *HF_NEW_CASES)


def require_hf_class(kind: str) -> None:
    """Skip (with the reason) a case whose class the installed transformers truly lacks."""
    import transformers

    name = HF_NEW_CASES.get(kind)
    if name is not None and not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")


def _hf_new_model(transformers, kind: str) -> torch.nn.Module:
    require_hf_class(kind)
    common = dict(HF_COMMON, intermediate_size=128)
    if kind.startswith("dinov3"):
        # gated MLP and 2 storage tokens on the "_reg" case, plain MLP and none on the other
        reg = kind == "dinov3_reg"
        return transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
            num_register_tokens=2 if reg else 0, use_gated_mlp=reg, layerscale_value=1.0, **common))
    if kind == "siglip2":
        common.pop("image_size")
        return transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(num_patches=16, **common))
    if kind == "internvl_vision":  # InternViT: layer scales 1 (sharpen does not know lambda_1), final LayerNorm
        return transformers.InternVLVisionModel(transformers.InternVLVisionConfig(
            layer_scale_init_value=1.0, use_mean_pooling=False, **common))
    return transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(is_native=kind == "aimv2_native", **common))


def siglip2_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images [B, C, H, W] cut into SigLIP2's patches by its own image processor's function
    (transformers 5: a [C, H, W] tensor; 4.x: a [H, W, C] array), for the reference call."""
    import numpy as np
    import transformers
    from transformers.models.siglip2 import image_processing_siglip2 as proc

    if int(transformers.__version__.split(".")[0]) >= 5:
        rows = [proc.convert_image_to_patches(img, patch_size) for img in x]
    else:
        rows = [torch.from_numpy(proc.convert_image_to_patches(np.ascontiguousarray(img.permute(1, 2, 0).numpy()),
                                                               patch_size)) for img in x]
    return torch.stack(rows)


def hf_call(model: torch.nn.Module, x: torch.Tensor, **kwargs):
    """Call an HF vision model on images [B, 3, H, W] the way its users do (SigLIP2: the
    processor's patches, an all-ones pixel_attention_mask and the spatial shapes; a full SigLIP2's
    ``vision_model`` — a ``Siglip2VisionTransformer`` in transformers 4.x — takes them in order;
    transformers 4.x's ``InternVLVisionModel`` takes ``output_*`` flags from its config only)."""
    if type(model).__name__ in ("Siglip2VisionModel", "Siglip2VisionTransformer"):
        p = model.config.patch_size
        patches = siglip2_patches(x, p)
        shapes = torch.tensor([[x.shape[-2] // p, x.shape[-1] // p]] * x.shape[0])
        return model(patches, torch.ones(patches.shape[:2], dtype=torch.long), shapes, **kwargs)
    if type(model).__name__ == "InternVLVisionModel" and transformers_major() < 5:
        flags = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("output_")}
        before = {k: getattr(model.config, k) for k in flags}
        for k, v in flags.items():
            setattr(model.config, k, v)
        try:
            return model(pixel_values=x, **kwargs)
        finally:
            for k, v in before.items():
                setattr(model.config, k, v)
    return model(pixel_values=x, **kwargs)


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def open_clip_visual(block_type=None, **kwargs) -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=16,
               block_type=block_type)
    cfg.update(kwargs)
    return VisionTransformer(**cfg).eval()


def capture_probs(backbone, x, chunk_size=3):
    """Full attention of every layer assembled from vsink's query blocks."""
    got: dict[int, list[torch.Tensor]] = {}
    handles = [backbone.hook("attn_probs", layer, lambda c, s, z, layer=layer: got.setdefault(layer, []).append(c.clone()))
               for layer in range(backbone.num_layers)]
    backbone.attention_chunk_size = chunk_size
    try:
        out = backbone.forward(x)
    finally:
        for h in handles:
            h.remove()
        backbone.attention_chunk_size = None
    return out, [torch.cat(got[layer], dim=2) for layer in range(backbone.num_layers)]


def timm_reference(model, x):
    """timm's own probabilities: fused attention off, hook on attn_drop."""
    probs, hooks, fused = [], [], []
    for blk in model.blocks:
        fused.append(blk.attn.fused_attn)
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o: probs.append(o.clone())))
    try:
        with torch.no_grad():
            out = model.forward_features(x)
    finally:
        for blk, f, h in zip(model.blocks, fused, hooks):
            blk.attn.fused_attn = f
            h.remove()
    return out, probs


def planted_firing(backbone, images, fraction=0.5):
    """Patch tokens where the planted neurons' net write is above ``fraction`` of full, read with
    a plain torch hook on the MLP output projection (independent of vsink's sites and detector)."""
    seen = {}
    fc2 = backbone.model.blocks[demo_model.PLANTED_BLOCK].mlp.fc2
    handle = fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
    with torch.no_grad():
        backbone.model.forward_features(backbone.preprocess([im.image for im in images]))
    handle.remove()
    half = len(demo_model.PLANTED_NEURONS) // 2
    on, off = list(demo_model.PLANTED_NEURONS[:half]), list(demo_model.PLANTED_NEURONS[half:])
    net = seen["h"][..., on].sum(-1) - seen["h"][..., off].sum(-1)
    layout = backbone.layout()
    return layout.patches(net) > demo_model.NEURON_STEP * half * fraction  # [B, P]


#: real photographs bundled with scikit-image (no download)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry")


def skimage_photo(name: str):
    """A scikit-image sample photo as an RGB :class:`~vsink.images.NamedImage`."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from vsink.images import NamedImage

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return NamedImage(f"skimage:{name}", Image.fromarray(arr[..., :3]))


def astronaut_variants():
    """The astronaut photo flipped, cropped, rotated 90 degrees, resized and in greyscale."""
    from PIL import Image

    from vsink.images import NamedImage

    img = skimage_photo("astronaut").image
    return [NamedImage("astronaut-flipped", img.transpose(Image.FLIP_LEFT_RIGHT)),
            NamedImage("astronaut-cropped", img.crop((50, 50, 400, 400))),
            NamedImage("astronaut-rotated", img.rotate(90, expand=True)),
            NamedImage("astronaut-resized", img.resize((300, 300))),
            NamedImage("astronaut-grey", img.convert("L").convert("RGB"))]


@pytest.fixture
def pixel_values():
    def make(batch=2, size=32, seed=1):
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="session")
def demo_scan(tmp_path_factory):
    """``vsink scan`` of the demo model on its demo images (every default), once for the suite:
    its folder (read it; copy it before changing anything in it). What the command printed is in
    ``stdout.txt`` and ``stderr.txt`` beside the folder (:func:`printed`)."""
    import contextlib

    from vsink.cli import main

    root = tmp_path_factory.mktemp("demo-scan")
    out = root / "scan"
    with open(root / "stdout.txt", "w") as stdout, open(root / "stderr.txt", "w") as stderr:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["scan", "--out", str(out), "--no-progress"])
    assert code == 0, (root / "stderr.txt").read_text()
    return out


def printed(folder) -> tuple[str, str]:
    """What the command of a session fixture's folder printed: (stdout, stderr)."""
    return (folder.parent / "stdout.txt").read_text(), (folder.parent / "stderr.txt").read_text()


@pytest.fixture(scope="session")
def demo_registers(tmp_path_factory):
    """``vsink registers find --top-k 4`` then ``vsink registers apply`` of the demo model on its
    demo images, once for the suite: (the neurons file, apply's folder, what apply printed). Read
    them; copy them before changing anything in them."""
    import contextlib
    import io

    from vsink.cli import main

    root = tmp_path_factory.mktemp("demo-registers")
    spec, out, printed = root / "neurons.json", root / "cmp", io.StringIO()
    assert main(["registers", "find", "--out", str(spec), "--top-k", "4", "--no-progress"]) == 0
    with contextlib.redirect_stdout(printed):
        assert main(["registers", "apply", "--neurons", str(spec), "--out", str(out), "--no-progress"]) == 0
    return spec, out, printed.getvalue()


@pytest.fixture(scope="session")
def posthoc_example_run(tmp_path_factory):
    """examples/posthoc_registers.py run once (configs/posthoc.yaml, 150 CPU steps, evaluated every
    50): its output folder and what it printed. The example's test checks the printout, the
    finetune tests the run's metrics, summary and student (one training serves both)."""
    import contextlib
    import io
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("posthoc")
    example = Path(__file__).resolve().parent.parent / "examples" / "posthoc_registers.py"
    argv, printed = sys.argv, io.StringIO()
    sys.argv = [example.name, str(out)]
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(str(example), run_name="__main__")
    finally:
        sys.argv = argv
    return out, printed.getvalue()
