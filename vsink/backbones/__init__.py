"""Backbone adapters: one file per model family behind one protocol."""

from .base import Backbone
from .sites import SITES, SiteHandle, SiteModel
from .registry import SPEC_FORMS, load, load_weights, read_state_dict, wrap

__all__ = ["SITES", "SPEC_FORMS", "Backbone", "SiteHandle", "SiteModel", "load", "load_weights", "read_state_dict", "wrap"]
