"""lmms-eval's model base class (``lmms_eval/api/model.py`` at 75571cf; test stand-in)."""

from __future__ import annotations

import abc
from typing import Any, Optional

from lmms_eval import utils


class lmms(abc.ABC):  # noqa: N801 - lmms-eval's name
    """The interface lmms-eval calls: generation, log-likelihood, construction from model_args."""

    is_simple: bool = True

    def __init__(self) -> None:
        self._rank = 0
        self._world_size = 1
        self.cache_hook = CacheHook(None)
        self.task_dict: dict = {}

    @abc.abstractmethod
    def loglikelihood(self, requests: list) -> list:
        """(log-probability, is greedy) per request."""

    @abc.abstractmethod
    def generate_until(self, requests: list) -> list:
        """The generated text per request."""

    @abc.abstractmethod
    def generate_until_multi_round(self, requests: list) -> list:
        """The generated text per multi-round request."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> Any:
        """The model built from ``key=value,...`` (``utils.simple_parse_args_string``) and the
        non-None entries of ``additional_config``."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**utils.simple_parse_args_string(arg_string), **extra)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def set_cache_hook(self, cache_hook: "CacheHook") -> None:
        self.cache_hook = cache_hook


class CacheHook:
    """lmms-eval 0.7's cache hook: records nothing."""

    def __init__(self, cachinglm: Any = None) -> None:
        pass

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        pass
