"""Readers and writers of hx.io, and the embedded mouse brain crop."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hespotex as hx
from hespotex._sample import get_sample_info, spot_centres
from hespotex.io._anndata import is_integer_valued, open_image
from hespotex.io._visium import visium_microns_per_pixel

# ----------------------------------------------------------------------------- helpers


def _level0(element) -> np.ndarray:
    """Full-resolution (c, y, x) pixels of an image element."""
    from spatialdata import get_pyramid_levels
    from xarray import DataArray

    arr = element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)
    return np.asarray(arr.data)


def _image(h: int = 160, w: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _adata(n_side: int = 4, n_genes: int = 8, pitch: float = 30.0, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(n_side), np.arange(n_side))
    xy = np.column_stack([gx.ravel(), gy.ravel()]).astype(float) * pitch + 20.0
    n = len(xy)
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(2.0, size=(n, n_genes)).astype(np.float32)),
        obs=pd.DataFrame({"kind": ["a", "b"] * (n // 2)}, index=[f"s{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    a.obsm["spatial"] = xy
    a.obsm["X_other"] = rng.normal(size=(n, 3))
    a.layers["raw"] = a.X.copy()
    a.uns["meta"] = {"nested": {"value": 1}}
    return a


def _centroids(sdata) -> np.ndarray:
    from spatialdata import get_centroids

    info = get_sample_info(sdata)
    pts = get_centroids(sdata.shapes[info.shapes_key], coordinate_system=info.coordinate_system).compute()
    return pts[["x", "y"]].to_numpy(float)


def _check_contract(sdata, image: np.ndarray | None = None) -> None:
    info = get_sample_info(sdata)
    table = sdata.tables["table"]
    xy = spot_centres(sdata)
    np.testing.assert_allclose(_centroids(sdata), xy)  # shapes centres == obsm["spatial"]
    assert info.shapes_key in sdata.shapes
    assert table.obs["region"].astype(str).eq(info.shapes_key).all()
    if image is not None:
        pix = _level0(sdata.images[info.image_key])
        assert pix.dtype == np.uint8 and pix.shape == (3, *image.shape[:2])
        for x, y in xy[:5]:
            np.testing.assert_array_equal(pix[:, round(y), round(x)], image[round(y), round(x)])


# ----------------------------------------------------------------------------- from_anndata


def test_from_anndata_builds_sample_and_keeps_adata_intact():
    adata, img = _adata(), _image()
    before = adata.copy()
    sdata = hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_um=10.0, sample_id="s1")
    info = get_sample_info(sdata)
    assert (info.sample_id, info.coordinate_system, info.image_key, info.shapes_key) == (
        "s1",
        "s1",
        "s1_image",
        "s1_spots",
    )
    assert info.microns_per_pixel == 0.5 and info.spot_diameter_um == 10.0
    _check_contract(sdata, img)
    radius = sdata.shapes["s1_spots"]["radius"].to_numpy()
    np.testing.assert_allclose(radius, 10.0)  # 10 µm at 0.5 µm/px = 20 px wide
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(table.obsm["X_other"], adata.obsm["X_other"])
    np.testing.assert_array_equal(table.layers["raw"].toarray(), adata.layers["raw"].toarray())
    # mutate everything reachable from the result; the input must not change
    table.uns["meta"]["nested"]["value"] = 99
    table.obsm["X_other"][:] = 0
    table.layers["raw"].data[:] = -1
    table.obs["kind"] = "z"
    assert adata.uns["meta"]["nested"]["value"] == 1
    np.testing.assert_array_equal(adata.obsm["X_other"], before.obsm["X_other"])
    np.testing.assert_array_equal(adata.layers["raw"].toarray(), before.layers["raw"].toarray())
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())
    assert list(adata.obs.columns) == ["kind"] and adata.obs["kind"].tolist() == before.obs["kind"].tolist()
    assert set(adata.uns) == {"meta"} and set(adata.obsm) == {"spatial", "X_other"}


def test_from_anndata_diameter_in_pixels_and_exactly_one_diameter():
    adata, img = _adata(), _image()
    sdata = hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_px=24.0)
    assert get_sample_info(sdata).spot_diameter_um == pytest.approx(12.0)
    with pytest.raises(ValueError, match="exactly one"):
        hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_um=12.0, spot_diameter_px=24.0)
    with pytest.raises(ValueError, match="exactly one"):
        hx.io.from_anndata(adata, img, microns_per_pixel=0.5)


def test_from_anndata_counts_autodetect():
    adata, img = _adata(), _image()
    assert is_integer_valued(adata.X)
    norm = adata.copy()
    norm.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    assert not is_integer_valued(norm.X)
    with pytest.raises(ValueError, match="integer counts"):
        hx.io.from_anndata(norm, img, microns_per_pixel=0.5, spot_diameter_um=10.0, counts=True)
    sdata = hx.io.from_anndata(norm, img, microns_per_pixel=0.5, spot_diameter_um=10.0)  # detected: not counts
    np.testing.assert_allclose(sdata.tables["table"].X.toarray(), norm.X.toarray(), rtol=1e-6)


def test_from_anndata_other_spatial_key_and_missing_key():
    adata, img = _adata(), _image()
    adata.obsm["centres"] = adata.obsm.pop("spatial")
    sdata = hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_um=10.0, spatial_key="centres")
    np.testing.assert_array_equal(spot_centres(sdata), adata.obsm["centres"])
    with pytest.raises(KeyError, match="spatial"):
        hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_um=10.0)


def test_rgba_and_grayscale_images(caplog):
    adata, img = _adata(), _image()
    rgba = np.concatenate([img, np.full((*img.shape[:2], 1), 255, np.uint8)], axis=2)
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        sdata = hx.io.from_anndata(adata, rgba, microns_per_pixel=0.5, spot_diameter_um=10.0)
    assert "alpha" in caplog.text
    _check_contract(sdata, img)  # an opaque alpha dropped, RGB kept (real alpha: tests/test_io_decode.py)
    gray = img[..., 0]
    sdata = hx.io.from_anndata(adata, gray, microns_per_pixel=0.5, spot_diameter_um=10.0)
    pix = _level0(sdata.images["sample_image"])
    assert pix.shape[0] == 3
    np.testing.assert_array_equal(pix[0], gray)
    np.testing.assert_array_equal(pix[1], gray)
    np.testing.assert_array_equal(pix[2], gray)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.obsm.__setitem__("spatial", a.obsm["spatial"] + [500.0, 0.0]), "outside the image"),
        (lambda a: setattr(a, "obs_names", ["dup"] * a.n_obs), "duplicated"),
        (lambda a: setattr(a, "var_names", ["g"] * a.n_vars), "duplicated"),
        (lambda a: a.X.data.__setitem__(0, np.nan), "NaN"),
        (lambda a: a.X.data.__setitem__(0, -3.0), "negative"),
    ],
    ids=["outside", "dup-barcodes", "dup-genes", "nan", "negative"],
)
def test_from_anndata_bad_input(mutate, match):
    adata = _adata()
    mutate(adata)
    with pytest.raises(ValueError, match=match):
        hx.io.from_anndata(adata, _image(), microns_per_pixel=0.5, spot_diameter_um=10.0)


def test_from_anndata_empty_section_and_absurd_scale():
    adata, img = _adata(), _image()
    with pytest.raises(ValueError, match="empty"):
        hx.io.from_anndata(adata[:0].copy(), img, microns_per_pixel=0.5, spot_diameter_um=10.0)
    with pytest.raises(ValueError, match="absurd"):  # 500 µm at 0.5 µm/px = 1000 px, wider than the image
        hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_um=500.0)
    with pytest.raises(ValueError, match="absurd"):  # under 2 px wide
        hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_px=1.0)
    with pytest.raises(ValueError, match="microns per pixel"):
        hx.io.from_anndata(adata, img, microns_per_pixel=500.0, spot_diameter_um=100.0)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        hx.io.from_anndata(adata, img, microns_per_pixel=None, spot_diameter_um=10.0)
    with pytest.raises(ValueError, match="sample id"):
        hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_um=10.0, sample_id="a b/c")


# ----------------------------------------------------------------------------- read_st


def _st_tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """A 6 x 5 legacy-ST grid, 20 px per array step (10 µm/px for a 200 µm pitch)."""
    rng = np.random.default_rng(seed)
    ax, ay = np.meshgrid(np.arange(1, 7), np.arange(1, 6))
    ax, ay = ax.ravel(), ay.ravel()
    spots = pd.DataFrame(
        {
            "x": ax,
            "y": ay,
            "new_x": ax + 0.01,
            "new_y": ay - 0.01,
            "pixel_x": 20.0 * ax + 7,
            "pixel_y": 20.0 * ay + 5,
            "selected": 1,
        }
    )
    ids = [f"{x}x{y}" for x, y in zip(ax, ay, strict=True)]
    counts = pd.DataFrame(rng.poisson(3, size=(len(ids), 6)), index=ids, columns=[f"G{j}" for j in range(6)])
    return counts, spots, _image(160, 200, seed)


def _write_st(tmp_path: Path, counts: pd.DataFrame, spots: pd.DataFrame, image: np.ndarray, name: str = "S1"):
    from PIL import Image

    counts.to_csv(tmp_path / f"{name}.tsv.gz", sep="\t")
    spots.to_csv(tmp_path / f"{name}_selection.tsv", sep="\t", index=False)
    Image.fromarray(image).save(tmp_path / f"{name}.png")
    return tmp_path / f"{name}.tsv.gz", tmp_path / f"{name}_selection.tsv", tmp_path / f"{name}.png"


def test_read_st_files(tmp_path):
    counts, spots, img = _st_tables()
    # shuffle the count rows: the join is by "{x}x{y}", not by position
    counts = counts.sample(frac=1.0, random_state=1)
    files = _write_st(tmp_path, counts, spots, img)
    sdata = hx.io.read_st(*files)
    info = get_sample_info(sdata)
    assert info.sample_id == "S1" and info.spot_diameter_um == 100.0
    assert info.microns_per_pixel == pytest.approx(10.0)  # 200 µm / 20 px per step
    _check_contract(sdata, img)
    table = sdata.tables["table"]
    assert list(table.var_names) == list(counts.columns)
    np.testing.assert_array_equal(table.X.toarray(), counts.loc[table.obs_names].to_numpy())
    sp_idx = spots.set_index(spots["x"].astype(str) + "x" + spots["y"].astype(str)).loc[table.obs_names]
    np.testing.assert_array_equal(table.obsm["spatial"], sp_idx[["pixel_x", "pixel_y"]].to_numpy())
    assert "selected" not in table.obs and {"x", "y", "pixel_x", "pixel_y"} <= set(table.obs)
    assert table.uns["hespotex_io"]["px_per_step"] == pytest.approx(20.0)
    # an explicit scale wins
    sdata = hx.io.read_st(*files, microns_per_pixel=2.0, sample_id="other")
    assert get_sample_info(sdata).microns_per_pixel == 2.0 and "other_image" in sdata.images


def test_read_st_selected_and_disagreement(tmp_path):
    counts, spots, img = _st_tables()
    spots.loc[:4, "selected"] = 0  # five spots outside the tissue: their count rows are dropped silently
    sdata = hx.io.read_st(counts, spots, img)
    assert sdata.tables["table"].n_obs == len(spots) - 5

    extra = pd.concat([counts, pd.DataFrame([[1] * 6], index=["40x40"], columns=counts.columns)])
    with pytest.raises(ValueError, match=r"1 count rows have no spot.*'40x40'.*join='inner'"):
        hx.io.read_st(extra, spots, img)
    missing = counts.drop(index=["3x3", "4x4"])
    with pytest.raises(ValueError, match=r"2 selected spots have no count row"):
        hx.io.read_st(missing, spots, img)
    sdata = hx.io.read_st(missing, spots, img, join="inner")
    table = sdata.tables["table"]
    assert table.n_obs == len(spots) - 5 - 2 and "3x3" not in table.obs_names
    assert sorted(table.uns["hespotex_io"]["spots_without_counts"]) == ["3x3", "4x4"]
    with pytest.raises(ValueError, match="join"):
        hx.io.read_st(counts, spots, img, join="outer")


def test_read_st_duplicated_genes_and_spots(tmp_path):
    counts, spots, img = _st_tables()
    dup_genes = counts.copy()
    dup_genes.columns = ["G0", "G1", "G1", "G3", "G4", "G5"]
    files = _write_st(tmp_path, dup_genes, spots, img)
    with pytest.raises(ValueError, match=r"unique genes.*'G1'"):  # not silently renamed to G1.1
        hx.io.read_st(*files)
    with pytest.raises(ValueError, match="unique spot ids"):
        hx.io.read_st(pd.concat([counts, counts.iloc[:1]]), spots, img)
    with pytest.raises(ValueError, match="unique spot ids"):
        hx.io.read_st(counts, pd.concat([spots, spots.iloc[:1]]), img)


def test_read_st_bad_values(tmp_path):
    counts, spots, img = _st_tables()
    nan = counts.astype(float)
    nan.iloc[2, 3] = np.nan
    files = _write_st(tmp_path, nan, spots, img)
    with pytest.raises(ValueError, match="NaN"):
        hx.io.read_st(*files)
    neg = counts.copy()
    neg.iloc[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        hx.io.read_st(neg, spots, img)
    empty = spots.assign(selected=0)
    with pytest.raises(ValueError, match="empty"):
        hx.io.read_st(counts, empty, img)
    outside = spots.copy()
    outside.loc[0, "pixel_x"] = 5000.0
    with pytest.raises(ValueError, match="outside the image"):
        hx.io.read_st(counts, outside, img, microns_per_pixel=10.0)
    with pytest.raises(ValueError, match="spot diameter"):
        hx.io.read_st(counts, spots, img, spot_diameter_um=5000.0)
    with pytest.raises(ValueError, match="absurd"):  # 100 µm at 0.2 µm/px = 500 px, wider than the image
        hx.io.read_st(counts, spots, img, microns_per_pixel=0.2)
    with pytest.raises(ValueError, match="missing"):
        hx.io.read_st(counts, spots.drop(columns="pixel_y"), img)


def test_read_st_normalised_values_are_not_counts(tmp_path, caplog):
    counts, spots, img = _st_tables()
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        sdata = hx.io.read_st(np.log1p(counts), spots, img)
    assert "not integer-valued" in caplog.text
    np.testing.assert_allclose(sdata.tables["table"].X.toarray(), np.log1p(counts).to_numpy(), rtol=1e-6)


def test_read_st_rgba_and_grayscale_files(tmp_path):
    from PIL import Image

    counts, spots, img = _st_tables()
    Image.fromarray(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    sdata = hx.io.read_st(counts, spots, tmp_path / "rgba.png")
    _check_contract(sdata, img)
    Image.fromarray(img[..., 1]).save(tmp_path / "gray.png")
    sdata = hx.io.read_st(counts, spots, tmp_path / "gray.png")
    _check_contract(sdata, np.repeat(img[..., 1:2], 3, axis=2))


# ----------------------------------------------------------------------------- Visium scale


def _hex_grid(mpp: float, n_rows: int = 6, n_cols: int = 12) -> np.ndarray:
    pitch = 100.0 / mpp  # Visium: 100 µm between adjacent centres
    pts = [
        (c * pitch / 2, r * pitch * np.sqrt(3) / 2) for r in range(n_rows) for c in range(n_cols) if (r + c) % 2 == 0
    ]
    return np.asarray(pts) + 40.0


def test_visium_scale_conventions(caplog):
    xy = _hex_grid(mpp=0.5)  # 200 px pitch
    assert visium_microns_per_pixel(130.0, xy) == pytest.approx(0.5)  # Space Ranger: 65 µm reference
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        assert visium_microns_per_pixel(110.0, xy) == pytest.approx(0.5)  # a file following the 55 µm convention
    assert "55 µm" in caplog.text
    assert visium_microns_per_pixel(110.0, xy, reference_um=55.0) == pytest.approx(0.5)
    assert visium_microns_per_pixel(110.0, xy[::3], reference_um=55.0) == pytest.approx(0.5)  # sparse subset
    with pytest.raises(ValueError, match="microns_per_pixel"):
        visium_microns_per_pixel(300.0, xy)
    assert visium_microns_per_pixel(130.0, xy[:1]) == pytest.approx(0.5)  # one spot: nothing to check


# ----------------------------------------------------------------------------- read_hest


def _write_tiff(path: Path, image: np.ndarray, *, pyramid: bool = False) -> None:
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(128, 128), photometric="rgb", subifds=1 if pyramid else 0)
        if pyramid:
            tw.write(image[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)


def _hest_adata(mpp: float, scalefactors: dict | None) -> ad.AnnData:
    xy = _hex_grid(mpp)
    rng = np.random.default_rng(3)
    a = ad.AnnData(X=sp.csr_matrix(rng.poisson(2, size=(len(xy), 5)).astype(np.float32)))
    a.obs_names = [f"bc{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(a.n_vars)]
    a.obsm["spatial"] = xy
    if scalefactors is not None:
        a.uns["spatial"] = {
            "ST": {"scalefactors": scalefactors, "images": {"downscaled_fullres": np.zeros((8, 8, 3), np.uint8)}}
        }
    return a


def test_read_hest_tiff_lazy_and_scale_from_scalefactors(tmp_path):
    mpp = 2.0  # 50 px pitch; HEST writes spot_diameter_fullres = 55 / pixel_size
    img = _image(400, 500, seed=4)
    _write_tiff(tmp_path / "wsi.tif", img, pyramid=True)
    _hest_adata(mpp, {"spot_diameter_fullres": 55.0 / mpp, "tissue_downscaled_fullres_scalef": 0.1}).write_h5ad(
        tmp_path / "SPA1.h5ad"
    )

    lazy = open_image(tmp_path / "wsi.tif")
    assert not isinstance(lazy, np.ndarray) and lazy.shape == img.shape  # level 0 of the pyramid
    assert lazy.chunksize == (128, 128, 3)  # the TIFF's tiles: read through its zarr store, not loaded whole
    np.testing.assert_array_equal(np.asarray(lazy[10:20, 30:40]), img[10:20, 30:40])

    sdata = hx.io.read_hest(tmp_path / "SPA1.h5ad", tmp_path / "wsi.tif")
    info = get_sample_info(sdata)
    assert info.sample_id == "SPA1" and info.spot_diameter_um == 55.0
    assert info.microns_per_pixel == pytest.approx(mpp)
    _check_contract(sdata, img)
    uns_spatial = sdata.tables["table"].uns["spatial"]["ST"]
    assert uns_spatial["scalefactors"]["spot_diameter_fullres"] == pytest.approx(27.5)
    assert uns_spatial["images"]["downscaled_fullres"].shape == (8, 8, 3)  # nothing the file had is lost

    sdata = hx.io.read_hest(tmp_path / "SPA1.h5ad", img, microns_per_pixel=1.9, spot_diameter_um=60.0, sample_id="x")
    info = get_sample_info(sdata)
    assert (info.microns_per_pixel, info.spot_diameter_um, info.sample_id) == (1.9, 60.0, "x")


def test_read_hest_needs_a_scale(tmp_path):
    img = _image(400, 500)
    _hest_adata(2.0, None).write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(ValueError, match="microns_per_pixel"):
        hx.io.read_hest(tmp_path / "a.h5ad", img)
    _hest_adata(2.0, {"spot_diameter_fullres": 300.0}).write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ValueError, match="Visium spot pitch"):  # absurd for a 50 px pitch
        hx.io.read_hest(tmp_path / "b.h5ad", img)
    with pytest.raises(FileNotFoundError):
        hx.io.read_hest(tmp_path / "missing.h5ad", img)


# ----------------------------------------------------------------------------- zarr


def test_zarr_round_trip(tmp_path):
    adata, img = _adata(), _image()
    sdata = hx.io.from_anndata(adata, img, microns_per_pixel=0.5, spot_diameter_um=10.0, sample_id="z1")
    store = tmp_path / "z1.zarr"
    hx.io.write_zarr(sdata, store)
    back = hx.io.read_zarr(store)
    assert get_sample_info(back) == get_sample_info(sdata)
    _check_contract(back, img)
    np.testing.assert_array_equal(back.tables["table"].X.toarray(), adata.X.toarray())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hx.io.write_zarr(sdata, store)
    other = hx.io.from_anndata(adata, img, microns_per_pixel=0.25, spot_diameter_um=10.0, sample_id="z1")
    hx.io.write_zarr(other, store, overwrite=True)
    assert get_sample_info(hx.io.read_zarr(store)).microns_per_pixel == 0.25


def test_read_zarr_refuses_a_store_without_sample_info(tmp_path):
    sdata = hx.io.from_anndata(_adata(), _image(), microns_per_pixel=0.5, spot_diameter_um=10.0)
    del sdata.tables["table"].uns["hespotex_sample"]
    sdata.write(tmp_path / "plain.zarr")
    with pytest.raises(ValueError, match="not a hespotex sample"):
        hx.io.read_zarr(tmp_path / "plain.zarr")
    assert "sample_spots" in hx.io.read_zarr(tmp_path / "plain.zarr", validate=False).shapes
    with pytest.raises(FileNotFoundError):
        hx.io.read_zarr(tmp_path / "nothing.zarr")


# ----------------------------------------------------------------------------- read_visium (10x fixture)


def _tissue_positions(folder: Path) -> pd.DataFrame:
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    pos.columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    return pos


@pytest.mark.realdata
def test_read_visium_fixture(shared_data):
    from spatialdata.transformations import Scale, get_transformation

    folder = shared_data / "visium_outs_fixture"
    sdata = hx.io.read_visium(folder)
    info = get_sample_info(sdata)
    cs = "visium_outs_fixture"  # default dataset id: the folder name
    assert (info.coordinate_system, info.shapes_key, info.image_key) == (cs, cs, f"{cs}_hires_image")
    assert info.spot_diameter_um == 55.0
    table = sdata.tables["table"]
    # obsm["spatial"] is (x = column, y = row) in full-res px, as the positions file says, and the shapes agree
    pos = _tissue_positions(folder).loc[table.obs_names]
    np.testing.assert_array_equal(
        table.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    )
    np.testing.assert_allclose(_centroids(sdata), table.obsm["spatial"])
    # scale from the file (65 µm per spot_diameter_fullres), agreeing with the 100 µm pitch of the array
    scalef = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    assert info.microns_per_pixel == pytest.approx(65.0 / scalef["spot_diameter_fullres"])
    a = np.column_stack([pos["array_col"], pos["array_row"], np.ones(len(pos))])
    coef, *_ = np.linalg.lstsq(a, pos["pxl_col_in_fullres"].to_numpy(float), rcond=None)
    px_per_um = coef[0] / 50.0  # adjacent spots in a row: 2 array columns, 100 µm
    assert info.microns_per_pixel == pytest.approx(1.0 / px_per_um, rel=0.01)
    # the hires image is RGB uint8 (its alpha dropped) and maps to full-res px by a scale
    pix = _level0(sdata.images[info.image_key])
    assert pix.shape == (3, 2000, 2000) and pix.dtype == np.uint8
    tr = get_transformation(sdata.images[info.image_key], to_coordinate_system=cs)
    assert isinstance(tr, Scale)
    np.testing.assert_allclose(tr.scale, 1.0 / scalef["tissue_hires_scalef"])
    assert table.X.dtype == np.float32 and is_integer_valued(table.X)
    assert table.uns["spatial"][cs]["scalefactors"]["tissue_hires_scalef"] == scalef["tissue_hires_scalef"]


@pytest.mark.realdata
def test_read_visium_fullres_image_and_in_tissue(shared_data, tmp_path):
    """A copy of the fixture shrunk 8x, with a full-resolution PNG and 10 spots marked outside the tissue."""
    from PIL import Image

    src = shared_data / "visium_outs_fixture"
    outs = tmp_path / "mysample" / "outs"
    (outs / "spatial").mkdir(parents=True)
    shutil.copy(src / "filtered_feature_bc_matrix.h5", outs)
    pos = _tissue_positions(src)
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] = (pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] // 8).astype(
        int
    )
    outside = pos.index[:10]
    pos.loc[outside, "in_tissue"] = 0
    pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False)
    scalef = json.loads((src / "spatial" / "scalefactors_json.json").read_text())
    scalef = {k: v * 8 if k.endswith("scalef") else v / 8 for k, v in scalef.items()}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalef))
    side = int(pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy().max()) + 50
    img = _image(side, side, seed=5)
    Image.fromarray(img).save(tmp_path / "fullres.png")

    sdata = hx.io.read_visium(outs, fullres_image=tmp_path / "fullres.png")
    info = get_sample_info(sdata)
    assert info.coordinate_system == "mysample" and info.image_key == "mysample_full_image"
    assert info.microns_per_pixel == pytest.approx(65.0 / scalef["spot_diameter_fullres"])
    table = sdata.tables["table"]
    assert table.n_obs == 90 and not set(outside) & set(table.obs_names)
    assert len(sdata.shapes["mysample"]) == 90
    _check_contract(sdata, img)

    with pytest.raises(FileNotFoundError, match="full-resolution image"):
        hx.io.read_visium(outs, fullres_image=tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="counts_file"):
        hx.io.read_visium(outs, counts_file="raw_feature_bc_matrix.h5")
    with pytest.raises(FileNotFoundError):
        hx.io.read_visium(tmp_path / "missing")


# ----------------------------------------------------------------------------- embedded mouse brain crop


def test_mouse_brain_crop():
    from importlib.resources import files

    from PIL import Image

    data = files("hespotex.datasets") / "data"
    assert "BSD 3-Clause" in (data / "NOTICE").read_text()
    sdata = hx.datasets.mouse_brain_crop()
    info = get_sample_info(sdata)
    table = sdata.tables["table"]
    assert table.shape == (49, 1999)
    assert not is_integer_valued(table.X) and "log1p" in table.uns  # log-normalised, marked for scanpy
    raw = ad.read_h5ad(data / "test_data.h5ad")
    d = raw.uns["spatial"]["V1_Adult_Mouse_Brain"]["scalefactors"]["spot_diameter_fullres"]
    assert info.microns_per_pixel == pytest.approx(65.0 / d) and info.spot_diameter_um == 55.0
    # adjacent spot centres are 100 µm apart at this scale
    from scipy.spatial import cKDTree

    xy = spot_centres(sdata)
    nn = cKDTree(xy).query(xy, k=2)[0][:, 1]
    assert nn.min() * info.microns_per_pixel == pytest.approx(100.0, rel=0.02)
    np.testing.assert_array_equal(xy, raw.obsm["spatial"])
    jpeg = np.asarray(Image.open(data / "test_img.jpg"))
    assert jpeg.shape == (1717, 950, 3)
    _check_contract(sdata, jpeg)
    np.testing.assert_allclose(table.X.toarray(), raw.X.toarray(), rtol=1e-6)


def test_build_sample_refuses_nan_centres_and_reserved_columns():
    import numpy as np
    import pandas as pd

    from hespotex.io import build_sample

    obs = pd.DataFrame(index=["a", "b"])
    var = pd.DataFrame(index=["g"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        build_sample(
            None,
            np.array([[1.0, 2.0], [np.nan, 3.0]]),
            np.ones((2, 1)),
            obs=obs,
            var=var,
            sample_id="S",
            microns_per_pixel=1.0,
            spot_diameter_um=55.0,
        )
    with pytest.raises(ValueError, match="rename them first"):
        build_sample(
            None,
            np.ones((2, 2)),
            np.ones((2, 1)),
            obs=obs.assign(region=["x", "y"]),
            var=var,
            sample_id="S",
            microns_per_pixel=1.0,
            spot_diameter_um=55.0,
        )
