"""Tutorials, notebooks and the README use only the public API: no private module or name of hespotex."""

from __future__ import annotations

import ast
import json
import re

import pytest
from conftest import REPO

NOTEBOOKS = sorted([*REPO.glob("tutorials/*.ipynb"), *REPO.glob("notebooks/*.ipynb")])
FENCE = re.compile(r"```(?:python|py)\n(.*?)```", re.DOTALL)


def _code_blocks():
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                # IPython magics and shell escapes are not Python
                source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
                yield f"{nb.relative_to(REPO)} cell {i}", source
    for md in [REPO / "README.md"]:
        for i, block in enumerate(FENCE.findall(md.read_text())):
            yield f"{md.relative_to(REPO)} block {i}", block


def private_uses(source: str, aliases: tuple[str, ...] = ("hx", "hespotex")) -> list[str]:
    """Private hespotex modules or names that ``source`` imports or reaches through an attribute."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "hespotex" and _private(a.name.split("."))]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hespotex":
            parts = node.module.split(".")
            found += [f"{node.module}.{a.name}" for a in node.names if _private([*parts, a.name])]
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases and _private(chain):
                found.append(".".join([inner.id, *chain]))
    return sorted(set(found))


def _private(parts: list[str]) -> bool:
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts)


def test_the_checker_finds_private_uses():
    code = (
        "from hespotex.pp._normalize import log_expression\nimport hespotex.tl._model\nhx.pp._genes.f()\nfrom "
        "hespotex.pp import _x\n"
    )
    assert set(private_uses(code)) == {
        "hespotex.pp._normalize.log_expression",
        "hespotex.tl._model",
        "hx.pp._genes",
        "hx.pp._genes.f",
        "hespotex.pp._x",
    }
    assert private_uses("import hespotex as hx\nhx.pp.log_normalize(a, g)\nhx.__version__\nx._private") == []


@pytest.mark.parametrize(("where", "source"), [pytest.param(w, s, id=w) for w, s in _code_blocks()])
def test_tutorials_and_readme_use_only_the_public_api(where, source):
    assert private_uses(source) == [], f"{where} uses private hespotex names; make them public or use a public function"
