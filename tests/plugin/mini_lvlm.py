"""An LVLM family from outside vsink, in one file: tests/test_lvlm_registry.py installs this directory
as a distribution whose ``vsink.lvlms`` entry point names this module.

It takes over LLaVA models whose vision tower reads 8-pixel patches (the tiny test LLaVAs) from
the built-in ``llava`` family — plugins are asked first — and differs from it where a family may:
it draws the image tokens as one row (``image_grid``), refuses FastV with its reason, and records
the sink dimensions of a model it knows by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from vsink.plugin import LVLM, known_sink_dims, lvlm_family

#: the sink dimensions of the model named "mini-llava" (planted by the test)
known_sink_dims("mini-llava", [3, 5])


@lvlm_family
class MiniLlava(LVLM):
    family = "mini-llava"
    title = "mini LLaVA (test plugin)"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    verified = "tests/test_lvlm_registry.py (a plugin of the test suite)"
    refuses = {"fastv": "the mini family keeps every image token (a test refusal)"}

    @classmethod
    def can_wrap(cls, model: nn.Module) -> bool:
        vision = getattr(model.config, "vision_config", None)
        return super().can_wrap(model) and getattr(vision, "patch_size", None) == 8

    def image_grid(self, inputs: dict[str, Any], row: int, count: int) -> tuple[int, int]:
        return (1, count)
