"""vsink: find, fix and measure attention sinks and register tokens in vision transformers.

Quick start::

    import vsink
    backbone = vsink.load("demo")                  # or "timm:...", "open_clip:...", "hf:..."
    result = vsink.scan(backbone, ["a.jpg", "b.png"])
    result.save("vsink-out")                       # scan.json, report.html, trace.npz
"""

from .version import __version__
from .backbones import SITES, Backbone, load, spec_forms, wrap
from .errors import ImageError, ModelSpecError, VsinkError
from .layout import TokenLayout
from .maps import MapsResult, export_maps
from .probe import Probe, Trace
from .scan import NothingScanned, ScanResult, scan

__all__ = [
    "SITES", "Backbone", "ImageError", "MapsResult", "ModelSpecError", "NothingScanned", "Probe",
    "ScanResult", "TokenLayout", "Trace", "VsinkError", "export_maps", "load", "scan", "spec_forms", "wrap", "__version__",
]
