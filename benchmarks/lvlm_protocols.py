"""Size of each deviation between the ``paper`` and ``official`` mitigation protocols, on tiny
LLaVA models built offline (random weights; CPU, seconds). The figures in
docs/fidelity.md (VAR, PAI and FastV sections) come from this script.

* VAR, no visual sink: BOS carries a massive value in one hidden dimension (a text sink at
  every layer, τ = 8), no image token does. Rows edited (batch row, head, query) summed over
  layers and forward passes, and the largest change of the last-token logits against the
  unedited run, for the prompt pass and for 8 greedy tokens with and without the KV cache.
* VAR, a generated sink: the prompt also has two planted visual sinks; a decode step feeds a
  token whose embedding carries the sink value (φ > τ). Paper flags it, official does not.
* VAR, ε: rows whose selection flips between the two share rules on the planted model.
* PAI, prompt pass under guidance: the first token's image-branch logits with and without α.
* FastV without the cache: the kept image tokens of the last pass against the prompt's
  choice, and the generated tokens of both protocols; the keep counts of the two formulas.

    python benchmarks/lvlm_protocols.py
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from vsink.backbones.hf_decoder import decoder_of
from vsink.data.demo_lvlm import build_tiny_llava
from vsink.lvlm import LVLM, generate
from vsink.lvlm.context import DecodeContext
from vsink.mitigate import PAI, VAR, Mitigation, Run
from vsink.mitigate import var as var_module

PROMPTS = ["is there a cat ?", "describe this image please , what color is the sky ?"]
SINK_DIM, SINK_VALUE, TAU = 11, 60.0, 8.0


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))


def planted(image_tokens: tuple[int, ...] = (), words: tuple[str, ...] = ()) -> LVLM:
    """Tiny LLaVA (hidden 256) with the sink value on BOS, on ``words`` and on the image tokens
    at ``image_tokens``."""
    model, processor = build_tiny_llava(hidden=256)
    tok = processor.tokenizer
    with torch.no_grad():
        for token_id in [tok.bos_token_id] + [tok.convert_tokens_to_ids(w) for w in words]:
            model.model.language_model.embed_tokens.weight[token_id, SINK_DIM] = SINK_VALUE
    if image_tokens:
        def plant(module, args, out):
            out = out.clone()
            out[:, list(image_tokens), SINK_DIM] += SINK_VALUE
            return out

        model.model.multi_modal_projector.register_forward_hook(plant)
    return LVLM(model, processor, "planted")


def rows_edited(*mitigations: Mitigation) -> int:
    """(batch row, head, query) rows VAR edited in its last call, summed over layers."""
    return int(sum(row.get("rows_edited", 0) for m in mitigations for row in m.stats.values()))


@contextmanager
def bound(lvlm: LVLM, inputs: dict, *mitigations: Mitigation, probs_layer: int = -1) -> Iterator[dict]:
    """Forwards of one generation context with ``mitigations`` installed on the decoder's sites
    (what :func:`vsink.lvlm.generate` sets up around ``model.generate``); ``probs_layer``'s
    attention probabilities after the edits are collected under ``"probs"``."""
    decoder = decoder_of(lvlm)
    context = DecodeContext(lvlm, inputs["input_ids"], inputs["attention_mask"])
    run = Run(lvlm, decoder, context, inputs["input_ids"], inputs["attention_mask"])
    seen: dict = {"probs": []}
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(decoder.bound(context))
        for m in mitigations:
            stack.enter_context(m.installed(run))
        if probs_layer >= 0:
            handle = decoder.hook("attn_probs", probs_layer, lambda p, start, z: seen["probs"].append(p.clone()))
            stack.callback(handle.remove)
        yield seen


def forward(lvlm: LVLM, inputs: dict, *mitigations: Mitigation) -> torch.Tensor:
    """Last-token logits of the prompt pass with ``mitigations`` (none: the unedited run)."""
    with bound(lvlm, inputs, *mitigations):
        return lvlm.model(**inputs).logits[:, -1]


def var_without_visual_sink() -> None:
    lvlm = planted()
    inputs = lvlm.prepare([image(0), image(1)], PROMPTS)
    plain = forward(lvlm, inputs)
    settings = {"sink_dims": [SINK_DIM], "tau": TAU}
    print("VAR, no visual sink (tiny LLaVA, batch of 2, text sink BOS at every layer):")
    for protocol in ("paper", "official"):
        var = VAR.from_values(settings, protocol)
        logits = forward(lvlm, inputs, var)
        prefill = rows_edited(var)
        runs = []
        for use_cache in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # official edits nothing here, and says so
                result = generate(lvlm, inputs, mitigation="var", settings=settings, protocol=protocol,
                                  max_new_tokens=8, use_cache=use_cache)
            runs.append(sum(row.get("rows_edited", 0) for row in result.report[0]["layers"]))
        delta = float((logits - plain).abs().max())
        print(f"  {protocol:>8}: prompt pass {prefill:5d} rows edited, max |Δ logit| {delta:.4g}"
              f"{' (bit-identical)' if torch.equal(logits, plain) else ''}; "
              f"8 tokens: {runs[0]} rows (cache), {runs[1]} (no cache)")


def var_generated_sink() -> None:
    lvlm = planted(image_tokens=(2, 5), words=("dog",))
    inputs = lvlm.prepare([image(0)], PROMPTS[:1])
    dog = torch.tensor([[lvlm.processor.tokenizer.convert_tokens_to_ids("dog")]])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(dog)], dim=1)
    out = {}
    for protocol in ("paper", "official"):
        var = VAR.from_values({"sink_dims": [SINK_DIM], "tau": TAU, "min_image": 0.05}, protocol)
        with bound(lvlm, inputs, var, probs_layer=2) as seen:
            prompt = lvlm.model(**inputs, use_cache=True)
            cache = getattr(prompt, "cache", None) or prompt.past_key_values  # the 5.x name, the 4.x name
            seen["probs"].clear()
            step = lvlm.model(input_ids=dog, attention_mask=mask, use_cache=True, **{lvlm.cache_argument: cache})
        flagged = int(torch.cat(var.sinks[2], dim=1)[0, -1]) if protocol == "paper" else 0
        out[protocol] = (torch.cat(seen["probs"], dim=2), step.logits[:, -1], flagged)
    att = float((out["paper"][0] - out["official"][0]).abs().max())
    logit = float((out["paper"][1] - out["official"][1]).abs().max())
    print(f"VAR, a generated token with φ > τ: paper flags it ({out['paper'][2]}), official not; at that step "
          f"max |Δ attention| {att:.4f} (layer 2), max |Δ logit| {logit:.4f}")


def var_share_eps() -> None:
    """Rows whose selection differs between the share rules, on the same probabilities (every
    batch row has visual sinks here, so the no-visual-sink rule plays no part)."""
    lvlm = planted(image_tokens=(2, 5))
    inputs = lvlm.prepare([image(0), image(1)], PROMPTS)
    original = var_module.redistribution
    rows, flips = [0], [0]

    def both(probs, image, sinks, allowed, s):
        out = original(probs, image, sinks, allowed, s)
        other = original(probs, image, sinks, allowed, replace(s, protocol="paper"))
        rows[0] += int(allowed.sum()) * probs.shape[1]
        flips[0] += int((out[1] != other[1]).sum())
        return out

    var_module.redistribution = both
    try:
        generate(lvlm, inputs, mitigation="var", settings={"sink_dims": [SINK_DIM], "tau": TAU, "min_image": 0.05},
                 protocol="official", max_new_tokens=8)
    finally:
        var_module.redistribution = original
    print(f"VAR, share with / without ε per image token: {flips[0]} of {rows[0]} candidate rows flip (8 tokens)")


def pai_prompt_pass() -> None:
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    print("PAI, first token under guidance (prompt-pass logits of the image branch):")
    for b in range(2):
        inputs = lvlm.prepare([image(b)], [PROMPTS[b]])
        plain = forward(lvlm, inputs)
        paper = forward(lvlm, inputs, PAI.from_values({"gamma": 1.1}, "paper"))
        official = forward(lvlm, inputs, PAI.from_values({"gamma": 1.1}, "official"))
        print(f"  prompt {b}: max |Δ logit| paper vs unedited {float((paper - plain).abs().max()):.4g}, "
              f"official vs unedited {float((official - plain).abs().max()):.4g}"
              f"{' (bit-identical)' if torch.equal(official, plain) else ''}")


def fastv_without_cache() -> None:
    model, processor = build_tiny_llava()
    lvlm = LVLM(model, processor)
    print("FastV without the KV cache (k = 2, R = 0.5, 8 tokens):")
    for b in range(2):
        inputs = lvlm.prepare([image(b)], [PROMPTS[b]])
        img = set(lvlm.image_spans(inputs["input_ids"]).positions(0))
        runs = {p: generate(lvlm, inputs, mitigation="fastv", settings={"k": 2, "ratio": 0.5}, protocol=p,
                            max_new_tokens=8, use_cache=False) for p in ("paper", "official")}
        kept = {p: set(r.kept[0].tolist()) & img for p, r in runs.items()}
        same = int((runs["paper"].new_tokens == runs["official"].new_tokens).sum())
        print(f"  prompt {b}: last pass keeps {len(kept['official'] & kept['paper'])} of the prompt's "
              f"{len(kept['paper'])} kept image tokens; generated tokens equal in {same} of 8 positions")
    for n in (9, 576):
        grid = [r / 100 for r in range(1, 100)]
        differ = [r for r in grid if round(n * (1 - r)) != n - round(n * r)]
        print(f"  keep count, n = {n}: round(n(1 − R)) ≠ n − round(nR) for {len(differ)} of R = 0.01 … 0.99"
              + (f" (e.g. R = {differ[0]})" if differ else ""))


def main() -> None:
    torch.set_num_threads(1)
    var_without_visual_sink()
    var_generated_sink()
    var_share_eps()
    pai_prompt_pass()
    fastv_without_cache()


if __name__ == "__main__":
    main()
