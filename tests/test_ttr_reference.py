"""Test-time registers and register-neuron discovery against the released code's rules.

Every expected value below is worked out by hand from the rules of nickjiang2378/test-time-registers
(``shared/hook_fn.py`` with ``sign_max`` from ``shared/utils.py``, ``dinov2/dinov2/hub/hook_fn.py``
and ``shared/algorithms.py``), as restated in docs/fidelity_vision_sections.md:

* shift: one scalar per layer, ``sign_max`` over all tokens and all of that layer's register
  neurons (the max if |max| > |min|, else the min), times ``scale``, written into every register
  neuron on the appended tokens; the neurons are zeroed on every token between the class token
  and the appended tokens (trained registers included);
* discovery: outlier positions are all tokens whose norm exceeds the threshold (class token
  included); the notebook's sparsity filter keeps, per image, the neurons whose activation is
  below 0.5 on at least half of all tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vsink
from vsink.cli import main
from vsink.data import demo_model as D
from vsink.data.demo_images import demo_images
from vsink.images import NamedImage
from vsink.registers import NeuronSpec, RegisterNeuron, TestTimeRegisters, find_register_neurons
from conftest import timm_case


def _shifted(backbone, spec, plant, **options):
    """The layer-0 ``mlp_hidden`` activation after the shift, with ``plant(h, layout)`` setting
    the activation the shift sees (all tokens, appended ones included)."""
    seen = {}

    def planted(h):
        h = h.clone()
        plant(h, backbone.current_layout())
        return h

    handles = [backbone.hook("mlp_hidden", 0, planted)]
    handles.append(TestTimeRegisters(spec, **options).apply(backbone))
    handles.append(backbone.hook("mlp_hidden", 0, lambda h: seen.__setitem__("h", h.clone())))
    try:
        backbone.forward(torch.randn(2, 3, *backbone.img_size, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in reversed(handles):
            h.remove()
    return seen["h"], backbone.layout().with_appended(options.get("registers", 1))


def _plant_two_neurons(h, layout):
    """Neurons 3 and 7 of layer 0 are 0.5 on every token, except:
    sample 0: neuron 3 = 4.0 on patch (0, 1), neuron 7 = -6.0 on patch (1, 1);
    sample 1: neuron 7 = 9.0 on the class token, neuron 3 = -9.0 on patch (2, 3)."""
    h[:, :, [3, 7]] = 0.5
    h[0, layout.patch_token(0, 1), 3] = 4.0
    h[0, layout.patch_token(1, 1), 7] = -6.0
    h[1, 0, 7] = 9.0
    h[1, layout.patch_token(2, 3), 3] = -9.0


TWO_NEURONS = NeuronSpec("", [RegisterNeuron(0, 3, 1.0), RegisterNeuron(0, 7, 1.0)])


def test_reference_shift_writes_one_signed_scalar_per_layer_and_sample():
    backbone = vsink.wrap(timm_case("deit"))  # 1 class token, 4x4 patches
    h, lay = _shifted(backbone, TWO_NEURONS, _plant_two_neurons, registers=2, scale=0.5, shift="reference")
    reg = lay.appended_indices()
    # sample 0: over tokens and both neurons max = 4.0, min = -6.0; |4| > |-6| is false -> -6.0;
    # times scale 0.5 -> -3.0, written into both neurons on both appended tokens
    assert torch.equal(h[0][reg][:, [3, 7]], torch.full((2, 2), -3.0))
    # sample 1: max = 9.0 (the class token counts), min = -9.0; |9| > |-9| is false -> -9.0 -> -4.5
    assert torch.equal(h[1][reg][:, [3, 7]], torch.full((2, 2), -4.5))
    # both neurons are zero on every patch; the class token keeps its values (0.5; 9.0 on sample 1)
    assert torch.all(lay.patches(h, dim=1)[..., [3, 7]] == 0)
    assert h[0, 0, 3] == 0.5 and h[0, 0, 7] == 0.5 and h[1, 0, 3] == 0.5 and h[1, 0, 7] == 9.0


def test_per_neuron_shift_moves_each_neurons_own_value_on_the_same_case():
    backbone = vsink.wrap(timm_case("deit"))
    h, lay = _shifted(backbone, TWO_NEURONS, _plant_two_neurons, registers=2, scale=0.5)
    reg = lay.appended_indices()
    # each neuron's own largest |value| over all tokens, times 0.5: sample 0: 4.0 -> 2.0, -6.0 -> -3.0;
    # sample 1: neuron 3 -9.0 -> -4.5, neuron 7 9.0 (on the class token) -> 4.5
    assert torch.equal(h[0][reg][:, [3, 7]], torch.tensor([[2.0, -3.0], [2.0, -3.0]]))
    assert torch.equal(h[1][reg][:, [3, 7]], torch.tensor([[-4.5, 4.5], [-4.5, 4.5]]))


def _plant_trained_register(h, layout):
    """Neuron 5 is 2.0 everywhere and -3.0 on the second trained register (index 2)."""
    h[:, :, 5] = 2.0
    h[:, layout.register_indices()[1], 5] = -3.0


@pytest.mark.parametrize("zero", [False, True])
def test_trained_registers_kept_or_zeroed(zero):
    backbone = vsink.wrap(timm_case("dinov2_reg4"))  # [cls, 4 registers, 3x3 patches]
    spec = NeuronSpec("", [RegisterNeuron(0, 5, 1.0)])
    h, lay = _shifted(backbone, spec, _plant_trained_register, shift="reference", zero_trained_registers=zero)
    trained = lay.register_indices()[:lay.num_registers]
    # the scalar is taken before anything is zeroed: max 2.0, min -3.0 (on a trained register) -> -3.0
    assert torch.equal(h[:, lay.appended_indices(), 5], torch.full((2, 1), -3.0))
    expected = torch.zeros(4) if zero else torch.tensor([2.0, -3.0, 2.0, 2.0])
    assert torch.equal(h[0, trained, 5], expected) and torch.equal(h[1, trained, 5], expected)
    assert torch.all(lay.patches(h, dim=1)[..., 5] == 0) and torch.all(h[:, 0, 5] == 2.0)


def test_demo_planted_neurons_cancel_under_the_reference_shift():
    """By construction (vsink.data.demo_model) neurons 0, 1 write +u and 2, 3 write -u through
    fc2 columns of equal size, and 2, 3 fire NEURON_STEP lower: each neuron's own max puts
    2·a·c − 2·(a − 3)·c = 6c = WRITE_NORM along u on the register, while one common scalar s
    puts 2·s·c − 2·s·c = 0, so the register stays as small as it was before block 2."""
    backbone = vsink.load("demo")
    spec = NeuronSpec("demo", [RegisterNeuron(D.PLANTED_BLOCK, n, 0.0) for n in D.PLANTED_NEURONS])
    norms = {}
    for shift in ("per-neuron", "reference"):
        with TestTimeRegisters(spec, shift=shift).applied(backbone):
            layers = vsink.scan(backbone, demo_images(), progress=False).high_norm.layers
        norms[shift] = [layer.registers[0] for layer in layers]
    before = norms["reference"][D.PLANTED_BLOCK - 1]
    assert norms["per-neuron"][D.PLANTED_BLOCK] == pytest.approx(D.WRITE_NORM, rel=0.01)
    assert norms["reference"][D.PLANTED_BLOCK] < 0.01 * D.WRITE_NORM
    assert abs(norms["reference"][D.PLANTED_BLOCK] - before) < 0.5  # block 2 added next to nothing


def test_one_neuron_per_layer_gives_the_same_shift_in_both_rules():
    """With a single neuron the layer's scalar is that neuron's signed max (no ±m tie here)."""
    backbone = vsink.wrap(timm_case("deit"))
    spec = NeuronSpec("", [RegisterNeuron(0, 3, 1.0)])

    def plant(h, layout):
        h[:, :, 3] = 0.25
        h[0, layout.patch_token(3, 3), 3] = -7.0
        h[1, layout.patch_token(0, 0), 3] = 2.0

    per_neuron, _ = _shifted(backbone, spec, plant)
    reference, lay = _shifted(backbone, spec, plant, shift="reference")
    assert torch.equal(per_neuron, reference)
    assert torch.equal(reference[:, lay.appended_indices()[0], 3], torch.tensor([-7.0, 2.0]))


def test_option_errors_and_description():
    with pytest.raises(vsink.VsinkError, match="unknown shift 'global'"):
        TestTimeRegisters(TWO_NEURONS, shift="global")
    with pytest.raises(vsink.VsinkError, match="mode 'mean' needs shift='per-neuron'"):
        TestTimeRegisters(TWO_NEURONS, shift="reference", mode="mean")
    text = TestTimeRegisters(TWO_NEURONS, shift="reference", zero_trained_registers=True).describe()
    assert "shift=reference" in text and "zero_trained_registers=True" in text


def _discovery_case():
    """deit (1 class token + 16 patches = 17 tokens), 2 images. Block 0's output gets +1000 on
    dimension 0 of the class token (index 0) and of patch (0, 0) (index 1): with threshold 100
    these are the only outliers. Layer-0 activations of neurons 0-3 (all others 0):

    ====== =========================== ======= ===== ================================
    neuron other tokens                patch 1 class below 0.5 (of 17; half = 8.5)
    ====== =========================== ======= ===== ================================
    0      -1.0                        10.0    -1.0  16 -> sparse
    1      1.0                         20.0    1.0   0 -> not sparse
    2      0.0 on 2-9, 0.5 on 10-16    5.0     0.0   9 -> sparse (0.5 is not below 0.5)
    3      0.0 on 2-8, 0.5 on 9-16     6.0     0.0   8 -> not sparse
    ====== =========================== ======= ===== ================================
    """
    backbone = vsink.wrap(timm_case("deit"))

    def outliers(x):
        x = x.clone()
        x[:, [0, 1], 0] += 1000.0
        return x

    def activations(h):
        h = torch.zeros_like(h)
        h[:, :, 0] = -1.0
        h[:, 1, 0] = 10.0
        h[:, :, 1] = 1.0
        h[:, 1, 1] = 20.0
        h[:, :, 2] = 0.5
        h[:, [0, *range(2, 10)], 2] = 0.0
        h[:, 1, 2] = 5.0
        h[:, :, 3] = 0.5
        h[:, [0, *range(2, 9)], 3] = 0.0
        h[:, 1, 3] = 6.0
        return h

    handles = [backbone.hook("block_output", 0, outliers), backbone.hook("mlp_hidden", 0, activations)]
    rng = np.random.default_rng(0)
    images = [NamedImage(f"r{i}", Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
              for i in range(2)]
    return backbone, images, handles


@pytest.mark.parametrize("options, expected", [
    # patch outliers only (patch 1): each neuron scores its |value| there
    (dict(), [(1, 20.0), (0, 10.0), (3, 6.0), (2, 5.0)]),
    # the notebook's filter: neurons 1 and 3 are not sparse, their score is 0
    (dict(sparsity_filter=True), [(0, 10.0), (2, 5.0)]),
    # class token and patch 1 are outlier positions: mean |value| over the two
    (dict(outlier_tokens="all"), [(1, 10.5), (0, 5.5), (3, 3.0), (2, 2.5)]),
    (dict(outlier_tokens="all", sparsity_filter=True), [(0, 5.5), (2, 2.5)]),
])
def test_discovery_options_by_hand(options, expected):
    backbone, images, handles = _discovery_case()
    try:
        spec = find_register_neurons(backbone, images, top_k=len(expected), detection_layer=0, highest_layer=0,
                                     threshold=100.0, progress=False, **options)
    finally:
        for h in handles:
            h.remove()
    assert [(n.neuron, n.score) for n in spec.neurons] == expected
    assert spec.settings["images_with_outliers"] == 2
    assert spec.settings["outlier_tokens"] == options.get("outlier_tokens", "patches")
    assert spec.settings["sparsity_filter"] == ({"fraction": 0.5, "activation": 0.5}
                                                if options.get("sparsity_filter") else None)


def test_discovery_option_errors():
    backbone = vsink.load("demo")
    with pytest.raises(vsink.VsinkError, match="'outlier_tokens' must be one of patches, all, got 'cls'"):
        find_register_neurons(backbone, demo_images(), outlier_tokens="cls", progress=False)
    with pytest.raises(vsink.VsinkError, match=r"'sparsity_fraction' must be a finite number in \[0, 1\], got 1\.5"):
        find_register_neurons(backbone, demo_images(), sparsity_filter=True, sparsity_fraction=1.5, progress=False)


def test_cli_ttr_shift_and_discovery_flags(tmp_path, capsys):
    spec = tmp_path / "neurons.json"
    assert main(["registers", "find", "--out", str(spec), "--top-k", "4", "--sparsity-filter",
                 "--outlier-tokens", "all", "--no-progress"]) == 0
    settings = json.loads(spec.read_text())["settings"]
    assert settings["outlier_tokens"] == "all" and settings["sparsity_filter"] == {"fraction": 0.5, "activation": 0.5}
    assert main(["scan", "--test-time-registers", str(spec), "--ttr-shift", "reference",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    data = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert "shift=reference" in data["settings"]["edits"][0]
    assert main(["scan", "--test-time-registers", str(spec), "--ttr-shift", "global", "--no-progress",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--ttr-shift: must be one of per-neuron, reference, got 'global'" in capsys.readouterr().err


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv + ["--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", [["scan"], ["maps"], ["registers", "apply"], ["eval", "dense"]])
def test_help_shows_the_ttr_options_and_defaults(command, capsys):
    text = _help(command, capsys)
    assert "--ttr-shift per-neuron|reference per-neuron (each register neuron" in text
    assert "(one of per-neuron, reference; default: per-" in text  # argparse wraps at the hyphen
    assert "--ttr-zero-trained-registers also zero" in text and "(default: off: trained registers keep" in text


def test_help_shows_the_discovery_options_and_defaults(capsys):
    text = _help(["registers", "find"], capsys)
    assert "--outlier-tokens patches|all outlier positions: patches" in text and "default: patches)" in text
    assert "--sparsity-filter the paper notebook's filter" in text and "of all tokens (default: off)" in text
    assert "--sparsity-fraction X see --sparsity-filter (a finite number in [0, 1]; default: 0.5)" in text
    assert "--sparsity-activation X see --sparsity-filter (a finite number; default: 0.5)" in text
