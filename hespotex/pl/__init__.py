"""Plotting: HoloViews / Panel views of predictions, attention and evaluation."""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "spatial": "_spatial",
        "attention": "_attention",
        "diagnostic_patches": "_patches",
        "evaluation": "_evaluation",
        "explorer": "_explorer",
        "Explorer": "_explorer",
        "export": "_export",
    },
)
