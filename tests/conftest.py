"""Shared fixtures: small synthetic samples built once per session, real data behind a marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no weights or data sets are downloaded in tests
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """Public data folder: ``HESPOTEX_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("HESPOTEX_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    root = data_root()
    skip_real = pytest.mark.skip(reason=f"real data not found at {root} (set HESPOTEX_DATA)")
    for item in items:
        if "realdata" in item.keywords and not (root / "her2st").is_dir():
            item.add_marker(skip_real)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return data_root()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session caches embeddings in its own folder, never in the user's cache."""
    import hespotex as hx

    cache = tmp_path_factory.getbasetemp() / "hespotex-cache"
    monkeypatch.setattr(hx.settings, "cachedir", cache)
    monkeypatch.setattr(hx.settings, "progress", False)
