"""Backbone adapters: one file per model family behind one protocol."""

from .base import Backbone
from .sites import SITES, SiteHandle, SiteModel
from .families import family, named_spec, spec_forms
from .registry import load, wrap
from .weights import load_weights, read_state_dict

__all__ = ["SITES", "Backbone", "SiteHandle", "SiteModel", "family", "load", "load_weights", "named_spec", "read_state_dict",
           "spec_forms", "wrap"]
