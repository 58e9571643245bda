"""Visium HD: reading Space Ranger's binned outputs, training and predicting at 8 µm bins, consistency, views.

The fixture is written by the tests themselves: :func:`hespotex.datasets.synthetic_visium_hd` lays a
synthetic tissue (expression a known function of its H&E image) on 8 µm bins and writes the files
Space Ranger writes (``binned_outputs/square_008um`` and ``square_016um`` with the 10x HDF5 matrix,
``tissue_positions.parquet`` and scale factors, hires/lowres PNGs, a pyramidal full-resolution
OME-TIFF). Everything read back is checked against files read independently (pandas, h5py, tifffile).
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hespotex as hx

pytestmark = pytest.mark.usefixtures("single_threaded")

N_BINS = 2000
N_GENES = 30
MPP = 1.0
ENCODER, INPUT_SIZE = "efficientnet_lite0.imagenet", 32


def _positions(folder, bin_size):
    return pd.read_parquet(
        folder / "binned_outputs" / f"square_{bin_size:03d}um" / "spatial" / "tissue_positions.parquet"
    )


def _h5_counts(folder, bin_size):
    """The count matrix read with h5py alone (10x layout: CSC of genes x barcodes = CSR of barcodes x genes)."""
    import h5py

    with h5py.File(folder / "binned_outputs" / f"square_{bin_size:03d}um" / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        n_genes, n_bins = m["shape"][:]
        x = sp.csr_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_bins, n_genes))
        barcodes = m["barcodes"][:].astype(str)
        genes = m["features"]["name"][:].astype(str)
    return x, barcodes, genes


def _level0(element):
    from spatialdata import get_pyramid_levels
    from xarray import DataArray

    return element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two serial sections (same image -> expression law, different tissue) in Space Ranger's Visium HD layout."""
    root = tmp_path_factory.mktemp("visium_hd")
    out = {}
    for name, seed in (("hd_a", 1), ("hd_b", 2)):
        truth = hx.datasets.synthetic_visium_hd(
            root / name / "outs", N_BINS, N_GENES, seed=seed, program_seed=0, microns_per_pixel=MPP, depth=400.0
        )
        out[name] = (root / name / "outs", truth)
    return out


@pytest.fixture(scope="module")
def trained(folders):
    """A small model trained on section A's 8 µm bins; section B read, embedded and predicted in memory."""
    from hespotex.models import ModelConfig

    a = hx.io.read_visium_hd(folders["hd_a"][0], bin_size=8)
    b = hx.io.read_visium_hd(folders["hd_b"][0], bin_size=8)
    for s in (a, b):
        hx.pp.embed(s, encoder=ENCODER, input_size=INPUT_SIZE)
    small = {"ae_epochs": 20, "ae_hidden_dim": 64, "latent_dim": 16, "projection_hidden_dim": 64, "head_hidden_dim": 64}
    config = ModelConfig.preset("hespotex", epochs=40, lr=3e-3, patience=None, decoder_neighbors=8, **small)
    genes = list(a.tables["table"].var_names)
    model = hx.tl.train(a, genes=genes, config=config, seed=0, device="cpu", validation=None)
    hx.tl.predict(a, model, device="cpu")
    hx.tl.predict(b, model, device="cpu")
    return {"a": a, "b": b, "model": model}


# ---------------------------------------------------------------------------------------------- reading


def test_read_8um_matches_the_files(folders):
    folder, truth = folders["hd_a"]
    sdata = hx.io.read_visium_hd(folder, bin_size=8)
    table = sdata.tables["table"]
    from hespotex._sample import get_sample_info

    info = get_sample_info(sdata)
    assert info.spot_shape == "square"
    assert info.spot_diameter_um == 8.0
    assert info.microns_per_pixel == pytest.approx(MPP)
    assert info.image_key == "hd_a_full_image"  # dataset id: the folder above `outs`
    # positions: obsm["spatial"] is (pxl_col_in_fullres, pxl_row_in_fullres) of the parquet, matched by barcode
    pos = _positions(folder, 8).set_index("barcode").loc[table.obs_names]
    np.testing.assert_allclose(table.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    # ... and they are the synthetic tissue's bin centres (same grid cell -> same centre)
    t = truth.tables["table"]
    key = pd.Index(
        [
            f"{r}_{c}"
            for r, c in zip(
                t.obs["array_row"] - t.obs["array_row"].min(),
                t.obs["array_col"] - t.obs["array_col"].min(),
                strict=True,
            )
        ]
    )
    order = key.get_indexer([f"{r}_{c}" for r, c in zip(table.obs["array_row"], table.obs["array_col"], strict=True)])
    assert (order >= 0).all() and table.n_obs == t.n_obs == N_BINS
    np.testing.assert_allclose(table.obsm["spatial"], t.obsm["spatial"][order], atol=1e-6)
    # counts: the h5 file read with h5py, and the synthetic truth
    x, barcodes, genes = _h5_counts(folder, 8)
    idx = pd.Index(barcodes).get_indexer(table.obs_names)
    assert list(table.var_names) == list(genes)
    assert abs(table.X - x[idx].astype(np.float32)).max() == 0
    assert abs(table.X - sp.csr_matrix(t.X)[order]).max() == 0
    # the squares: side bin_size / mpp pixels, centred on the bin centres
    shapes = sdata.shapes[info.shapes_key]
    bounds = shapes.geometry.bounds.to_numpy()
    np.testing.assert_allclose(bounds[:, 2] - bounds[:, 0], 8.0 / MPP)
    np.testing.assert_allclose(bounds[:, 3] - bounds[:, 1], 8.0 / MPP)
    cx = shapes.geometry.centroid.x.to_numpy()[table.obs["spot_id"].to_numpy()]
    np.testing.assert_allclose(cx, table.obsm["spatial"][:, 0])
    assert (table.obs["region"] == info.shapes_key).all()
    # the image frame: pixels under the bin centres are the fixture's full-resolution pixels (tifffile)
    import tifffile

    tif = tifffile.imread(folder / "microscope_image" / "tissue.ome.tif")
    level0 = _level0(sdata.images[info.image_key])
    xy = np.floor(table.obsm["spatial"][:50]).astype(int)
    full = np.asarray(level0.data)  # the fixture's image is small: read it once
    sample_px = full[:, xy[:, 1], xy[:, 0]].T
    np.testing.assert_array_equal(sample_px, tif[xy[:, 1], xy[:, 0]])
    truth_img = _level0(truth.images[t.uns["hespotex_sample"]["image_key"]])
    np.testing.assert_array_equal(sample_px, np.asarray(truth_img.data)[:, xy[:, 1], xy[:, 0]].T)
    assert table.uns["hespotex_io"]["bin_size_um"] == 8


def test_read_16um_sums_the_8um_bins(folders):
    folder, _ = folders["hd_a"]
    s8 = hx.io.read_visium_hd(folder, bin_size=8).tables["table"]
    sdata = hx.io.read_visium_hd(folder, bin_size=16)
    t16 = sdata.tables["table"]
    from hespotex._sample import get_sample_info

    info = get_sample_info(sdata)
    assert (info.spot_diameter_um, info.spot_shape) == (16.0, "square")
    bounds = sdata.shapes[info.shapes_key].geometry.bounds.to_numpy()
    np.testing.assert_allclose(bounds[:, 2] - bounds[:, 0], 16.0 / MPP)
    # every 16 µm bin holds the counts of the 8 µm bins in its 2 x 2 block, and sits at their mean centre
    parent = pd.Index([f"{r // 2}_{c // 2}" for r, c in zip(s8.obs["array_row"], s8.obs["array_col"], strict=True)])
    own = pd.Index([f"{r}_{c}" for r, c in zip(t16.obs["array_row"], t16.obs["array_col"], strict=True)])
    assign = own.get_indexer(parent)
    assert (assign >= 0).all()
    agg = sp.csr_matrix((np.ones(s8.n_obs), (assign, np.arange(s8.n_obs))), shape=(t16.n_obs, s8.n_obs))
    assert abs(agg @ s8.X - t16.X).max() == 0
    full = np.bincount(assign, minlength=t16.n_obs) == 4
    assert full.sum() > 0.5 * t16.n_obs
    mean_xy = (agg @ s8.obsm["spatial"]) / np.bincount(assign, minlength=t16.n_obs)[:, None]
    np.testing.assert_allclose(t16.obsm["spatial"][full], mean_xy[full], atol=1e-6)


def test_read_without_fullres_uses_the_hires_image(folders, tmp_path):
    folder, truth = folders["hd_a"]
    copy_dir = tmp_path / "outs"
    shutil.copytree(folder, copy_dir, ignore=shutil.ignore_patterns("microscope_image"))
    sdata = hx.io.read_visium_hd(copy_dir, bin_size=8, dataset_id="nofull")
    from hespotex._sample import get_sample_info
    from hespotex.io._visium import image_extent

    info = get_sample_info(sdata)
    assert info.image_key == "nofull_hires_image"
    full_h, full_w = truth.tables["table"].uns["synthetic"]["image_shape"]
    h, w = image_extent(sdata.images[info.image_key], "nofull")
    assert abs(h - full_h) <= 2 and abs(w - full_w) <= 2  # the hires PNG mapped back onto full-res pixels
    # patches cut from the hires image look like the full-resolution ones (same place, lower resolution)
    full = hx.io.read_visium_hd(folder, bin_size=8)
    a = hx.pp.extract_patches(full, size=16, spots=np.arange(20)).astype(float)
    b = hx.pp.extract_patches(sdata, size=16, spots=np.arange(20)).astype(float)
    far = hx.pp.extract_patches(sdata, size=16, spots=np.arange(1000, 1020)).astype(float)
    assert np.abs(a - b).mean() < np.abs(a - far).mean()


def test_read_bad_input(folders, tmp_path):
    folder, _ = folders["hd_a"]
    with pytest.raises(ValueError, match=r"one of the bin sizes .*\[8, 16\].*found 2"):
        hx.io.read_visium_hd(folder, bin_size=2)
    with pytest.raises(FileNotFoundError, match="Visium HD"):
        hx.io.read_visium_hd(tmp_path / "missing", bin_size=8)
    # scale factors that disagree with the positions: a wrong microns_per_pixel (consistent with the bin size)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    sf_file = bad / "binned_outputs" / "square_008um" / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_file.read_text())
    sf["microns_per_pixel"] = 0.25
    sf["spot_diameter_fullres"] = 8.0 / 0.25
    sf_file.write_text(json.dumps(sf))
    with pytest.raises(ValueError, match=r"bins are 8\.00 px apart.*expected 8 µm"):
        hx.io.read_visium_hd(bad, bin_size=8)


# ---------------------------------------------------------------------------------------------- model


def test_train_and_predict_on_8um_bins(trained, folders):
    b = trained["b"]
    pred = b.tables["table"]
    assert "hespotex" in pred.layers and pred.layers["hespotex"].shape == (N_BINS, N_GENES)
    assert pred.obsm["X_hespotex"].shape[0] == N_BINS
    params = pred.uns["hespotex"]["params"]
    assert params["patch_um"] == pytest.approx(
        8.0
    )  # the bin side, as the spot diameter for any spot (default_patch_um)
    # the held-out section B: image-driven genes are predicted, genes without image signal are not
    from hespotex.pp._normalize import log_expression

    measured = log_expression(pred, list(pred.var_names))
    p = np.asarray(pred.layers["hespotex"])
    r = np.array([np.corrcoef(p[:, i], measured[:, i])[0, 1] for i in range(N_GENES)])
    driven = folders["hd_b"][1].tables["table"].var["image_driven"].to_numpy()
    assert np.nanmean(r[driven]) > np.nanmean(r[~driven])
    assert np.nanmean(r[driven]) > 0.3
    # against the same predictions on shuffled bins (no spatial match): chance level
    shuffled = p[np.random.default_rng(0).permutation(N_BINS)]
    r0 = np.array([np.corrcoef(shuffled[:, i], measured[:, i])[0, 1] for i in range(N_GENES)])
    assert abs(np.nanmean(r0)) < 0.05


def test_streamed_prediction_matches_in_memory(trained, tmp_path, monkeypatch):
    from spatialdata import read_zarr

    from hespotex.pp import _encode as _embed  # the encoder loop (hx.pp.embed and the stream)

    b = copy.deepcopy(trained["b"])
    reference = np.asarray(b.tables["table"].layers["hespotex"])
    del b.tables["table"].obsm["X_hespotex_image"]  # the stream embeds the patches itself
    out = tmp_path / "pred.zarr"
    batches, real_encode = [], _embed.encode_patches

    def encode(plan, encoder, **kwargs):
        batches.append(kwargs["batch_size"])
        return real_encode(plan, encoder, **kwargs)

    monkeypatch.setattr(_embed, "encode_patches", encode)
    table = hx.tl.predict(b, trained["model"], device="cpu", out=out, chunk_size=700)
    # the stream embedded its 32 px patches in batches of 256 (the in-memory reference: hx.pp.embed's 64)
    assert batches and set(batches) == {256}
    np.testing.assert_allclose(np.asarray(table.layers["hespotex"]), reference, rtol=1e-4, atol=1e-4)
    back = read_zarr(out)
    from hespotex._sample import get_sample_info

    info = get_sample_info(back.tables["hespotex"])
    assert info.spot_shape == "square" and info.spot_diameter_um == 8.0
    squares = back.shapes[info.shapes_key].geometry
    assert (squares.geom_type == "Polygon").all()
    np.testing.assert_allclose(squares.area.to_numpy(), (8.0 / MPP) ** 2)
    np.testing.assert_allclose(np.asarray(back.tables["hespotex"].layers["hespotex"]), reference, rtol=1e-4, atol=1e-4)


def test_consistency_of_two_sections(trained):
    df = hx.tl.consistency(
        {"a": trained["a"], "b": trained["b"]}, truth="X", statistics=("mean", "morans_i"), n_neighbors=8
    )
    assert set(df.statistic) == {"mean", "morans_i"}
    row = df[df.statistic == "mean"].iloc[0]
    assert row.predicted > 0.9 and row.measured > 0.9  # same law, same genes high: both agree
    per = df.attrs["per_section"]
    mi = per[(per.statistic == "morans_i") & (per.section == "b")]
    # the expression of 8 µm bins is spatially smooth (tissue domains span many bins): Moran's I on the
    # bins' 8-neighbour graph is clearly positive for the predictions and the measurements alike
    assert mi.predicted.mean() > 0.3 and mi.measured.mean() > 0.05
    assert df.attrs["params"]["graphs"]["b"].startswith("8-nearest")


# ---------------------------------------------------------------------------------------------- views


def test_spatial_view_draws_squares(trained):
    b = trained["b"]
    genes = list(b.tables["table"].var_names[:2])
    col = hx.pl.spatial(b, genes)
    view = col.view
    assert view.marker == "square" and not view.rasterized
    assert view.diameter == pytest.approx(8.0 / MPP)
    pts = view.points(genes[0])
    from holoviews import Store

    opts = Store.lookup_options("bokeh", pts, "style").kwargs
    assert opts["marker"] == "square"
    # the view state follows the gene selector
    col.state.gene = genes[1]
    assert view.frame(genes[1])["predicted"].to_numpy() == pytest.approx(
        np.asarray(b.tables["table"][:, genes[1]].layers["hespotex"]).ravel()
    )
    # above the threshold the bins are rasterised with datashader
    assert hx.pl.spatial(b, genes, threshold=1000).view.rasterized


def test_explorer_selects_a_bin(trained):
    b = trained["b"]
    app = hx.pl.explorer(b)
    table = b.tables["table"]
    x, y = table.obsm["spatial"][123]
    assert app.select(x + 3.0, y - 3.0) == table.obs_names[123]  # inside the 8 px square
    assert app.state.spot == table.obs_names[123]
    assert app.view.marker == "square"


def test_writer_replaces_only_its_own_folder(tmp_path):
    """`write_visium_hd(overwrite=True)` replaces a folder it wrote (marker), never a user's folder."""
    from hespotex import _ownership

    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.docx").write_text("mine")
    kw = {"n_bins": 64, "n_genes": 5, "seed": 0}
    with pytest.raises(FileExistsError, match=r"hespotex did not write.*thesis\.docx"):
        hx.datasets.synthetic_visium_hd(user, overwrite=True, **kw)
    assert (user / "thesis.docx").read_text() == "mine"
    out = tmp_path / "hd"
    hx.datasets.synthetic_visium_hd(out, **kw)
    assert _ownership.owned(out, "dataset")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hx.datasets.synthetic_visium_hd(out, **kw)
    hx.datasets.synthetic_visium_hd(out, overwrite=True, **kw)
    assert hx.io.read_visium_hd(out, bin_size=8).tables["table"].n_obs == 64
    # bad input with overwrite=True: refused before anything is touched, the earlier folder intact
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ValueError, match="multiples of 8"):
        hx.datasets.synthetic_visium_hd(out, overwrite=True, bin_sizes=(12,), **kw)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
