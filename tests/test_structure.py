"""The shape of the package: no import cycles, no module over 500 lines, no private names used across modules.

Read from the source with :mod:`ast` alone (nothing of hespotex is imported), so it is fast and also
runs where the optional dependencies are missing.

What counts as an import cycle
------------------------------
Modules ``A -> B -> ... -> A`` where each arrow is an ``import`` / ``from ... import`` of one
hespotex module by another, wherever the statement is: at module level, inside a function or under
``if TYPE_CHECKING:``. An import moved into a function still makes ``A`` need ``B`` (it only hides
the cycle from the interpreter until that function runs), and an annotation-only import still ties
the two modules together; either way the shared piece belongs in a third, lower module.

``from pkg.mod import name`` points at ``pkg.mod.name`` when that is a module, else at ``pkg.mod``.
A package's ``__init__`` is a node like any module, with the edges of the imports it really makes.
The lazy registries (``hespotex._lazy.attach(__name__, {"predict": "_predict", ...})``) import
nothing when the package is imported: a name is looked up when first used, so ``hx.tl.predict`` in
``pl`` is a call into ``tl``, not an import edge ``pl -> tl._predict``. Importing ``hespotex.tl`` is
therefore an edge to ``hespotex.tl`` (the registry), which leads nowhere, not to every module it lists.
A package ``__init__`` that imports eagerly (``hespotex.cli`` imports ``hespotex.cli._main``)
carries those edges on. The implicit import of a module's parent packages (``import a.b.c`` runs
``a/__init__`` and ``a/b/__init__``) is not an edge: it would make every ``__init__`` that imports
its own submodules a cycle.

On a tree whose ``__init__`` modules only hold registries this finds the same cycles as
``import_cycles.py`` (which drops every edge to an ``__init__``).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hespotex"
MAX_LINES = 500


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` of every import of a package module in ``path``."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module not in mods:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in mods else (module, alias.name, node.lineno))
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file), without self-edges."""
    mods = modules(root)
    return {m: {t for t, _, _ in _imports(m, f, mods) if t != m} for m, f in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def private_imports(root: Path) -> list[str]:
    """``file:line: from module import _name`` for every underscore name one package module takes from another.

    Private *modules* (``from hespotex import _ownership``) are fine: the rule is about names.
    """
    mods = modules(root)
    out = []
    for m, f in mods.items():
        for target, name, line in _imports(m, f, mods):
            if name and name.startswith("_") and not name.startswith("__") and target != m:
                out.append(f"{f.relative_to(root.parent)}:{line}: from {target} import {name}")
    return sorted(out)


def long_modules(root: Path, limit: int = MAX_LINES) -> list[str]:
    """``module (n lines)`` for every module over ``limit`` lines."""
    counts = {m: len(f.read_text().splitlines()) for m, f in modules(root).items()}
    return [f"{m} ({n} lines)" for m, n in sorted(counts.items()) if n > limit]


# --------------------------------------------------------------------------------------------------
# the package


def test_no_import_cycles():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles between hespotex modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_over_500_lines():
    found = long_modules(PACKAGE)
    assert not found, f"modules over {MAX_LINES} lines (split them by responsibility):\n" + "\n".join(found)


def test_no_private_names_across_modules():
    found = private_imports(PACKAGE)
    assert not found, (
        "underscore names imported from another hespotex module (a name another module uses is public; "
        "its module stays private):\n" + "\n".join(found)
    )


# --------------------------------------------------------------------------------------------------
# the checks themselves, on a small package written here


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


def test_checks_find_what_they_should(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "__init__.py": (
                "from pkg._lazy import attach\n__getattr__, __dir__, __all__ = attach(__name__, {'f': 'a._f'})\n"
            ),
            "_lazy.py": "def attach(name, exports):\n    return None, None, []\n",
            "a/__init__.py": "",
            # a cycle hidden in a function, one through a relative import, one only under TYPE_CHECKING
            "a/_f.py": "def f():\n    from pkg.a._g import g\n    return g()\n",
            "a/_g.py": "from . import _f\n\ndef g():\n    return 1\n",
            "a/_h.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a._i import I\n",
            "a/_i.py": "from pkg.a._h import _helper\nclass I: ...\n",
            # not cycles: the registry, a module using the package by attribute, an eager __init__ chain
            "b/__init__.py": "from pkg.b._main import main\n",
            "b/_main.py": "import pkg\nfrom pkg.b._cmd import run\n\ndef main():\n    return run() + pkg.f()\n",
            "b/_cmd.py": "from pkg import _lazy\n\ndef run():\n    return 0\n",
            "big.py": "x = 1\n" * (MAX_LINES + 1),
        },
    )
    graph = import_graph(pkg)
    assert graph["pkg.a._g"] == {"pkg.a._f"} and graph["pkg.b._main"] == {"pkg", "pkg.b._cmd"}
    assert graph["pkg"] == {"pkg._lazy"}  # the registry's entries are strings, not imports
    assert cycles(graph) == [["pkg.a._f", "pkg.a._g"], ["pkg.a._h", "pkg.a._i"]]
    assert private_imports(pkg) == ["pkg/a/_i.py:1: from pkg.a._h import _helper"]  # _f, _lazy are modules
    assert long_modules(pkg) == [f"pkg.big ({MAX_LINES + 1} lines)"]
    (pkg / "b" / "_cmd.py").write_text("from pkg.b import main\n")  # through the eager __init__: a cycle
    assert cycles(import_graph(pkg)) == [
        ["pkg.a._f", "pkg.a._g"],
        ["pkg.a._h", "pkg.a._i"],
        ["pkg.b", "pkg.b._cmd", "pkg.b._main"],
    ]
