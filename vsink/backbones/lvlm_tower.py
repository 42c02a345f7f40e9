"""``SPEC#vision_tower``: the vision tower of an LVLM as a vision backbone.

``demo-llava#vision_tower``, ``hf:llava-hf/llava-1.5-7b-hf#vision_tower`` or ``LOCAL_DIR#vision_tower``
load the LVLM (:func:`vsink.backbones.hf_lvlm.load_lvlm`, never running shipped code) and keep its
tower (:meth:`LVLM.vision_backbone`), so ``vsink scan``, ``maps``, ``registers find`` and ``eval
dense`` run on it. The spec is the one the LVLM's own tower carries (and a neuron spec found on it
records), so a ``neurons.json`` found on an LVLM's tower names a spec that loads.
"""

from __future__ import annotations

import re
from typing import Any

from .base import Backbone
from .families import spec_pattern

#: what follows an LVLM spec to name its vision tower
TOWER = "#vision_tower"


@spec_pattern(r"(?P<lvlm>.+)" + re.escape(TOWER),
              "LVLM_SPEC#vision_tower            the vision tower of an LVLM (demo-llava, hf:REPO or a local LLaVA "
              "directory; the whole LVLM is loaded)")
def lvlm_tower(match: re.Match, **ignored: Any) -> Backbone:
    from .hf_lvlm import load_lvlm

    lvlm = load_lvlm(match.group("lvlm").removeprefix("hf:"))
    tower = lvlm.vision_backbone()
    if lvlm.synthetic:
        tower.synthetic = "the vision tower of the demo LVLM, register neurons planted by construction (see docs/lvlm.md)"
    return tower
