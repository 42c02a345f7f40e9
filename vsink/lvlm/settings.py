"""Settings of the LVLM mitigations (VAR, PAI, FastV) and the two protocols they run under.

Every setting is declared with its type and range (:func:`setting`, the
:class:`~vsink.options.Option` in the field's metadata): constructing a settings object checks
each value, so ``--set p=1.5``, ``--set k=2.5`` and ``VARSettings(p=float("nan"))`` are refused
alike with the key, the value and what is allowed. Limits that depend on the model (a layer
beyond the decoder's depth) are checked when a :class:`~vsink.lvlm.session.Session` starts.
The same declarations make the mitigation tables of docs/options.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ..errors import VsinkError
from ..options import Choice, Float, Int, Kind, ListOf, Option, OptionError

#: ``paper``: the methods as the papers describe them (vsink's default); ``official``: as the
#: authors' released scripts run them (see docs/lvlm.md, "Protocols")
PROTOCOLS = ("paper", "official")

#: VAR ``official``: the visual-sink share's denominator adds this to each image token's attention
SHARE_EPS = 1e-6


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else a one-line :class:`VsinkError`."""
    if protocol not in PROTOCOLS:
        raise VsinkError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


def setting(default: Any, kind: Kind, help: str, nullable: bool = False) -> Any:
    """A dataclass field declared as an :class:`Option` (type, range, meaning)."""
    return field(default=default, metadata={"option": (kind, help, nullable)})


def declared_settings(cls: type) -> dict[str, Option]:
    """The declared settings of a settings class, by name."""
    return {f.name: Option(f.name, f.metadata["option"][0], f.default, f.metadata["option"][1],
                           nullable=f.metadata["option"][2])
            for f in dataclasses.fields(cls) if "option" in f.metadata}


class _Checked:
    """Checks every declared setting on construction (``NAME`` names the mitigation in errors)."""

    NAME: ClassVar[str] = ""
    protocol: str

    def __post_init__(self) -> None:
        check_protocol(self.protocol)
        for key, option in declared_settings(type(self)).items():
            setattr(self, key, option.check(getattr(self, key), name=f"{self.NAME} setting '{key}'"))


@dataclass
class VARSettings(_Checked):
    """Visual attention redistribution (Kang et al. 2025).

    ``protocol="official"`` follows the released code (seilk/VisAttnSink): a layer whose prompt
    has no visual sink is left unedited, the sinks are those of the prompt pass (generated tokens
    never are), and the visual-sink share's denominator adds :data:`SHARE_EPS` per image token.
    Its released configuration uses the defaults below."""

    p: float = setting(0.6, Float(0, 1), "share of their attention the sinks keep")
    rho: float = setting(0.5, Float(0, 1), "image-centric rows: visual-sink share of image attention <= rho")
    min_image: float = setting(0.2, Float(0, 1), "image-centric rows: total image attention >= min_image")
    tau: float = setting(20.0, Float(0, min_open=True), "sink threshold on φ = |h / rms(h)|")
    start_layer: int = setting(2, Int(min=0), "first decoder layer edited (below the decoder's depth)")
    sink_dims: Optional[list[int]] = setting(None, ListOf(Int(min=0), nonempty=True),
                                             "hidden dimensions whose φ marks sinks (null: the known or "
                                             "calibrated ones)", nullable=True)
    protocol: str = "paper"

    NAME: ClassVar[str] = "var"
    #: defaults of the released scripts where they differ from the ones above (A_exps/lv1.5_7b.yml)
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {}


@dataclass
class PAISettings(_Checked):
    """Paying more attention to images (Liu et al. 2024).

    ``protocol="official"`` follows the released scripts (LALBJ/PAI): with guidance on
    (``gamma`` set), the prompt pass runs without α (the first token gets guidance only) and α is
    switched on once the text-only branch has run; with ``gamma == 1`` the guidance returns before
    that, so α never applies. Official defaults: γ = 1.1 and layers [2, 32) (the README's
    commands)."""

    alpha: float = setting(0.2, Float(0), "amplification α of the last query's attention logits on image tokens")
    start_layer: int = setting(2, Int(min=0), "first decoder layer amplified (below the decoder's depth)")
    end_layer: Optional[int] = setting(None, Int(min=1), "layer where amplification stops (exclusive, above "
                                       "start_layer; null: all layers)", nullable=True)
    gamma: Optional[float] = setting(None, Float(0), "classifier-free guidance strength γ (1.1 suggested; "
                                     "null: off)", nullable=True)
    plausibility: float = setting(0.1, Float(0, 1), "guidance keeps tokens with p >= plausibility · max p")
    protocol: str = "paper"

    NAME: ClassVar[str] = "pai"
    #: the README's POPE/CHAIR commands: --alpha 0.2 --gamma 1.1 --start-layer 2 --end-layer 32
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {"gamma": 1.1, "end_layer": 32}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise OptionError(f"pai setting 'end_layer' must be above start_layer ({self.start_layer}), "
                              f"got {self.end_layer}")


@dataclass
class FastVSettings(_Checked):
    """FastV token pruning (Chen et al. 2024): blocks >= k see only the kept image tokens.

    ``protocol="official"`` follows the released llava-hf ``fastv_forward`` (pkunlp-icler/FastV):
    the kept count is ``round(n(1 − R))`` (vsink's paper protocol: ``n − round(nR)``), ties go
    to ``torch.topk``, and without the KV cache every forward re-prunes by the newest token's
    attention (vsink's paper protocol prunes once, at the prompt). Official default k = 3 (with
    R = 0.5: the lmms-eval script ``fastv_kvcache.py`` behind the README's LLaVA-1.5-7B table)."""

    k: int = setting(2, Int(min=1), "decoder layer from which pruned image tokens are dropped (below the depth)")
    ratio: float = setting(0.5, Float(0, 1, max_open=True), "R: fraction of image tokens pruned")
    protocol: str = "paper"

    NAME: ClassVar[str] = "fastv"
    #: lmms-eval-with-kvcache/fastv_kvcache.py: K = 3, ratio = 0.5
    OFFICIAL_DEFAULTS: ClassVar[dict[str, Any]] = {"k": 3}


#: the mitigations by name (``none``: no settings)
MITIGATIONS: dict[str, Optional[type]] = {"none": None, "var": VARSettings, "pai": PAISettings,
                                          "fastv": FastVSettings}
MITIGATION_NAMES = Choice(tuple(MITIGATIONS))
