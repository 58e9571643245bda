"""Tools: the HESpotEx model (train / predict / save / load), evaluation and baselines."""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {})
