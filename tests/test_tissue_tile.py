"""Tissue detection (hx.pp.detect_tissue) and pseudo-spot tiling (hx.pp.tile) on synthetic whole-slide images."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
from scipy.spatial import cKDTree

import hespotex as hx
from hespotex.datasets._synthetic_wsi import _SlideModel

pytestmark = pytest.mark.usefixtures("single_threaded")

SHAPE = (1800, 2200)  # height, width at 1.0 µm/px: the resolution the `trained_synthetic` model was trained at
SEED, BLOBS = 5, 3


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiles") / "syn.ome.tif"
    return hx.datasets.synthetic_wsi(
        path, width=SHAPE[1], height=SHAPE[0], microns_per_pixel=1.0, tile=256, seed=SEED, n_blobs=BLOBS
    )


def test_detect_tissue_matches_the_synthetic_truth(slide_path):
    from skimage.draw import polygon as fill

    sdata = hx.io.read_wsi(slide_path)
    tissue = hx.pp.detect_tissue(sdata)
    assert sdata.shapes["syn_tissue"] is tissue and (np.diff(tissue["area_um2"]) <= 0).all()
    record = sdata.attrs["hespotex_tissue"]["syn_tissue"]
    assert record["level"] == 3 and record["level_microns_per_pixel"] == pytest.approx(8.0)  # nearest 8-16 µm/px
    # the generator's own tissue field, on its grid of cells, against the polygons drawn on that grid
    truth_model = _SlideModel(*SHAPE, 1.0, seed=SEED, n_blobs=BLOBS)
    cell = truth_model.fields.cell
    truth = truth_model.fields.maps["tissue"] > 0
    drawn = np.zeros_like(truth)
    for poly in tissue.geometry:
        xy = np.asarray(poly.exterior.coords)
        rr, cc = fill(xy[:, 1] / cell - 0.5, xy[:, 0] / cell - 0.5, shape=drawn.shape)
        drawn[rr, cc] = True
        for hole in poly.interiors:
            xy = np.asarray(hole.coords)
            rr, cc = fill(xy[:, 1] / cell - 0.5, xy[:, 0] / cell - 0.5, shape=drawn.shape)
            drawn[rr, cc] = False
    iou = (truth & drawn).sum() / (truth | drawn).sum()
    assert iou > 0.85, iou  # small islands of the truth fall under min_area_um2
    assert record["area_um2"] == pytest.approx(truth.sum() * cell**2, rel=0.15)
    with pytest.raises(ValueError, match="overwrite=True"):
        hx.pp.detect_tissue(sdata)
    again = hx.pp.detect_tissue(sdata, channel="hematoxylin", key_added="haem")
    assert (
        "haem" in sdata.shapes
        and again.union_all().intersection(tissue.union_all()).area > 0.8 * again.union_all().area
    )


def test_no_tissue_is_a_clear_error(tmp_path):
    path = hx.datasets.synthetic_wsi(tmp_path / "glass.ome.tif", width=1200, height=900, n_blobs=0, tile=256)
    sdata = hx.io.read_wsi(path)
    with pytest.raises(ValueError, match="No tissue found"):
        hx.pp.detect_tissue(sdata)
    assert "glass_tissue" not in sdata.shapes
    with pytest.raises(ValueError, match="No tissue found"):
        hx.pp.tile(sdata, spot_diameter_um=55.0, spacing_um=100.0)


def test_tile_geometry_layouts_and_overwrite(slide_path, caplog):
    from spatialdata.transformations import get_transformation

    sdata = hx.io.read_wsi(slide_path)
    table = hx.pp.tile(sdata, spot_diameter_um=55.0, spacing_um=100.0)
    assert "syn_tissue" in sdata.shapes  # detected on the way
    n = table.n_obs
    assert n > 30 and sdata.tables["table"] is table and table.n_vars == 0
    assert list(table.obs_names) == [f"syn_{i}" for i in range(n)]
    info = hx._sample.get_sample_info(sdata)
    assert (info.sample_id, info.image_key, info.shapes_key, info.coordinate_system) == (
        "syn",
        "syn_image",
        "syn_spots",
        "syn",
    )
    assert info.microns_per_pixel == 1.0 and info.spot_diameter_um == 55.0
    assert table.uns["spatialdata_attrs"] == {"region": "syn_spots", "region_key": "region", "instance_key": "spot_id"}
    circles = sdata.shapes["syn_spots"]
    assert np.allclose(circles["radius"], 27.5) and len(circles) == n
    assert np.allclose(np.c_[circles.geometry.x, circles.geometry.y], table.obsm["spatial"])
    assert (
        get_transformation(circles, to_coordinate_system="syn").to_affine_matrix(("x", "y"), ("x", "y")).tolist()
        == np.eye(3).tolist()
    )
    # hexagonal lattice: six neighbours at the spacing, one row apart or two columns apart
    xy = table.obsm["spatial"]
    dist, nn = cKDTree(xy).query(xy, k=2)
    assert np.allclose(dist[:, 1], 100.0)
    rc = table.obs[["array_row", "array_col"]].to_numpy()
    step = np.abs(rc[nn[:, 1]] - rc)
    assert ((step == [0, 2]).all(axis=1) | (step == [1, 1]).all(axis=1)).all()
    assert (table.obs["tissue_fraction"] >= 0.5).all()
    # spots lie on tissue: their centres are much darker than glass
    level0 = sdata.images["syn_image"]["scale0"]["image"].data
    centre = np.stack(
        [np.asarray(level0[:, int(y) - 5 : int(y) + 5, int(x) - 5 : int(x) + 5]).mean(axis=(1, 2)) for x, y in xy[::5]]
    )
    assert centre.mean(axis=1).mean() < 215
    with pytest.raises(ValueError, match="overwrite=True"):
        hx.pp.tile(sdata, spot_diameter_um=55.0, spacing_um=100.0)
    # square grid, stricter tissue fraction, replacing the old spots and the tables annotating them
    sdata.tables["old_predictions"] = copy.deepcopy(table)
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        grid = hx.pp.tile(
            sdata, spot_diameter_um=55.0, spacing_um=100.0, layout="grid", min_tissue_fraction=1.0, overwrite=True
        )
    assert "old_predictions" not in sdata.tables and "old_predictions" in caplog.text
    gxy = grid.obsm["spatial"]
    assert np.allclose(cKDTree(gxy).query(gxy, k=2)[0][:, 1], 100.0)
    assert (grid.obs["tissue_fraction"] == 1.0).all() and grid.n_obs < n * 1.2
    assert len(sdata.shapes["syn_spots"]) == grid.n_obs
    with pytest.raises(ValueError, match=r"spot_diameter_um=.*spacing_um="):
        hx.pp.tile(sdata, overwrite=True)
    with pytest.raises(ValueError, match="layout"):
        hx.pp.tile(sdata, spot_diameter_um=55.0, spacing_um=100.0, layout="square", overwrite=True)


def test_tiled_slide_embeds_and_predicts(slide_path, trained_synthetic, caplog):
    from hespotex.pp._patches import plan_patches

    model, model_dir = trained_synthetic["model"], trained_synthetic["model_dir"]
    sdata = hx.io.read_wsi(slide_path)
    table = hx.pp.tile(sdata, model=model_dir)
    geometry = model.spot_geometry
    assert table.uns["hespotex_sample"]["spot_diameter_um"] == pytest.approx(geometry["spot_diameter_um"])
    xy = table.obsm["spatial"]
    assert np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]) == pytest.approx(geometry["spacing_um"], rel=1e-6)
    assert table.uns["hespotex_tile"]["geometry_source"].startswith("model")
    out = hx.tl.predict(sdata, model_dir, device="cpu")
    assert out is sdata.tables["hespotex"] and out.n_obs == table.n_obs
    assert list(out.var_names) == model.genes and np.isfinite(out.layers["hespotex"]).all()
    assert out.layers["hespotex"].std(axis=0).mean() > 0  # the tiles differ, and so do their predictions
    # embedded on the way with the model's encoder, at the trained patch size in µm
    assert table.obsm["X_hespotex_image"].shape[0] == table.n_obs
    assert table.uns["hespotex_embed"]["X_hespotex_image"]["patch_um"] == pytest.approx(model.embedding["patch_um"])

    # the same slide declared at 0.4 µm/px: a warning, and patches still cover the trained size in µm
    trained = copy.deepcopy(model)
    trained.spot_geometry = {**trained.spot_geometry, "microns_per_pixel": 1.0}
    fine = hx.io.read_wsi(slide_path, microns_per_pixel=0.4)
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        caplog.clear()
        tiles = hx.pp.tile(fine, model=trained)
    assert "training slides" in caplog.text
    patch_um = model.embedding["patch_um"]
    plan = plan_patches(fine, patch_um=patch_um, out_px=model.embedding["input_size"])
    assert plan.size == pytest.approx(patch_um / 0.4 * min(plan.level.scale), abs=1)
    assert tiles.uns["hespotex_sample"]["microns_per_pixel"] == 0.4
