"""Old argument names keep working for one release (issue #11: one vocabulary).

Like scanpy (``scanpy._compat.old_positionals``, built on ``legacy_api_wrap.legacy_api``): a renamed keyword
is mapped to its new name with a :class:`FutureWarning` naming the new argument and the release it goes
away in; passing both is a :class:`TypeError`. :data:`RENAMED_ARGUMENTS` is the one table of renames
(read by the decorator, the tests and ``RENAMES.md``); :func:`old_positionals` lets arguments that became
keyword-only still be passed by position, with a warning.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from legacy_api_wrap import legacy_api

from hespotex._constants import REMOVAL_RELEASE

F = TypeVar("F", bound=Callable[..., Any])

#: Every public rename: ``{"module.function": {old name: new name}}`` (module relative to ``hespotex``).
RENAMED_ARGUMENTS: dict[str, dict[str, str]] = {
    "tl.train": {"embedding_key": "use_rep"},
    "tl.predict": {"embedding_key": "use_rep"},
    "tl.explain": {"embedding_key": "use_rep", "n_top": "n_spots"},
    "tl.cross_validate": {"embedding_key": "use_rep"},
    "tl.evaluate": {"layer": "key"},
    "tl.consistency": {"layer": "key", "measured": "truth"},
    "tl.diagnostic_patches": {"n": "n_patches"},
    "pp.select_genes": {"n_top": "n_top_genes"},
    "pp.tile": {"table_key": "key_added"},
    "pl.spatial": {"table_key": "key", "measured": "truth"},
    "pl.explorer": {"table_key": "key", "measured": "truth"},
    "pl.Explorer": {"table_key": "key", "measured": "truth"},
    "pl.evaluation": {"table_key": "key"},
    "pl.attention": {"table_key": "key"},
}

#: Arguments that became keyword-only: ``{"module.function": (names, in their old positional order)}``.
OLD_POSITIONALS: dict[str, tuple[str, ...]] = {
    "io.read_visium_hd": ("bin_size",),
}


def renamed_arguments(name: str) -> Callable[[F], F]:
    """Map the old keyword names of the public function ``name`` (a key of :data:`RENAMED_ARGUMENTS`).

    An old name gives a :class:`FutureWarning` naming the new argument and the release it is removed in;
    old and new together give a :class:`TypeError`. The wrapper keeps the new signature
    (``functools.wraps``) and records the mapping in ``__renamed_arguments__``.
    """
    mapping = RENAMED_ARGUMENTS[name]

    def decorate(func: F) -> F:
        params = inspect.signature(func).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for old, new in mapping.items():
            if (new not in params and not var_kw) or old in params:
                msg = f"hx.{name}: rename {old!r} -> {new!r} expects {new!r}, and not {old!r}, in the signature."
                raise TypeError(msg)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in mapping.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    msg = f"hx.{name}() got both `{old}` (its old name) and `{new}`; pass only `{new}=`."
                    raise TypeError(msg)
                warnings.warn(
                    f"hx.{name}: the argument `{old}` is renamed `{new}`; `{old}` is removed in hespotex "
                    f"{REMOVAL_RELEASE}. Pass `{new}=` instead.",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        wrapper.__renamed_arguments__ = dict(mapping)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def old_positionals(name: str) -> Callable[[F], F]:
    """Let the keyword-only arguments :data:`OLD_POSITIONALS` ``[name]`` still be passed by position.

    scanpy's approach (``legacy_api_wrap.legacy_api`` with ``FutureWarning``): a call using the old positions
    works and warns that the arguments are keyword-only now.
    """
    names = OLD_POSITIONALS[name]

    def decorate(func: F) -> F:
        wrapped = legacy_api(*names, category=FutureWarning)(func)
        wrapped.__old_positionals__ = names  # type: ignore[attr-defined]
        return wrapped

    return decorate
