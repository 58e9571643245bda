"""The ``hespotex`` command for batch jobs (``hespotex.cli:main``, also ``python -m hespotex.cli``).

One module per subcommand (``_demo``, ``_train``, ``_tile``, ``_predict``, ``_export``: its help
texts, its options and what it runs), what they share in ``_common``, the top-level parser and
exit codes in ``_main``.
"""

from hespotex.cli._demo import demo
from hespotex.cli._main import build_parser, main

__all__ = ["build_parser", "demo", "main"]
