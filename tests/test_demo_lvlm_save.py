"""The tiny offline LVLMs of vsink/data/demo_lvlm.py survive ``save_pretrained``: the saved
directory, loaded as ``vsink generate --model DIR`` loads it, turns a prompt into the same input
ids as the processor it was saved from, and decodes them to the same words (under transformers 5 a
tokenizer saved as ``Qwen2Tokenizer`` / ``GemmaTokenizer`` reloads with those classes' own BPE
instead of the word-level tokenizer.json, so "describe the cat" came back as a few byte pieces)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vsink.backbones.hf_lvlm import LVLM, load_lvlm
from vsink.backbones.lvlm_families import lvlm_families
from vsink.data import demo_lvlm

BUILDERS = {"llava": demo_lvlm.build_tiny_llava, "llava-next": demo_lvlm.build_tiny_llava_next,
            "qwen2-vl": demo_lvlm.build_tiny_qwen2_vl,
            "qwen2.5-vl": lambda: demo_lvlm.build_tiny_qwen2_vl(version="2.5"),
            "llava-onevision": demo_lvlm.build_tiny_llava_onevision, "paligemma": demo_lvlm.build_tiny_paligemma,
            "gemma3": demo_lvlm.build_tiny_gemma3, "internvl": demo_lvlm.build_tiny_internvl}
PROMPT = "describe the cat and the dog in this picture ."


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_saved_tiny_lvlm_tokenizes_and_decodes_as_the_one_it_was_saved_from(name, tmp_path):
    model, processor = BUILDERS[name]()
    family = LVLM(model, processor, f"tiny-{name}").family
    why = lvlm_families()[family].unavailable()
    if why is not None:
        pytest.skip(why)  # absent from this transformers: reported by the family itself
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = load_lvlm(str(tmp_path))
    words = processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert saved.processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == words
    assert saved.processor.tokenizer.decode(words) == processor.tokenizer.decode(words)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    fresh = LVLM(model, processor, f"tiny-{name}").prepare([image], [PROMPT])
    loaded = saved.prepare([image], [PROMPT])
    assert torch.equal(loaded["input_ids"], fresh["input_ids"])
