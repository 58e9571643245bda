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
    import scipy.linalg  # noqa: F401  BLAS libraries loaded later escape threadpool_limits: load them first
    import sklearn.decomposition  # noqa: F401
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


@pytest.fixture(scope="session")
def trained_synthetic(tmp_path_factory):
    """A small HESpotEx trained on two synthetic sections and its predictions on a third (session-wide,
    read-only: copy what you change). Keys: ``model`` (trained, "hespotex" preset: GATv2 attention),
    ``model_dir`` (saved copy), ``train`` (two SpatialData), ``test`` (SpatialData whose table holds
    ``layers["hespotex"]``, ``obsm["X_hespotex"]``, ``obsp["hespotex_attention"]``), ``encoder``, ``input_size``."""
    import torch

    import hespotex as hx
    from hespotex.models import ModelConfig

    n_threads, saved = torch.get_num_threads(), (hx.settings.cachedir, hx.settings.progress)
    torch.set_num_threads(1)
    hx.settings.cachedir, hx.settings.progress = tmp_path_factory.getbasetemp() / "hespotex-cache", False
    encoder, input_size = "efficientnet_lite0.imagenet", 64
    small = {
        "ae_epochs": 20,
        "ae_hidden_dim": 64,
        "latent_dim": 16,
        "projection_hidden_dim": 64,
        "head_hidden_dim": 64,
        "decoder_heads": 2,
    }
    config = ModelConfig.preset("hespotex", epochs=40, lr=3e-3, patience=None, **small)
    sections = {}
    for name, seed, n in (("a", 1, 250), ("b", 2, 250), ("t", 3, 200)):
        sdata = hx.datasets.synthetic(
            n_spots=n, n_genes=40, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"syn_{name}"
        )
        hx.pp.embed(sdata, encoder=encoder, input_size=input_size)
        sections[name] = sdata
    model = hx.tl.train(
        [sections["a"], sections["b"]],
        config=config,
        genes=list(sections["a"].tables["table"].var_names),
        seed=0,
        device="cpu",
    )
    hx.tl.predict(sections["t"], model, device="cpu")
    model_dir = model.save(tmp_path_factory.mktemp("model") / "model")
    torch.set_num_threads(n_threads)
    hx.settings.cachedir, hx.settings.progress = saved
    return {
        "model": model,
        "model_dir": model_dir,
        "train": [sections["a"], sections["b"]],
        "test": sections["t"],
        "encoder": encoder,
        "input_size": input_size,
    }


@pytest.fixture(scope="session")
def trained_ensemble(tmp_path_factory):
    """A small 3-member HESpotExEnsemble (one member per held-out section) and a test section (session-wide,
    read-only: copy what you change). Keys: ``model``, ``model_dir`` (saved folder), ``train`` (three
    SpatialData), ``test`` (an embedded SpatialData, not predicted), ``input_size``."""
    import torch

    import hespotex as hx
    from hespotex.models import ModelConfig

    n_threads, saved = torch.get_num_threads(), (hx.settings.cachedir, hx.settings.progress)
    torch.set_num_threads(1)
    hx.settings.cachedir, hx.settings.progress = tmp_path_factory.getbasetemp() / "hespotex-cache", False
    small = {"ae_epochs": 5, "ae_hidden_dim": 32, "latent_dim": 8, "projection_hidden_dim": 32,
             "head_hidden_dim": 32, "decoder_heads": 2}  # fmt: skip
    config = ModelConfig.preset("hespotex", epochs=6, lr=3e-3, patience=None, **small)
    sections = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 4), ("t", 3)):
        sdata = hx.datasets.synthetic(
            n_spots=90, n_genes=12, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"ens_{name}"
        )
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32)
        sections[name] = sdata
    train = [sections[n] for n in "abc"]
    model = hx.tl.train(
        train, config=config, genes=list(sections["a"].tables["table"].var_names), ensemble=1, device="cpu"
    )
    model_dir = model.save(tmp_path_factory.mktemp("ensemble") / "ensemble")
    torch.set_num_threads(n_threads)
    hx.settings.cachedir, hx.settings.progress = saved
    return {"model": model, "model_dir": model_dir, "train": train, "test": sections["t"], "input_size": 32}


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (never ``playwright install``); tests marked ``browser`` use it."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install it with `apt-get install -y chromium chromium-driver` (.ci/run does)."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Folder for screenshots and other files a test run leaves for people to look at (``test-artifacts/``)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
