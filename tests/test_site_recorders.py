"""A ``block_output`` edit reaches what the model reads through transformers' recorded hidden
states, whether it was installed before or after the model's first call. transformers 5 records
hidden states with forward hooks installed on the first call that asks for them (LLaVA asks its
tower on every call, for the feature layer); an edit installed after them changed the next block's
input but not the recorded state LLaVA reads, so the edit was silently lost."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vsink.backbones.hf_lvlm import load_lvlm


def _logits(lvlm, inputs) -> torch.Tensor:
    with torch.no_grad():
        return lvlm.model(**inputs).logits[:, -1].clone()


def _shift(x: torch.Tensor) -> torch.Tensor:
    return x + 1.0


def test_a_tower_edit_installed_after_the_first_call_reaches_the_language_model():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8))
    fresh, used = load_lvlm("demo-llava"), load_lvlm("demo-llava")
    inputs = used.prepare([image], ["What is in the image?"])
    clean = _logits(used, inputs)  # the first call: transformers installs its recorders now

    def edit_every_block(lvlm):
        tower = lvlm.vision_backbone()
        return [tower.hook("block_output", layer, _shift) for layer in range(tower.num_layers)]

    before = edit_every_block(fresh)  # installed before any call: the recorders come after it
    expected = _logits(fresh, inputs)
    after = edit_every_block(used)  # installed after the recorders
    got = _logits(used, inputs)
    assert not torch.allclose(expected, clean, atol=1e-4)  # the edit changes what LLaVA reads
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for handle in before + after:
        handle.remove()
    torch.testing.assert_close(_logits(used, inputs), clean, rtol=0, atol=1e-6)  # removed: clean again
