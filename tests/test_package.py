"""The package surface: namespaces, lazy heavy imports, the command line and its demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hespotex as hx


def test_namespaces():
    for name in ("io", "pp", "tl", "pl", "datasets", "settings"):
        assert hasattr(hx, name)
    assert callable(hx.pp.embed) and callable(hx.tl.train) and callable(hx.io.read_visium)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = hx.pp.nope


def test_import_does_not_load_heavy_libraries():
    code = (
        "import sys, hespotex; print(sorted(m for m in ('torch', 'timm', 'torch_geometric', 'panel', "
        "'spatialdata') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_help_and_bad_output_dir(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "hespotex.cli", "demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--her2st" in out.stdout and "did not train on" in out.stdout
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("user data")
    from hespotex.cli import main

    assert main(["demo", "--out", str(tmp_path / "taken")]) == 2  # refuses to overwrite, nothing touched
    assert (tmp_path / "taken" / "file").read_text() == "user data"
