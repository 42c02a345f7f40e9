"""vsink's mitigations as an lmms-eval model (``pip install -e ".[lmms]"``).

Registered through the ``lmms_eval.models`` entry-point group as ``vsink``; e.g.::

    lmms-eval --model vsink --model_args pretrained=llava-hf/llava-1.5-7b-hf,mitigation=var,device=cuda \
        --tasks pope --batch_size 1

``model_args``: ``pretrained`` (hub id or local directory), ``mitigation`` (none or any
registered mitigation or ``+``-joined combination: var, pai, fastv, vaf, vcd, m3id, damro, dola, opera,
...), ``protocol`` (paper, the default, or official: see docs/lvlm.md; lmms-eval records
``model_args`` with its results, so pass it explicitly to have it recorded), one
``set_<name>=<value>`` per mitigation setting (e.g. ``set_p=0.6,set_gamma=1.1``;
values parsed as YAML; lmms-eval splits ``model_args`` on commas, so lists use ``;``:
``set_sink_dims=1415;2533``), ``sinks`` (a calibration JSON for VAR), ``device``, ``dtype``,
``max_new_tokens`` (default 32, a task's ``max_new_tokens`` wins), ``trust_remote_code``.
Greedy decoding (OPERA: its own beam search, ``set_beams=5``); ``until`` strings cut the output.
"""

from __future__ import annotations

from typing import Any, Optional

from lmms_eval.api.model import lmms

from ..errors import VsinkError


def manifest() -> "ModelManifest":  # noqa: F821 - lmms-eval's class, imported when called
    """The entry point's payload. ``lmms_eval.models`` loads its entry points when it is first
    imported, so it is imported here, not at module level: importing this module first would
    otherwise make that loading read this module half-initialised."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vsink", simple_class_path="vsink.integrations.lmms_eval.VsinkLVLM")


def _value(value: Any) -> Any:
    """A ``set_`` value: YAML scalar, or a ``;``-separated list (read through
    :func:`vsink.readers.parse_yaml`: safe, alias bombs refused)."""
    from ..readers import parse_yaml

    if isinstance(value, str) and ";" in value:
        return [parse_yaml(v, "model_args set_") for v in value.split(";") if v]
    return parse_yaml(value, "model_args set_") if isinstance(value, str) else value


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


class VsinkLVLM(lmms):
    """An LVLM generating with a vsink mitigation, for lmms-eval's ``generate_until`` tasks."""

    is_simple = True

    def __init__(self, pretrained: str, mitigation: str = "none", sinks: Optional[str] = None, device: str = "cpu",
                 dtype: Optional[str] = None, max_new_tokens: int = 32, trust_remote_code: Any = False,
                 batch_size: Any = 1, protocol: str = "paper", **kwargs: Any):
        super().__init__()
        from ..backbones.registry import resolve_dtype
        from ..lvlm import load_lvlm
        from ..mitigate import calibrated_settings, make_mitigations, mitigation_names
        from ..lvlm.sinks import Calibration

        self.mitigation, self.protocol = mitigation, protocol
        self.settings = {key[4:]: _value(v) for key, v in kwargs.items() if key.startswith("set_")}
        unknown = sorted(k for k in kwargs if not k.startswith("set_"))
        if unknown:
            raise VsinkError(f"unknown model_args {unknown}; mitigation settings are passed as set_<name>=<value>")
        if sinks:
            self.settings = calibrated_settings(mitigation_names(mitigation), self.settings, Calibration.load(sinks))
        make_mitigations(mitigation, self.settings, protocol)
        self.max_new_tokens = int(max_new_tokens)
        self.lvlm = load_lvlm(str(pretrained), device=device, dtype=resolve_dtype(dtype),
                              trust_remote_code=_flag(trust_remote_code))

    def generate_until(self, requests) -> list[str]:
        from ..lvlm import generate

        outputs = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
            if not visuals:
                raise VsinkError(f"{task} document {doc_id}: vsink's mitigations need an image")
            inputs = self.lvlm.prepare([visuals[0].convert("RGB")], [context])
            result = generate(self.lvlm, inputs, mitigation=self.mitigation, settings=self.settings,
                              protocol=self.protocol,
                              max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)))
            text = result.texts[0]
            for stop in gen_kwargs.get("until") or []:
                if stop and stop in text:
                    text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def loglikelihood(self, requests):
        raise NotImplementedError("vsink's lmms-eval model supports generation tasks (generate_until) only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vsink's lmms-eval model supports single-round generation only")
