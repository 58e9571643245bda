"""hespotex: spot-level gene expression from H&E histology (HESpotEx).

``import hespotex as hx`` gives :mod:`hx.io`, :mod:`hx.pp`, :mod:`hx.tl`, :mod:`hx.pl`,
:mod:`hx.datasets` and :data:`hx.settings`. Heavy libraries (torch, timm, torch-geometric,
panel) are imported only when a function needs them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from hespotex import datasets, io, pl, pp, tl
from hespotex._settings import settings

try:
    __version__ = version("hespotex")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "datasets", "io", "pl", "pp", "settings", "tl"]
