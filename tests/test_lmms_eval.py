"""The lmms-eval model plugin: against lmms-eval where the optional ``lmms`` extra is installed,
else against the stand-in of its API under ``tests/lmms_eval_shim`` (see ``tests/lmms_eval_api.py``)."""

import numpy as np
import pytest
from PIL import Image

from lmms_eval_api import load_lmms_eval

load_lmms_eval()


def test_plugin_is_found_through_the_entry_point_and_generates(tmp_path):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from vsink.data.demo_lvlm import build_tiny_llava
    from vsink.lvlm import LVLM, generate

    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cls = get_model("vsink")
    assert cls.__name__ == "VsinkLVLM"
    lm = cls.create_from_arg_string(f"pretrained={tmp_path},mitigation=pai,set_alpha=0.5")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    lm.task_dict = {"toy": {"test": {0: {"image": image}}}}
    request = Instance("generate_until", ("is there a cat ?", {"max_new_tokens": 3, "until": []},
                                          lambda doc: [doc["image"]], 0, "toy", "test"), 0,
                       {"task": "toy", "doc_id": 0, "repeats": 1})
    [text] = lm.generate_until([request])
    lvlm = LVLM(model, processor)
    expected = generate(lvlm, lvlm.prepare([image], ["is there a cat ?"]), mitigation="pai", settings={"alpha": 0.5},
                        max_new_tokens=3).texts[0]
    assert text == expected


def test_plugin_settings_parsing(tmp_path):
    from vsink.data.demo_lvlm import build_tiny_llava
    from vsink.errors import VsinkError
    from vsink.integrations.lmms_eval import VsinkLVLM

    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    lm = VsinkLVLM.create_from_arg_string(f"pretrained={tmp_path},mitigation=var,set_sink_dims=3;7,set_p=0.5")
    assert lm.settings == {"sink_dims": [3, 7], "p": 0.5} and lm.protocol == "paper"
    official = VsinkLVLM.create_from_arg_string(f"pretrained={tmp_path},mitigation=pai,protocol=official")
    assert official.protocol == "official"
    with pytest.raises(VsinkError, match="unknown model_args"):
        VsinkLVLM.create_from_arg_string(f"pretrained={tmp_path},alpha=0.5")
    with pytest.raises(VsinkError, match="protocol must be one of"):
        VsinkLVLM.create_from_arg_string(f"pretrained={tmp_path},mitigation=pai,protocol=authors")


def test_plugin_runs_opera(tmp_path):
    from lmms_eval.api.instance import Instance

    from vsink.data.demo_lvlm import build_tiny_llava
    from vsink.integrations.lmms_eval import VsinkLVLM
    from vsink.lvlm import LVLM, generate

    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    lm = VsinkLVLM.create_from_arg_string(f"pretrained={tmp_path},mitigation=opera,set_beams=2,set_candidates=3")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    lm.task_dict = {"toy": {"test": {0: {"image": image}}}}
    request = Instance("generate_until", ("is there a cat ?", {"max_new_tokens": 3, "until": []},
                                          lambda doc: [doc["image"]], 0, "toy", "test"), 0,
                       {"task": "toy", "doc_id": 0, "repeats": 1})
    [text] = lm.generate_until([request])
    lvlm = LVLM(model, processor)
    expected = generate(lvlm, lvlm.prepare([image], ["is there a cat ?"]), mitigation="opera",
                        settings={"beams": 2, "candidates": 3}, max_new_tokens=3).texts[0]
    assert text == expected


@pytest.mark.filterwarnings("ignore::vsink.lvlm.MitigationWarning")
def test_plugin_runs_every_method_of_the_comparison_set(tmp_path):
    """Issue 21's methods through the plugin, each with a setting passed as set_<name>: the text
    equals vsink.lvlm.generate's for the same image, prompt and settings."""
    from lmms_eval.api.instance import Instance

    from vsink.data.demo_lvlm import build_tiny_llava
    from vsink.integrations.lmms_eval import VsinkLVLM
    from vsink.lvlm import LVLM, generate

    model, processor = build_tiny_llava()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    lvlm = LVLM(model, processor)
    image = Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8))
    for spec, arg, settings in (("vcd", "set_alpha=0.5", {"alpha": 0.5}), ("m3id", "set_lam=1.0", {"lam": 1.0}),
                                ("damro", "set_k=3", {"k": 3}), ("dola", "set_candidates=low", {"candidates": "low"}),
                                ("vaf", "set_enhance=1.5", {"enhance": 1.5}), ("fastv", "set_ratio=0.25", {"ratio": 0.25})):
        lm = VsinkLVLM.create_from_arg_string(f"pretrained={tmp_path},mitigation={spec},{arg}")
        lm.task_dict = {"toy": {"test": {0: {"image": image}}}}
        request = Instance("generate_until", ("is there a cat ?", {"max_new_tokens": 3, "until": []},
                                              lambda doc: [doc["image"]], 0, "toy", "test"), 0,
                           {"task": "toy", "doc_id": 0, "repeats": 1})
        [text] = lm.generate_until([request])
        expected = generate(lvlm, lvlm.prepare([image], ["is there a cat ?"]), mitigation=spec, settings=settings,
                            max_new_tokens=3).texts[0]
        assert text == expected, spec
