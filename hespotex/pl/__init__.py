"""Plotting: HoloViews / Panel views of predictions, attention and evaluation."""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {})
