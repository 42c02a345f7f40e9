"""What a mitigation declares to decode from several views of the prompt: :class:`Branch` and its
constructors. :mod:`vsink.lvlm.branches` runs them during ``generate``; docs/architecture.md,
"Branches", states the contract.

Kinds:

``image``
    the prompt with its image transformed (noised, masked): the same token ids, other pixel values;
``text``
    the prompt without its image tokens (text only);
``tokens``
    any prompt of the mitigation's making: token ids with the input embeddings it builds (an
    image reduced to chosen patches);
``readout``
    no pass of its own: an earlier layer's hidden state of the main pass (the residual stream
    entering block ``j``, as ``hidden_states[j]`` of transformers), read through the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from ..errors import VsinkError

if TYPE_CHECKING:
    from .base import Run

KINDS = ("image", "text", "tokens", "readout")
#: inputs that carry the image; a text branch drops them
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw")

@dataclass(frozen=True)
class Branch:
    """One extra branch of the prompt (see the module docstring).

    Attributes:
        name: the key of its logits in :meth:`~vsink.mitigate.Mitigation.combine`.
        kind: ``image``, ``text``, ``tokens`` or ``readout``.
        prompt: (``image``, ``tokens``) the branch's prompt inputs from the run: ``input_ids`` and
            ``attention_mask`` [B, N] always (positions and masks come from them), then either the
            image inputs (``pixel_values``, ...) or ``inputs_embeds`` [B, N, D].
        layer: (``readout``) the block whose input is read out (transformers' ``hidden_states[layer]``);
            the decoder's depth reads the last block's output (with ``norm``: the model's own logits).
        norm: (``readout``) apply the language model's final norm before the LM head.
        edits: the composed mitigations whose edits apply in the branch (``None``: the kind's default).
    """

    name: str
    kind: str
    prompt: Optional[Callable[["Run"], dict[str, Any]]] = None
    layer: Optional[int] = None
    norm: bool = True
    edits: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VsinkError(f"branch {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind in ("image", "tokens") and self.prompt is None:
            raise VsinkError(f"branch {self.name!r}: an {self.kind} branch needs prompt=")
        if self.kind == "readout" and self.layer is None:
            raise VsinkError(f"branch {self.name!r}: a readout branch needs layer=")


def image_branch(name: str, transform: Callable[[torch.Tensor], torch.Tensor],
                 edits: Optional[Sequence[str]] = None) -> Branch:
    """The prompt with ``transform(pixel_values)`` as its image (the processor's tensor: LLaVA
    [B, 3, H, W], LLaVA-NeXT [B, tiles, 3, H, W], Qwen2-VL's flattened patches)."""

    def prompt(run: "Run") -> dict[str, Any]:
        if run.inputs.get("pixel_values") is None:
            raise VsinkError(f"branch {name!r} transforms the image, but the inputs carry no pixel_values")
        return {**run.inputs, "pixel_values": transform(run.inputs["pixel_values"])}

    return Branch(name, "image", prompt, edits=None if edits is None else tuple(edits))


def text_branch(name: str, edits: Sequence[str] = ()) -> Branch:
    """The prompt without its image tokens, left-padded (no edits by default)."""

    def prompt(run: "Run") -> dict[str, Any]:
        ids, mask = text_only(run)
        return {"input_ids": ids, "attention_mask": mask}

    return Branch(name, "text", prompt, edits=tuple(edits))


def readout_branch(name: str, layer: int, norm: bool = True) -> Branch:
    """The main pass's residual stream entering block ``layer`` through the LM head (``norm``:
    after the final norm)."""
    return Branch(name, "readout", layer=layer, norm=norm)


def text_only(run: "Run") -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's token ids without image tokens and padding, left-padded again, and its mask."""
    keep = (run.input_ids != run.lvlm.image_token_id) & run.attention_mask.bool()
    return left_pad(run, [ids[k] for ids, k in zip(run.input_ids, keep)])


def left_pad(run: "Run", rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows of different lengths as one left-padded batch (the text model's pad token, or
    0) like ``run``'s prompt, and its mask."""
    width = max(len(r) for r in rows)
    pad = int(getattr(run.lvlm.text_config, "pad_token_id", None) or 0)
    ids = torch.full((len(rows), width), pad, dtype=run.input_ids.dtype, device=run.input_ids.device)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask


