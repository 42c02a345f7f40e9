"""What the report renderers read from a result, as structural types.

The modules that produce results (:mod:`vsink.scan`, :mod:`vsink.lvlm.scan`,
:mod:`vsink.evaluate.dense`) import the renderers to write their reports; the renderers name
only these protocols, so no import runs the other way. :class:`Previews` is the one concrete
record here: the dense evaluation fills it, the dense figures draw it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import numpy as np
from PIL import Image

from ..detect import AttentionSink, HighNormResult, MassiveActivation
from ..layout import PromptLayout, TokenLayout
from ..probe import Trace


class ScanView(Protocol):
    """A vision scan (:class:`vsink.scan.ScanResult`)."""

    model: str
    synthetic: bool
    input_size: tuple[int, int]
    images: list[str]
    skipped: list[dict[str, str]]
    trace: Trace
    high_norm: HighNormResult
    sinks: list[AttentionSink]
    attention: list[dict[str, Any]]
    massive: list[MassiveActivation]
    settings: dict[str, Any]
    thumbnails: list[Image.Image]

    @property
    def layout(self) -> TokenLayout: ...

    def per_image(self) -> list[dict[str, Any]]: ...


class LVLMScanView(Protocol):
    """An LVLM scan (:class:`vsink.lvlm.scan.LVLMScanResult`)."""

    model: str
    synthetic: bool
    prompt: str
    images: list[str]
    skipped: list[dict[str, str]]
    layout: PromptLayout
    phi: np.ndarray
    sink_dims: list[int]
    sink_dims_source: str
    tau: float
    vision: Optional[ScanView]
    trace: Trace
    thumbnails: list[Image.Image]

    def layer_summaries(self) -> list[dict[str, Any]]: ...

    def per_image(self) -> list[dict[str, Any]]: ...

    def head_shares(self) -> dict[str, np.ndarray]: ...

    def tower_to_llm(self) -> Optional[dict[str, Any]]: ...

    def deepstack_summary(self) -> Optional[dict[str, Any]]: ...


@dataclass
class Previews:
    """The first evaluation images, their ground truth, and each variant's predicted mask and LOST
    box, for the HTML report (not written to results.json)."""

    ids: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    masks: list[Optional[np.ndarray]] = field(default_factory=list)
    boxes: list[Optional[np.ndarray]] = field(default_factory=list)
    predicted: dict[str, list[np.ndarray]] = field(default_factory=dict)
    lost: dict[str, list[list[float]]] = field(default_factory=dict)


class DenseView(Protocol):
    """A dense evaluation (:class:`vsink.evaluate.dense.DenseResult`)."""

    model: str
    dataset: dict[str, Any]
    tasks: list[str]
    settings: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    skipped: list[dict[str, str]]
    previews: Optional[Previews]
    synthetic: bool

    def headline(self) -> list[tuple[str, list[Optional[float]], int]]: ...

    def headline_intervals(self) -> list[tuple[list[Optional[dict[str, float]]], list[Optional[dict[str, float]]]]]: ...

    def statistics(self) -> dict[str, Any]: ...
