"""A mitigation from outside vsink with two branches (tests/plugin/grounded_mitigation.py),
installed through the ``vsink.mitigations`` entry point: found by name, weight 0 equals none,
its rule equals the same rule written here on the same branches, composed edits recorded."""

import sys
from pathlib import Path

import pytest
import torch

from vsink.data.demo_lvlm import build_tiny_qwen2_vl
from vsink.lvlm import LVLM, generate
from vsink.mitigate.branch import image_branch, text_branch

from lvlm_models import PROMPTS, random_image
from test_branches import Follow

PLUGIN = Path(__file__).parent / "plugin"
pytestmark = pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")


@pytest.fixture
def grounded(tmp_path, monkeypatch):
    from vsink import mitigate
    from vsink.mitigate import base

    dist = tmp_path / "vsink_grounded-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vsink-grounded\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vsink.mitigations]\ngrounded = grounded_mitigation\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGIN))
    registry = dict(base.REGISTRY)
    monkeypatch.setattr(base, "REGISTRY", registry)
    monkeypatch.setattr(mitigate, "REGISTRY", registry)
    monkeypatch.setattr(mitigate, "_loaded", False)  # discover the entry points again, into the copy
    mitigate.mitigation_registry()
    yield registry
    sys.modules.pop("grounded_mitigation", None)


def test_a_two_branch_mitigation_from_outside(grounded):
    assert "grounded" in grounded
    model, processor = build_tiny_qwen2_vl()  # M-RoPE: the branches' positions come from the model
    lvlm = LVLM(model, processor, "tiny-qwen2_vl")
    inputs = lvlm.prepare([random_image(), random_image(1)], PROMPTS)
    none = generate(lvlm, inputs, max_new_tokens=4)
    assert torch.equal(generate(lvlm, inputs, mitigation="grounded", settings={"w": 0.0},
                                max_new_tokens=4).new_tokens, none.new_tokens)

    class ByHand(Follow):
        def combine(self, step, logits, branches):
            out = logits + 3.0 * (logits - (branches["b"] + branches["t"]) / 2)
            return out.masked_fill(torch.isinf(logits), float("-inf"))

    expected = generate(lvlm, inputs, mitigation=[ByHand([image_branch("b", torch.zeros_like), text_branch("t")])],
                        max_new_tokens=4)
    out = generate(lvlm, inputs, mitigation="grounded+pai", settings={"grounded.w": 3.0, "pai.alpha": 0.0},
                   max_new_tokens=4)
    assert torch.equal(out.new_tokens, expected.new_tokens) and not torch.equal(out.new_tokens, none.new_tokens)
    assert out.report[0]["branches"] == [{"name": "blank", "kind": "image", "edits": ["pai"]},
                                         {"name": "text", "kind": "text", "edits": []}]
    # the blank image has the prompt's shapes and PAI's edits, as the main pass: it rides in the main
    # pass's forward; the text-only prompt (other shapes) runs one pass of its own per step
    assert out.report[0]["stacked_with_main"] == ["blank"]
    assert out.report[0]["branch_passes"] == 4 and len(out.report[0]["steps"]) == 4
