"""AnnData in the scanpy / squidpy Visium convention (and HEST's) through hx.io.from_scanpy, hx.pp.embed and
hx.tl.predict.

The Space Ranger fixture's hires PNG is blank, so a copy of the ``outs`` folder gets real tissue: a her2st H&E
resized to the full-resolution frame (positions and spot diameter divided by ``SHRINK`` so that frame stays small),
its hires and lowres copies written as Space Ranger writes them. ``sc.read_visium`` and ``hx.io.read_visium`` then
read the same files, so the same spots must get the same pixels.
"""

from __future__ import annotations

import json
import logging
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import hespotex as hx
from hespotex._sample import get_sample_info, get_table
from hespotex.pp._patches import plan_patches

pytestmark = [pytest.mark.realdata, pytest.mark.usefixtures("single_threaded")]

SHRINK = 4  # full-resolution frame 3,333 px instead of 13,332
EMB = "X_hespotex_image"


@pytest.fixture(scope="module")
def outs(tmp_path_factory, shared_data):
    from PIL import Image

    src = shared_data / "visium_outs_fixture"
    dst = tmp_path_factory.mktemp("visium") / "outs"
    (dst / "spatial").mkdir(parents=True)
    shutil.copy(src / "filtered_feature_bc_matrix.h5", dst)
    pos = pd.read_csv(src / "spatial" / "tissue_positions_list.csv", header=None)
    pos[[4, 5]] = (pos[[4, 5]] / SHRINK).round().astype(int)
    pos.to_csv(dst / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    sf = json.loads((src / "spatial" / "scalefactors_json.json").read_text())
    for k in ("spot_diameter_fullres", "fiducial_diameter_fullres"):
        sf[k] /= SHRINK
    for k in ("tissue_hires_scalef", "tissue_lowres_scalef"):
        sf[k] *= SHRINK
    (dst / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    side = round(2000 / sf["tissue_hires_scalef"])
    tissue = Image.open(shared_data / "her2st" / "images" / "C2.jpg").convert("RGB").resize((side, side))
    tissue.save(dst / "fullres.png")
    tissue.resize((2000, 2000), Image.LANCZOS).save(dst / "spatial" / "tissue_hires_image.png")
    tissue.resize((round(side * sf["tissue_lowres_scalef"]),) * 2, Image.LANCZOS).save(
        dst / "spatial" / "tissue_lowres_image.png"
    )
    return dst


def _read_scanpy(outs):
    import scanpy as sc

    return sc.read_visium(outs)


def _shared(adata, table):
    """Positions in ``table`` of ``adata``'s spots (by barcode); -1 where absent."""
    return pd.Index(table.obs_names).get_indexer(adata.obs_names)


@pytest.fixture(scope="module")
def reference(outs):
    """The same outs through hx.io.read_visium, embedded at hires and at full resolution."""
    hires = hx.io.read_visium(outs, dataset_id="custom")
    full = hx.io.read_visium(outs, dataset_id="custom", fullres_image=outs / "fullres.png")
    for sdata in (hires, full):
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=64)
    return {"hires": hires, "full": full}


def test_from_scanpy_picks_hires_maps_coordinates_and_warns(outs, reference, caplog):
    adata = _read_scanpy(outs)
    before = adata.copy()
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        sample = hx.io.from_scanpy(adata)
    assert "downscaled 'hires' image" in caplog.text and "`image=`" in caplog.text
    info = get_sample_info(sample)
    assert info.image_key == "custom_hires_image" and info.spot_diameter_um == 55.0
    ref_info = get_sample_info(reference["hires"])
    assert info.microns_per_pixel == pytest.approx(ref_info.microns_per_pixel)
    np.testing.assert_array_equal(get_table(sample).obsm["spatial"], adata.obsm["spatial"])  # full-res frame kept
    # the patches of the same spots are the same pixels as read_visium's hires element
    ref_table = get_table(reference["hires"])
    idx = _shared(adata, ref_table)
    assert (idx >= 0).sum() >= 50
    mine, ref = (
        plan_patches(sample, patch_um=55.0, out_px=64),
        plan_patches(reference["hires"], patch_um=55.0, out_px=64),
    )
    spots = np.flatnonzero(idx >= 0)[[0, 7, 21, 40]]
    a, b = mine.read(spots), ref.read(idx[spots])
    np.testing.assert_array_equal(a, b)
    assert a.std() > 10  # real tissue, not blank
    assert not np.array_equal(a[0], a[1])  # different spots, different pixels
    # the AnnData passed is untouched, and the sample keeps its uns images
    assert set(adata.uns["spatial"]["custom"]["images"]) == {"hires", "lowres"}
    assert adata.obsm.keys() == before.obsm.keys() and "hespotex_sample" not in adata.uns
    assert set(get_table(sample).uns["spatial"]["custom"]["images"]) == {"hires", "lowres"}


def test_embed_anndata_equals_read_visium_at_same_level_and_close_at_full_res(outs, reference):
    ref_table = get_table(reference["hires"])
    adata = _read_scanpy(outs)
    hx.pp.embed(adata, encoder="efficientnet_lite0.imagenet", input_size=64)
    # written to the AnnData passed, as the docstring lists
    assert adata.obsm[EMB].shape == (adata.n_obs, 1280) and EMB in adata.uns["hespotex_embed"]
    idx = _shared(adata, ref_table)
    ok = idx >= 0
    # same pixels: equal up to float32 rounding (channels-last kernels round by batch composition, ~1e-5 relative;
    # other pixels would differ by ~0.1)
    np.testing.assert_allclose(adata.obsm[EMB][ok], ref_table.obsm[EMB][idx[ok]], rtol=1e-4, atol=1e-5)
    assert np.ptp(adata.obsm[EMB][ok], axis=0).max() > 0.1  # spots differ

    full = _read_scanpy(outs)
    hx.pp.embed(full, image=outs / "fullres.png", encoder="efficientnet_lite0.imagenet", input_size=64)
    full_ref = get_table(reference["full"]).obsm[EMB]
    np.testing.assert_allclose(full.obsm[EMB][ok], full_ref[idx[ok]], rtol=1e-4, atol=1e-5)
    assert full.uns["hespotex_embed"][EMB]["image_key"] == "custom_image"  # the argument won over hires
    # hires and full resolution: the same spot is closer than another spot
    h, f = adata.obsm[EMB][ok], full.obsm[EMB][ok]
    matched = np.linalg.norm(h - f, axis=1).mean()
    shuffled = np.linalg.norm(h - np.roll(f, 7, axis=0), axis=1).mean()
    assert matched < 0.7 * shuffled


def test_full_res_image_frame_is_checked(outs):
    from PIL import Image

    adata = _read_scanpy(outs)
    half = np.asarray(Image.open(outs / "fullres.png"))[::2, ::2]
    with pytest.raises(ValueError, match="implies a full-resolution image of about 3333 x 3333"):
        hx.io.from_scanpy(adata, image=half)
    sample = hx.io.from_scanpy(adata, image=outs / "fullres.png")
    info = get_sample_info(sample)
    assert info.image_key == "custom_image" and sample.images["custom_image"]["scale0"]["image"].shape == (
        3,
        3333,
        3333,
    )


def test_predict_scanpy_anndata_equals_spatialdata_path(outs, reference, trained_synthetic):
    model = trained_synthetic["model"]
    ref = hx.io.read_visium(outs, dataset_id="custom")
    expected = hx.tl.predict(ref, model, device="cpu")
    adata = _read_scanpy(outs)
    got = hx.tl.predict(adata, model, device="cpu")  # other genes: a new table, as for a SpatialData
    idx = _shared(adata, get_table(ref))
    ok = idx >= 0
    np.testing.assert_allclose(got.layers["hespotex"][ok], expected.layers["hespotex"][idx[ok]], rtol=1e-4, atol=1e-5)
    assert EMB in adata.obsm and EMB in adata.uns["hespotex_embed"]  # the embeddings made on the fly are kept

    # an AnnData whose genes are the model's holds the predictions itself and is returned
    same = ad.AnnData(
        X=np.zeros((adata.n_obs, len(model.genes)), np.float32),
        obs=pd.DataFrame(index=adata.obs_names),
        var=pd.DataFrame(index=model.genes),
        obsm={"spatial": adata.obsm["spatial"]},
        uns={"spatial": adata.uns["spatial"]},
    )
    out = hx.tl.predict(same, model, device="cpu")
    assert out is same
    np.testing.assert_allclose(same.layers["hespotex"], got.layers["hespotex"], rtol=1e-5, atol=1e-6)
    assert {"X_hespotex", EMB} <= set(same.obsm) and "params" in same.uns["hespotex"]
    with pytest.raises(ValueError, match="overwrite=True"):  # the guard sees what the AnnData holds
        hx.tl.predict(same, model, device="cpu")

    # (d) an AnnData carrying embeddings and no image: used as is
    carried = adata.copy()
    del carried.uns["spatial"]
    again = hx.tl.predict(carried, model, device="cpu", overwrite=True)  # the copy holds the first predictions
    np.testing.assert_allclose(again.layers["hespotex"], got.layers["hespotex"], rtol=1e-5, atol=1e-6)


def test_no_image_error_names_three_ways(outs, trained_synthetic):
    adata = _read_scanpy(outs)
    del adata.uns["spatial"]
    for call in (lambda: hx.tl.predict(adata, trained_synthetic["model"], device="cpu"), lambda: hx.pp.embed(adata)):
        with pytest.raises(ValueError, match="no H&E image") as err:
            call()
        text = str(err.value)
        assert "`image=`" in text and "uns['spatial']" in text and "hx.pp.embed" in text
    assert EMB not in adata.obsm


def test_image_arguments_refused_for_spatialdata(reference):
    with pytest.raises(ValueError, match="apply to an AnnData"):
        hx.pp.embed(reference["hires"], image=np.zeros((8, 8, 3), np.uint8))


# ----------------------------------------------------------------------------- her2st packed as scanpy would


@pytest.fixture(scope="module")
def her2st_c2(shared_data):
    return hx.datasets.her2st(shared_data / "her2st", sections=["C2"])["C2"]


def _as_scanpy(sdata, image_path, *, hires_side=2000):
    """The section as scanpy's convention holds it: hires/lowres float copies in uns['spatial'], centres in full-res
    px."""
    from PIL import Image

    table = get_table(sdata)
    info = get_sample_info(sdata)
    img = Image.open(image_path).convert("RGB")
    s = hires_side / max(img.size)
    images, factors = {}, {"spot_diameter_fullres": info.spot_diameter_px}
    for name, scalef in (("hires", s), ("lowres", 0.3 * s)):
        size = (round(img.width * scalef), round(img.height * scalef))
        images[name] = np.asarray(img.resize(size, Image.LANCZOS), dtype=np.float32) / 255.0
        factors[f"tissue_{name}_scalef"] = scalef
    return ad.AnnData(
        X=table.X.copy(),
        obs=pd.DataFrame(index=table.obs_names),
        var=pd.DataFrame(index=table.var_names),
        obsm={"spatial": np.asarray(table.obsm["spatial"]).copy()},
        uns={"spatial": {"C2": {"images": images, "scalefactors": factors}}},
    )


def test_her2st_scanpy_anndata_predicted_end_to_end(her2st_c2, trained_synthetic, caplog, shared_data):
    image_path = shared_data / "her2st" / "images" / "C2.jpg"
    model = trained_synthetic["model"]
    mpp = get_sample_info(her2st_c2).microns_per_pixel
    ref = hx.tl.predict(her2st_c2, model, device="cpu")

    adata = _as_scanpy(her2st_c2, image_path)
    with pytest.raises(ValueError, match=r"square grid .* Pass `microns_per_pixel=`"):  # legacy ST is not Visium
        hx.tl.predict(adata, model, device="cpu")
    assert EMB not in adata.obsm
    got = hx.tl.predict(adata, model, device="cpu", image=image_path, microns_per_pixel=mpp)
    np.testing.assert_allclose(got.layers["hespotex"], ref.layers["hespotex"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adata.obsm[EMB], get_table(her2st_c2).obsm[EMB], atol=1e-5)

    hires = _as_scanpy(her2st_c2, image_path)
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        low = hx.tl.predict(hires, model, device="cpu", microns_per_pixel=mpp)
    assert "downscaled 'hires' image" in caplog.text
    assert np.isfinite(low.layers["hespotex"]).all() and low.n_obs == adata.n_obs
    h, f = hires.obsm[EMB], adata.obsm[EMB]
    assert np.linalg.norm(h - f, axis=1).mean() < np.linalg.norm(h - np.roll(f, 11, axis=0), axis=1).mean()


# ----------------------------------------------------------------------------- HEST


def test_hest_anndata_keeps_uns_images_and_predicts(her2st_c2, tmp_path, trained_synthetic, shared_data):
    """A HEST-style h5ad (downscaled_fullres + tissue_downscaled_fullres_scalef, 55 µm convention): read_hest keeps
    its uns images, and the AnnData itself goes through predict (image from uns, or the WSI as `image=`)."""
    from PIL import Image

    image_path = shared_data / "her2st" / "images" / "C2.jpg"
    table = get_table(her2st_c2)
    mpp = get_sample_info(her2st_c2).microns_per_pixel
    img = Image.open(image_path).convert("RGB")
    s = 1000 / max(img.size)
    thumb = np.asarray(img.resize((round(img.width * s), round(img.height * s))))
    hest = ad.AnnData(
        X=table.X.copy(), obs=pd.DataFrame(index=table.obs_names), var=pd.DataFrame(index=table.var_names)
    )
    hest.obsm["spatial"] = np.asarray(table.obsm["spatial"]).copy()
    hest.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": thumb},
            "scalefactors": {"spot_diameter_fullres": 100.0 / mpp, "tissue_downscaled_fullres_scalef": s},
        }
    }
    hest.write_h5ad(tmp_path / "C2.h5ad")

    sdata = hx.io.read_hest(tmp_path / "C2.h5ad", image_path, microns_per_pixel=mpp, spot_diameter_um=100.0)
    kept = get_table(sdata).uns["spatial"]["ST"]
    np.testing.assert_array_equal(kept["images"]["downscaled_fullres"], thumb)
    assert kept["scalefactors"]["tissue_downscaled_fullres_scalef"] == pytest.approx(s)

    read = ad.read_h5ad(tmp_path / "C2.h5ad")
    sample = hx.io.from_scanpy(read, microns_per_pixel=mpp)
    info = get_sample_info(sample)
    assert info.image_key == "ST_downscaled_fullres_image" and info.spot_diameter_um == pytest.approx(100.0)
    out = hx.tl.predict(read, trained_synthetic["model"], device="cpu", image=image_path, microns_per_pixel=mpp)
    ref = hx.tl.predict(sdata, trained_synthetic["model"], device="cpu")
    np.testing.assert_allclose(out.layers["hespotex"], ref.layers["hespotex"], rtol=1e-5, atol=1e-6)


def test_streamed_prediction_of_scanpy_anndata(outs, trained_synthetic, tmp_path):
    model = trained_synthetic["model"]
    memory = hx.tl.predict(_read_scanpy(outs), model, device="cpu")
    adata = _read_scanpy(outs)
    streamed = hx.tl.predict(adata, model, device="cpu", out=tmp_path / "pred.zarr", chunk_size=40)
    np.testing.assert_allclose(np.asarray(streamed.layers["hespotex"]), memory.layers["hespotex"], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "pred.zarr").is_dir() and EMB not in adata.obsm  # streaming leaves the source table as it is


def test_square_grid_tells_legacy_st_from_visium(shared_data):
    from hespotex.io._scanpy import square_grid

    visium = ad.read_h5ad(shared_data / "squidpy_mouse_brain" / "test_data.h5ad").obsm["spatial"].astype(float)
    assert not square_grid(visium)
    theta = np.deg2rad(17.0)  # any rotation of the slide
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    assert not square_grid(visium @ rot.T)
    for section in ("C2", "C4"):
        spots = pd.read_csv(shared_data / "her2st" / "spots" / f"{section}_selection.tsv", sep="\t")
        xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
        assert square_grid(xy) and square_grid(xy @ rot.T)
