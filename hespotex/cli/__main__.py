"""``python -m hespotex.cli``: the ``hespotex`` command."""

from hespotex.cli._main import main

raise SystemExit(main())
