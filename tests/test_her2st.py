"""The her2st loader on the real data (five sections of Andersson et al. 2021)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hespotex as hx
from hespotex._sample import get_sample_info, spot_centres

pytestmark = pytest.mark.realdata

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


@pytest.fixture(scope="module")
def her2st_dir(shared_data):
    return shared_data / "her2st"


@pytest.fixture(scope="module")
def samples(her2st_dir):
    return hx.datasets.her2st(her2st_dir)


def _level0(element) -> np.ndarray:
    from spatialdata import get_pyramid_levels
    from xarray import DataArray

    return (element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)).data


def test_all_sections_load(samples):
    assert list(samples) == SECTIONS
    n_spots = [s.tables["table"].n_obs for s in samples.values()]
    assert all(170 <= n <= 190 for n in n_spots)
    assert sum(n_spots) == 910  # 918 selected spots, 8 of which have no count row in the public files
    dropped = sum(s.tables["table"].uns["hespotex_io"]["n_spots_without_counts"] for s in samples.values())
    assert dropped == 8
    for sid, sdata in samples.items():
        info = get_sample_info(sdata)
        assert (info.sample_id, info.coordinate_system, info.image_key, info.shapes_key) == (
            sid,
            sid,
            f"{sid}_image",
            f"{sid}_spots",
        )
        assert "Andersson" in sdata.tables["table"].uns["hespotex_dataset"]["citation"]


def test_counts_match_the_files(samples, her2st_dir):
    for sid in ("C2", "C6"):
        table = samples[sid].tables["table"]
        raw = pd.read_csv(her2st_dir / "counts" / f"{sid}.tsv.gz", sep="\t", index_col=0)
        assert list(table.var_names) == list(raw.columns)
        np.testing.assert_array_equal(table.X.toarray(), raw.loc[table.obs_names].to_numpy())
    for sdata in samples.values():
        x = sdata.tables["table"].X
        assert x.dtype == np.float32 and np.array_equal(x.data, np.round(x.data))
        assert int((np.asarray(x.sum(axis=0)).ravel() > 0).sum()) > 13_000  # genes detected in every section


def test_scale_and_circles(samples):
    for sdata in samples.values():
        info = get_sample_info(sdata)
        # fitted on the 200 µm array grid: ~291 px per step. (The median nearest-neighbour distance,
        # ~272 px, is smaller only because it is the minimum over noisy neighbour distances.)
        assert 0.68 < info.microns_per_pixel < 0.70
        assert info.spot_diameter_um == 100.0
        radius = sdata.shapes[info.shapes_key]["radius"].to_numpy()
        np.testing.assert_allclose(radius, 50.0 / info.microns_per_pixel)
        fit = sdata.tables["table"].uns["hespotex_io"]
        assert abs(fit["px_per_step_x"] / fit["px_per_step_y"] - 1) < 0.02


def test_spots_aligned_with_image_pixels(samples, her2st_dir):
    import dask.array as da
    from PIL import Image
    from spatialdata import get_centroids

    Image.MAX_IMAGE_PIXELS = None
    for sid, sdata in samples.items():
        info = get_sample_info(sdata)
        table = sdata.tables["table"]
        xy = spot_centres(sdata)
        spots = pd.read_csv(her2st_dir / "spots" / f"{sid}_selection.tsv", sep="\t")
        spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
        np.testing.assert_array_equal(xy, spots.loc[table.obs_names, ["pixel_x", "pixel_y"]].to_numpy())
        centres = get_centroids(sdata.shapes[info.shapes_key], coordinate_system=sid).compute()
        np.testing.assert_allclose(centres[["x", "y"]].to_numpy(), xy)
        pix = _level0(sdata.images[info.image_key])
        with Image.open(her2st_dir / "images" / f"{sid}.jpg") as im:
            jpeg = np.asarray(im)
        assert tuple(pix.shape) == (3, *jpeg.shape[:2])
        rows, cols = np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)
        got = np.asarray(da.stack([pix[:, r, c] for r, c in zip(rows, cols, strict=True)]).compute())
        np.testing.assert_array_equal(got, jpeg[rows, cols])
        # spot centres fall on tissue (H&E stain), not on the bright glass background
        assert np.median(jpeg[rows, cols].mean(axis=1)) < 220


def test_gene_panel_and_paths(her2st_dir, samples, monkeypatch, tmp_path):
    genes = hx.datasets.her2st_genes(her2st_dir)
    assert len(genes) == 785 and len(set(genes)) == 785
    for sdata in samples.values():
        assert set(genes) <= set(sdata.tables["table"].var_names)
    monkeypatch.setenv("HESPOTEX_DATA", str(her2st_dir.parent))
    assert hx.datasets.her2st_path() == her2st_dir
    assert hx.datasets.her2st_sections() == SECTIONS
    beside_repo = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"
    if beside_repo.is_dir():  # without HESPOTEX_DATA: ../shared/data/her2st relative to the repository
        monkeypatch.delenv("HESPOTEX_DATA")
        assert hx.datasets.her2st_path() == beside_repo
    with pytest.raises(FileNotFoundError, match="HESPOTEX_DATA"):
        hx.datasets.her2st_path(tmp_path)
    with pytest.raises(ValueError, match="C9"):
        hx.datasets.her2st(her2st_dir, sections=["C2", "C9"])


def test_every_spot_of_every_section_gets_an_embedding(samples):
    """All five sections embed with the real ImageNet EfficientNet-Lite0 (112 px input keeps CI fast)."""
    encoder = hx.pp.load_encoder("efficientnet_lite0.imagenet", input_size=112)
    for name, sdata in samples.items():
        hx.pp.embed(sdata, encoder=encoder, key_added="X_test_lite0")
        table = sdata["table"]
        emb = table.obsm["X_test_lite0"]
        assert emb.shape == (table.n_obs, 1280), name
        assert np.isfinite(emb).all() and emb.std(axis=0).mean() > 0
        params = table.uns["hespotex_embed"]["X_test_lite0"]
        assert params["patch_um"] == 100.0 and params["crop_px"] > 112  # read at full resolution, then downsampled
        assert len(np.unique(emb.round(4), axis=0)) == table.n_obs  # every spot sees its own patch
