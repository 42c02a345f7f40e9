"""Placing an LVLM's modules across devices, CPU and disk with accelerate's device maps
(``from_pretrained(..., device_map=...)``): the ``--device-map`` value checked and turned into
``from_pretrained`` keywords, and the device inputs go to under such a map."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..errors import VsinkError

#: accelerate's named strategies (``auto`` fills GPUs, then CPU, then disk)
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential", "cpu")
#: a strategy name, a path to a JSON file mapping module names to devices, or such a mapping
DeviceMap = Union[str, os.PathLike, Mapping[str, Union[int, str]]]


def _place(name: str, where: Any, origin: str) -> Union[int, str]:
    """One entry of a device map: a GPU index, ``cpu``, ``disk``, ``cuda``/``cuda:N``, ``mps``."""
    if isinstance(where, int) and not isinstance(where, bool) and where >= 0:
        return where
    if isinstance(where, str) and (where in ("cpu", "disk", "mps", "cuda") or
                                   (where.startswith("cuda:") and where[5:].isdigit())):
        return where
    raise VsinkError(f"{origin}: module {name!r}: {where!r} is not a device (a GPU index, cpu, disk, cuda:N or mps)")


def device_map_arg(value: DeviceMap) -> Union[str, dict[str, Union[int, str]]]:
    """``value`` checked: a strategy of :data:`STRATEGIES`, or a mapping of module names (as in
    ``model.named_modules()``; ``""`` for the whole model) to devices, given as such or as a JSON
    file holding one object."""
    origin = "--device-map"
    if isinstance(value, (str, os.PathLike)):
        if str(value) in STRATEGIES:
            return str(value)
        path = Path(value)
        if not path.is_file():
            raise VsinkError(f"--device-map: {str(value)!r} is neither {', '.join(STRATEGIES)} nor a JSON file")
        origin = f"--device-map {path}"
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VsinkError(f"{origin}: cannot read a JSON object ({' '.join(str(e).split())})") from None
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) for k in value):
        raise VsinkError(f"{origin}: expected an object mapping module names to devices")
    return {name: _place(name, where, origin) for name, where in value.items()}


def device_map_kwargs(device_map: Optional[DeviceMap], offload_folder: Optional[Union[str, os.PathLike]],
                      repo: str) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of ``--device-map`` / ``--offload-folder`` (none without a
    device map); refuses before anything loads when accelerate is missing or a map puts modules
    on ``disk`` without a folder."""
    if device_map is None:
        if offload_folder is not None:
            raise VsinkError("--offload-folder is used only with --device-map")
        return {}
    placement = device_map_arg(device_map)
    if importlib.util.find_spec("accelerate") is None:
        raise VsinkError("--device-map needs the 'accelerate' package: pip install 'vsink[scale]' (or accelerate)")
    kwargs: dict[str, Any] = {"device_map": placement}
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    elif isinstance(placement, dict) and "disk" in placement.values():
        raise VsinkError(f"--device-map puts modules of {repo} on disk: give --offload-folder DIR")
    return kwargs


def device_map_main(placed: Mapping[str, Union[int, str, torch.device]]) -> torch.device:
    """The device a dispatched model's inputs go to: the first placement that is neither ``cpu``
    nor ``disk`` (transformers' own choice when it dispatches), else ``cpu``."""
    for where in placed.values():
        if str(where) not in ("cpu", "disk"):
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    return torch.device("cpu")
