"""lmms-eval's request (``lmms_eval/api/instance.py`` at 75571cf; test stand-in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Instance:
    """One request to a model: ``arguments`` of a ``generate_until`` request are (context,
    generation kwargs, doc_to_visual, doc_id, task, split)."""

    request_type: str
    arguments: tuple
    idx: int
    metadata: dict[str, Any] = field(default_factory=dict)
    resps: list = field(default_factory=list)
    filtered_resps: dict = field(default_factory=dict)
    task_name: Any = None
    doc_id: Any = None
    repeats: Any = None
    doc: Any = None

    def __post_init__(self) -> None:
        self.task_name, self.doc_id, self.repeats = (self.metadata["task"], self.metadata["doc_id"],
                                                     self.metadata["repeats"])

    @property
    def args(self) -> tuple:
        return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)
