"""``python -m hespotex.cli``: the ``hespotex`` command."""

from hespotex.cli._main import main

if __name__ == "__main__":
    raise SystemExit(main())
