"""The ``hespotex`` command for batch jobs (``hespotex.cli:main``, also ``python -m hespotex.cli``)."""

from hespotex.cli._main import build_parser, demo, main

__all__ = ["build_parser", "demo", "main"]
