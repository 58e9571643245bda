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


@pytest.fixture(scope="module")
def _one_thread_module():
    """One torch / BLAS thread for a module of small models: on a busy 2-core machine two threads
    contend badly (several-fold slowdowns); restored afterwards."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    with threadpool_limits(limits=1):
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(n)


@pytest.fixture
def single_threaded(_one_thread_module):
    """Use with ``pytestmark = pytest.mark.usefixtures("single_threaded")``. Sets torch to one thread
    again before each test: numba's OpenMP layer (scanpy's seurat_v3) resets it when it starts."""
    import torch

    torch.set_num_threads(1)


def make_sample(
    *,
    n_spots: int = 60,
    n_genes: int = 40,
    seed: int = 0,
    sample_id: str = "S",
    image_shape: tuple[int, int] | None = (600, 500),
    mpp: float = 0.5,
    spot_diameter_um: float = 55.0,
):
    """A small random sample through the real builder (random image, Poisson counts)."""
    import numpy as np
    import pandas as pd

    from hespotex.io import build_sample

    rng = np.random.default_rng(seed)
    h, w = image_shape or (600, 500)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if image_shape else None
    xy = np.c_[rng.uniform(0, w - 1, n_spots), rng.uniform(0, h - 1, n_spots)]
    counts = rng.poisson(rng.gamma(1.0, 2.0, (1, n_genes)), (n_spots, n_genes))
    return build_sample(
        image,
        xy,
        counts,
        obs=pd.DataFrame(index=[f"{sample_id}_{i}" for i in range(n_spots)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
        sample_id=sample_id,
        microns_per_pixel=mpp,
        spot_diameter_um=spot_diameter_um,
    )


@pytest.fixture
def sample_factory():
    return make_sample
