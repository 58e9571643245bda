"""Real scanner files (../shared/data/wsi): readers, scale, associated images, damaged files, and tile -> predict.

Pixels are checked against OpenSlide (its own C decoders, read through ``openslide-python``, not
through hespotex or wsidata) and against ``tifffile`` reading the stored page directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
import tifffile

import hespotex as hx
from hespotex.cli import main

pytestmark = [pytest.mark.realdata, pytest.mark.usefixtures("single_threaded")]

TCGA, CMU, BROKEN = "tcga-cr-7395.svs", "cmu-1-small-region.svs", "broken.svs"
CMU_ASSOCIATED = {"thumbnail": (768, 574), "label": (463, 387), "macro": (431, 1280)}  # (height, width)


@pytest.fixture(scope="module")
def wsi_dir():
    from conftest import data_root

    folder = data_root() / "wsi"
    if not (folder / TCGA).is_file():
        pytest.skip(f"real slides not found in {folder} (set HESPOTEX_DATA)")
    return folder


@pytest.fixture
def openslide():
    return pytest.importorskip("openslide", reason="the [wsi] extra (openslide-python, openslide-bin) is not installed")


def _level0(sdata, window=None):
    (key,) = sdata.images
    data = sdata.images[key]["scale0"]["image"].data
    if window is not None:
        (y0, y1), (x0, x1) = window
        data = data[:, y0:y1, x0:x1]
    return np.asarray(data).transpose(1, 2, 0)


def _openslide_region(openslide, path, x, y, w, h, level=0):
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region((x, y), level, (w, h)).convert("RGB"))


def _copy_with_description(src, dst, edit):
    """A writable copy of ``src`` whose first ImageDescription is ``edit(description)`` (the pixels stay the same)."""
    shutil.copyfile(src, dst)
    with tifffile.TiffFile(dst) as tif:
        description = tif.pages.first.description
    tifffile.tiffcomment(dst, edit(description), pageindex=0)
    return dst


# ------------------------------------------------------------------------------------------------ reading
def test_svs_levels_match_openslide_and_tifffile(wsi_dir, openslide):
    """Both real SVS files read with the default reader (tifffile): level 0 equals OpenSlide's pixels, the stored
    2x level equals the stored page; JPEG 2000 (33005) and JPEG tiles decode."""
    tcga = hx.io.read_wsi(wsi_dir / TCGA, microns_per_pixel=0.5)
    slide = tcga.attrs["hespotex_slide"]
    assert slide["reader"] == "tifffile" and slide["stored_pyramid"] and slide["stored_levels"] == 2
    # the file's two levels, then 2 x 2 means of its coarsest one (so tissue detection reads a smaller image)
    assert slide["level_shapes"] == [[3567, 4443], [1783, 2221], [891, 1110]]
    assert slide["associated_images"] == ["thumbnail"] and "objective_magnification" not in slide
    for x, y in ((0, 0), (1700, 1300), (4443 - 300, 3567 - 200)):  # corners and the middle, across tile borders
        w, h = min(300, 4443 - x), min(200, 3567 - y)
        expected = _openslide_region(openslide, wsi_dir / TCGA, x, y, w, h)
        assert np.array_equal(_level0(tcga, ((y, y + h), (x, x + w))), expected), (x, y)
    image = tcga.images["tcga-cr-7395_image"]
    stored1 = tifffile.imread(wsi_dir / TCGA, series=0, level=1)
    assert np.array_equal(np.asarray(image["scale1"]["image"].data).transpose(1, 2, 0), stored1)
    level2 = np.asarray(image["scale2"]["image"].data).transpose(1, 2, 0).astype(float)
    means = stored1[: 891 * 2, : 1110 * 2].reshape(891, 2, 1110, 2, 3).mean(axis=(1, 3))
    assert np.abs(level2 - means).max() <= 0.5 + 1e-6

    cmu = hx.io.read_wsi(wsi_dir / CMU)
    slide = cmu.attrs["hespotex_slide"]
    assert slide["microns_per_pixel"] == pytest.approx(0.499) and slide["microns_per_pixel_source"].startswith("Aperio")
    assert slide["objective_magnification"] == 20.0 and slide["reader"] == "tifffile"
    assert np.array_equal(_level0(cmu), _openslide_region(openslide, wsi_dir / CMU, 0, 0, 2220, 2967))


@pytest.mark.parametrize("reader", ["openslide", "tiffslide"])
def test_wsidata_readers_give_the_same_slide(wsi_dir, reader):
    """reader="openslide" / "tiffslide" (through wsidata): same level 0, same scale, chunks of whole file tiles."""
    pytest.importorskip("wsidata")
    pytest.importorskip(reader)
    for name, mpp, tile in ((TCGA, 0.5, 256), (CMU, None, 240)):
        ours = hx.io.read_wsi(wsi_dir / name, microns_per_pixel=mpp)
        theirs = hx.io.read_wsi(wsi_dir / name, microns_per_pixel=mpp, reader=reader)
        a, b = ours.attrs["hespotex_slide"], theirs.attrs["hespotex_slide"]
        assert b["reader"] == reader and b["level_shapes"] == a["level_shapes"]
        assert b["microns_per_pixel"] == pytest.approx(a["microns_per_pixel"])
        assert sorted(b["associated_images"]) == sorted(a["associated_images"])
        image = theirs.images[b["image_key"]]["scale0"]["image"]
        assert image.data.chunksize[1] % tile == 0 and image.data.chunksize[2] % tile == 0
        assert np.array_equal(_level0(theirs, ((1000, 1600), (900, 1700))), _level0(ours, ((1000, 1600), (900, 1700))))


def test_read_wsi_accepts_a_wsidata_object(wsi_dir):
    """A WSIData a LazySlide user holds: its reader's pixels, its (user-set) mpp, the file name as sample id."""
    wsidata = pytest.importorskip("wsidata")
    wsi = wsidata.open_wsi(wsi_dir / CMU, store=None)
    sdata = hx.io.read_wsi(wsi)
    slide = sdata.attrs["hespotex_slide"]
    assert slide["sample_id"] == "cmu-1-small-region" and slide["reader"] == wsi.reader.name
    assert slide["microns_per_pixel"] == pytest.approx(0.499) and slide["path"] == str((wsi_dir / CMU).resolve())
    assert np.array_equal(_level0(sdata, ((0, 500), (0, 700))), wsi.read_region(0, 0, 700, 500))
    tcga = wsidata.open_wsi(wsi_dir / TCGA, store=None)
    with pytest.raises(ValueError, match="records no microns per pixel"):
        hx.io.read_wsi(tcga)
    tcga.set_mpp(0.5)
    again = hx.io.read_wsi(tcga, sample_id="tcga")
    assert again.attrs["hespotex_slide"]["microns_per_pixel"] == 0.5 and "tcga_image" in again.images


# ------------------------------------------------------------------------------------------------ scale
@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_scale_from_objective_magnification(wsi_dir, tmp_path, caplog, reader):
    """No MPP but AppMag: 10 / magnification µm/px with a warning; the argument still wins; neither: the error."""
    if reader == "openslide":
        pytest.importorskip("wsidata")
        pytest.importorskip("openslide")
    no_mpp = _copy_with_description(wsi_dir / CMU, tmp_path / "cmu20.svs", lambda d: d.replace("|MPP = 0.4990", ""))
    mag40 = _copy_with_description(
        wsi_dir / CMU,
        tmp_path / "cmu40.svs",
        lambda d: d.replace("|MPP = 0.4990", "").replace("AppMag = 20", "AppMag = 40"),
    )
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        caplog.clear()
        slide = hx.io.read_wsi(no_mpp, reader=reader).attrs["hespotex_slide"]
    assert slide["microns_per_pixel"] == pytest.approx(0.5) and slide["objective_magnification"] == 20.0
    assert slide["microns_per_pixel_source"].startswith("objective magnification 20x")
    assert "only a 20x objective" in caplog.text
    assert hx.io.read_wsi(mag40, reader=reader).attrs["hespotex_slide"]["microns_per_pixel"] == pytest.approx(0.25)
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        caplog.clear()
        slide = hx.io.read_wsi(no_mpp, reader=reader, microns_per_pixel=0.45).attrs["hespotex_slide"]
    assert slide["microns_per_pixel"] == 0.45 and slide["microns_per_pixel_source"] == "argument"
    assert "objective" not in caplog.text
    # tcga-cr-7395 records neither: the clear error of before, also through OpenSlide
    with pytest.raises(ValueError, match=r"records no microns per pixel.*objective magnification.*microns_per_pixel="):
        hx.io.read_wsi(wsi_dir / TCGA, reader=reader)


# ------------------------------------------------------------------------------------------------ associated images
def test_associated_images_are_skipped_never_tissue(wsi_dir, openslide):
    """cmu-1-small-region.svs holds a thumbnail, a label and a macro image: none becomes a level, the tissue and
    the tiles lie on the slide itself, and the patches are OpenSlide's level-0 pixels under each tile."""
    from hespotex.pp._patches import plan_patches

    sdata = hx.io.read_wsi(wsi_dir / CMU)
    slide = sdata.attrs["hespotex_slide"]
    assert sorted(slide["associated_images"]) == sorted(CMU_ASSOCIATED)
    assert slide["level_shapes"][0] == [2967, 2220]
    for shape in CMU_ASSOCIATED.values():
        assert list(shape) not in slide["level_shapes"]
    for (h0, w0), (h, w) in zip(slide["level_shapes"], slide["level_shapes"][1:], strict=False):
        assert (h, w) == (h0 // 2, w0 // 2)  # only the slide's own 2 x 2 coarsenings
    tissue = hx.pp.detect_tissue(sdata)
    minx, miny, maxx, maxy = tissue.total_bounds
    assert minx >= 0 and miny >= 0 and maxx <= 2220 and maxy <= 2967
    assert sdata.attrs["hespotex_tissue"]["cmu-1-small-region_tissue"]["fraction"] > 0.2  # a tissue crop
    table = hx.pp.tile(sdata, spot_diameter_um=55.0, spacing_um=100.0)
    assert table.n_obs > 50
    patch_um = 110.0
    size_px = patch_um / 0.499
    plan = plan_patches(sdata, patch_um=patch_um, out_px=int(size_px) + 1)  # asks for full resolution
    assert plan.level.level == 0
    inside = np.flatnonzero(
        (plan.x0 >= 0) & (plan.y0 >= 0) & (plan.x0 + plan.size <= 2220) & (plan.y0 + plan.size <= 2967)
    )
    assert len(inside) > 20
    crops = plan.read(inside[:12])
    for crop, i in zip(crops, inside[:12], strict=True):
        expected = _openslide_region(openslide, wsi_dir / CMU, int(plan.x0[i]), int(plan.y0[i]), plan.size, plan.size)
        assert np.array_equal(crop.transpose(1, 2, 0), expected)


# ------------------------------------------------------------------------------------------------ formats and errors
def test_vendor_suffix_is_read_through_openslide(wsi_dir, tmp_path):
    """reader="auto" sends vendor suffixes to OpenSlide (OpenSlide detects the layout from the content)."""
    pytest.importorskip("wsidata")
    pytest.importorskip("openslide")
    renamed = tmp_path / "scan.ndpi"
    shutil.copyfile(wsi_dir / CMU, renamed)
    sdata = hx.io.read_wsi(renamed)
    slide = sdata.attrs["hespotex_slide"]
    assert slide["reader"] == "openslide" and slide["sample_id"] == "scan"
    assert np.array_equal(
        _level0(sdata, ((0, 300), (0, 300))), _level0(hx.io.read_wsi(wsi_dir / CMU), ((0, 300), (0, 300)))
    )
    bad = tmp_path / "notes.mrxs"
    bad.write_text("not a slide\n")
    with pytest.raises(ValueError, match=r"Could not read notes\.mrxs with 'openslide'.*damaged"):
        hx.io.read_wsi(bad)
    with pytest.raises(ValueError, match="Expected `reader` to be one of"):
        hx.io.read_wsi(wsi_dir / CMU, reader="bogus")


def test_missing_reader_names_the_extra(wsi_dir, tmp_path, monkeypatch):
    """Without wsidata (or without OpenSlide) a vendor format raises an ImportError naming `hespotex[wsi]`."""
    renamed = tmp_path / "scan.ndpi"
    shutil.copyfile(wsi_dir / CMU, renamed)
    monkeypatch.setitem(sys.modules, "wsidata", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'hespotex\[wsi\]'"):
        hx.io.read_wsi(renamed)
    assert hx.io.read_wsi(wsi_dir / CMU).attrs["hespotex_slide"]["reader"] == "tifffile"  # TIFF/SVS need no extra
    monkeypatch.undo()
    pytest.importorskip("wsidata")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(ImportError, match=r"needs openslide-python openslide-bin.*hespotex\[wsi\]"):
        hx.io.read_wsi(renamed)


def test_broken_svs_clear_error_in_python_and_cli(wsi_dir, tmp_path, trained_synthetic, caplog):
    with pytest.raises(ValueError, match=r"broken\.svs is not a TIFF file.*damaged"):
        hx.io.read_wsi(wsi_dir / BROKEN)
    with pytest.raises(ValueError, match=r"broken\.svs is not a TIFF file"):
        hx.io.read_wsi(wsi_dir / BROKEN, microns_per_pixel=0.5, reader="tifffile")
    if sys.modules.get("openslide") is not None or _importable("openslide"):
        with pytest.raises(ValueError, match=r"Could not read broken\.svs with 'openslide'"):
            hx.io.read_wsi(wsi_dir / BROKEN, reader="openslide")
    out = tmp_path / "t.zarr"
    with caplog.at_level(logging.ERROR, logger="hespotex"):
        rc = main(
            [
                "--no-progress",
                "tile",
                "--spot-diameter",
                "55",
                "--spacing",
                "100",
                "--out",
                str(out),
                str(wsi_dir / BROKEN),
            ]
        )
    assert rc == 1 and "broken.svs is not a TIFF file" in caplog.text and not out.exists()
    model = str(trained_synthetic["model_dir"])
    rc = main(["--no-progress", "predict", "--model", model, "--out", str(tmp_path / "p"), str(wsi_dir / BROKEN)])
    assert rc == 1
    assert (tmp_path / "p" / "broken.error.txt").read_text().startswith("ValueError: broken.svs is not a TIFF file")
    assert not (tmp_path / "p" / "broken.done.json").exists()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize(("name", "mpp"), [(CMU, None), pytest.param(TCGA, "0.5", marks=pytest.mark.slow)])
def test_real_slide_tile_then_predict(wsi_dir, tmp_path, trained_synthetic, name, mpp, monkeypatch):
    """`hespotex tile`, `predict` and `export` on each real slide: tiles on the slide, one finite prediction each,
    GeoJSON and OME-TIFF that read back to the predictions at the tile centres."""
    import spatialdata

    monkeypatch.setenv("HESPOTEX_CACHE", str(tmp_path / "cache"))
    stem = name.removesuffix(".svs")
    model = str(trained_synthetic["model_dir"])
    tiles = tmp_path / f"{stem}.tiles.zarr"
    args = ["--no-progress", "tile", "--model", model, "--out", str(tiles), str(wsi_dir / name)]
    assert main([*args, *(["--mpp", mpp] if mpp else [])]) == 0
    tiled = spatialdata.read_zarr(tiles)
    table = tiled.tables["table"]
    slide = tiled.attrs["hespotex_slide"]
    height, width = slide["level_shapes"][0]
    xy = np.asarray(table.obsm["spatial"])
    assert 20 < table.n_obs < 2000
    assert (xy >= 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
    assert slide["path"] == str((wsi_dir / name).resolve()) and slide["microns_per_pixel"] == pytest.approx(
        float(mpp or 0.499)
    )
    assert table.uns["hespotex_sample"]["spot_diameter_um"] == pytest.approx(
        trained_synthetic["model"].spot_geometry["spot_diameter_um"]
    )

    out = tmp_path / "pred"
    assert main(["--no-progress", "predict", "--model", model, "--out", str(out), str(tiles)]) == 0
    pred = spatialdata.read_zarr(out / f"{stem}.tiles.zarr").tables["hespotex"]
    assert pred.n_obs == table.n_obs and list(pred.var_names) == list(trained_synthetic["model"].genes)
    values = np.asarray(pred.layers["hespotex"])
    assert np.isfinite(values).all() and values.std(axis=0).max() > 0  # tiles differ, so do their predictions
    assert np.allclose(np.asarray(pred.obsm["spatial"]), xy)
    assert json.loads((out / f"{stem}.tiles.done.json").read_text())["n_tiles"] == table.n_obs
    assert os.path.isfile(wsi_dir / name)  # the slide is only read

    # ... then `hespotex export`: QuPath detections and an OME-TIFF heatmap over the slide, read back independently
    import shapely.geometry
    import tifffile
    import zarr

    store, genes = out / f"{stem}.tiles.zarr", list(pred.var_names[:2])
    geojson, heat = tmp_path / f"{stem}.geojson", tmp_path / f"{stem}.ome.tif"
    assert (
        main(["--no-progress", "export", str(store), "--format", "geojson", "--genes", *genes, "--out", str(geojson)])
        == 0
    )
    features = json.loads(geojson.read_text())["features"]
    assert len(features) == pred.n_obs
    centroids = np.array([shapely.geometry.shape(f["geometry"]).centroid.coords[0] for f in features])
    np.testing.assert_allclose(centroids, xy, atol=0.5)  # in the slide's level-0 pixel frame
    got = np.array([[f["properties"]["measurements"][g] for g in genes] for f in features])
    np.testing.assert_allclose(got, values[:, :2], rtol=1e-5, atol=1e-6)
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    down = 4
    args = ["--no-progress", "export", str(store), "--format", "ome-tiff", "--genes", *genes, "--downsample", str(down)]
    assert main([*args, "--out", str(heat)]) == 0
    with tifffile.TiffFile(heat) as tif:
        level0 = tif.series[0].levels[0]
        assert level0.shape == (2, -(-height // down), -(-width // down))
        arr = zarr.open(tif.series[0].aszarr(), mode="r")["0"]
        px = np.floor(xy / down).astype(int)
        under = np.stack([arr.get_coordinate_selection((np.full(len(px), c), px[:, 1], px[:, 0])) for c in range(2)], 1)
    np.testing.assert_allclose(under, values[:, :2].astype(np.float32), rtol=1e-6)
