"""Exports pathologists open (``hespotex export``, ``hx.io.write_*``), read back with independent readers:
json + shapely for GeoJSON, tifffile for the OME-TIFF, PIL for the PNG, pandas for the CSV."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import hespotex as hx
from hespotex.cli import main

pytestmark = pytest.mark.usefixtures("single_threaded")
WIDTH, HEIGHT, MPP = 2400, 2000, 1.0


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, trained_synthetic):
    """A synthetic pyramidal slide through `hespotex tile` and `hespotex predict` (the streaming prediction),
    and the predictions as spatialdata / anndata read them (the reference)."""
    import spatialdata

    root = tmp_path_factory.mktemp("export")
    slide = hx.datasets.synthetic_wsi(
        root / "small.ome.tif", width=WIDTH, height=HEIGHT, n_blobs=6, microns_per_pixel=MPP, tile=256, seed=5
    )
    model = str(trained_synthetic["model_dir"])
    assert main(["--no-progress", "tile", "--out", str(root / "small.zarr"), "--model", model, str(slide)]) == 0
    assert (
        main(["--no-progress", "predict", "--model", model, "--out", str(root / "pred"), str(root / "small.zarr")]) == 0
    )
    store = root / "pred" / "small.zarr"
    table = spatialdata.read_zarr(store).tables["hespotex"]
    return {
        "store": store,
        "slide": slide,
        "genes": list(table.var_names),
        "ids": list(table.obs_names),
        "xy": np.asarray(table.obsm["spatial"], dtype=float),
        "values": np.asarray(table.layers["hespotex"]),
        "diameter_px": table.uns["hespotex_sample"]["spot_diameter_um"] / MPP,
    }


def _ome_pixels(tif):
    root = ET.fromstring(tif.ome_metadata)
    ns = {"ome": root.tag.split("}")[0].strip("{")}
    return root, root.find(".//ome:Pixels", ns), ns


# ---------------------------------------------------------------------------------------------- GeoJSON
@pytest.mark.parametrize("shape", ["circle", "square"])
def test_geojson_spots_are_qupath_detections_with_the_predictions(predicted, tmp_path, shape):
    import shapely.geometry

    genes = predicted["genes"][:3]
    out = hx.io.write_geojson(
        predicted["store"], tmp_path / "spots.geojson", genes=genes, shape=shape, classification="hespotex"
    )
    collection = json.loads(out.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert [f["properties"]["name"] for f in features] == predicted["ids"]
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i) for i in ids)
    polygons = [shapely.geometry.shape(f["geometry"]) for f in features]
    assert all(p.geom_type == "Polygon" and p.is_valid for p in polygons)
    centroids = np.array([[p.centroid.x, p.centroid.y] for p in polygons])
    np.testing.assert_allclose(centroids, predicted["xy"], atol=0.02)  # spot centres in full-resolution pixels
    d = predicted["diameter_px"]
    expected_area = d * d if shape == "square" else np.pi * d * d / 4
    np.testing.assert_allclose([p.area for p in polygons], expected_area, rtol=0.01)
    for f in features:
        assert f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"] == {"name": "hespotex"}
        assert list(f["properties"]["measurements"]) == genes
    measured = np.array([[f["properties"]["measurements"][g] for g in genes] for f in features])
    np.testing.assert_allclose(measured, predicted["values"][:, :3], rtol=1e-6)


def test_geojson_refuses_to_overwrite_and_unknown_genes(predicted, tmp_path):
    out = tmp_path / "spots.geojson"
    out.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        hx.io.write_geojson(predicted["store"], out, genes=predicted["genes"][:1])
    assert out.read_text() == "mine"
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        hx.io.write_geojson(predicted["store"], tmp_path / "x.geojson", genes=["NOT_A_GENE"])
    with pytest.raises(KeyError, match="no prediction table 'other'"):
        hx.io.write_geojson(predicted["store"], tmp_path / "x.geojson", key="other")
    assert not (tmp_path / "x.geojson").exists()


# ---------------------------------------------------------------------------------------------- OME-TIFF
def test_ome_tiff_heatmap_is_aligned_to_the_slide(predicted, tmp_path):
    import tifffile

    genes = predicted["genes"][:2]
    out = hx.io.write_ome_tiff(predicted["store"], tmp_path / "heat.ome.tif", genes=genes, tile=256)
    xy, values, r = predicted["xy"], predicted["values"][:, :2], predicted["diameter_px"] / 2
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.axes == "CYX"
        levels = series.levels
        shapes = [lv.shape for lv in levels]
        assert shapes[0] == (2, HEIGHT, WIDTH)  # the slide's full-resolution size
        assert shapes[1:] == [(2, -(-HEIGHT // 2**k), -(-WIDTH // 2**k)) for k in range(1, len(shapes))]
        assert max(shapes[-1][1:]) <= 256 < max(shapes[-2][1:])  # halved down to one tile
        assert levels[0].pages[0].is_tiled and levels[0].pages[0].tilewidth == 256
        assert levels[0].dtype == np.float32
        _, pixels, ns = _ome_pixels(tif)
        assert float(pixels.get("PhysicalSizeX")) == pytest.approx(MPP)
        assert float(pixels.get("PhysicalSizeY")) == pytest.approx(MPP)
        assert [c.get("Name") for c in pixels.findall("ome:Channel", ns)] == genes
        for k in (0, 1, 2):
            page = levels[k].pages[0]
            num, den = page.tags["XResolution"].value
            assert 1e4 / (num / den) == pytest.approx(MPP * 2**k, rel=1e-4)  # µm per pixel of each level
        import zarr

        store = zarr.open(series.aszarr(), mode="r")
        for k in (0, 1):  # values under the spot centres, read pixel by pixel
            arr = store[str(k)]
            px = np.floor(xy / 2**k).astype(int)
            got = np.stack(
                [arr.get_coordinate_selection((np.full(len(px), c), px[:, 1], px[:, 0])) for c in range(2)], 1
            )
            np.testing.assert_array_equal(got, values.astype(np.float32))
        # a pixel half a radius from a centre still holds that spot's value; one far from every spot is NaN
        arr0 = store["0"]
        x, y = np.floor(xy[0] + [r / 2, 0]).astype(int)
        assert arr0[0, y, x] == np.float32(values[0, 0])
        from scipy.spatial import cKDTree

        grid = np.stack(np.meshgrid(np.arange(0, WIDTH, 50), np.arange(0, HEIGHT, 50)), -1).reshape(-1, 2) + 0.5
        far = grid[cKDTree(xy).query(grid)[0] > r + 2][0].astype(int)
        assert np.isnan(arr0[1, far[1], far[0]])


def test_ome_tiff_uint16_records_its_scale_and_downsample(predicted, tmp_path):
    import tifffile

    gene = predicted["genes"][4]
    out = hx.io.write_ome_tiff(
        predicted["store"], tmp_path / "g.ome.tif", genes=gene, dtype="uint16", downsample=4, tile=128
    )
    truth = predicted["values"][:, 4]
    with tifffile.TiffFile(out) as tif:
        level0 = tif.series[0].levels[0]
        assert (
            level0.shape[-2:] == (-(-HEIGHT // 4), -(-WIDTH // 4)) and level0.dtype == np.uint16
        )  # one channel: squeezed
        root, pixels, ns = _ome_pixels(tif)
        assert float(pixels.get("PhysicalSizeX")) == pytest.approx(4 * MPP)
        scale = {m.get("K"): m.text for m in root.iter(f"{{{ns['ome']}}}M")}
        offset, step = float(scale[f"{gene} offset"]), float(scale[f"{gene} scale"])
        img = level0.asarray().reshape(1, *level0.shape[-2:])  # 500 x 600 px: small at this downsample
    px = np.floor(predicted["xy"] / 4).astype(int)
    stored = img[0, px[:, 1], px[:, 0]].astype(float)
    assert (stored >= 1).all() and img.min() == 0  # 0 = no spot
    np.testing.assert_allclose(offset + (stored - 1) * step, truth, atol=step / 2 + 1e-6)


def test_ome_tiff_bad_input(predicted, tmp_path):
    with pytest.raises(ValueError, match="outside the slide"):
        hx.io.write_ome_tiff(
            predicted["store"], tmp_path / "a.ome.tif", genes=predicted["genes"][:1], image_shape=(100, 100)
        )
    with pytest.raises(ValueError, match="dtype"):
        hx.io.write_ome_tiff(predicted["store"], tmp_path / "a.ome.tif", dtype="int8")
    with pytest.raises(ValueError, match="downsample"):
        hx.io.write_ome_tiff(predicted["store"], tmp_path / "a.ome.tif", downsample=0)
    assert not (tmp_path / "a.ome.tif").exists()


# ---------------------------------------------------------------------------------------------- PNG, CSV, command line
def test_png_overview_over_the_tissue(predicted, tmp_path):
    from PIL import Image

    genes = predicted["genes"]
    a = hx.io.write_png(predicted["store"], tmp_path / "a.png", genes=genes[:2])
    b = hx.io.write_png(predicted["store"], tmp_path / "b.png", genes=genes[2:4])
    with Image.open(a) as img_a, Image.open(b) as img_b:
        assert img_a.format == "PNG" and img_a.size[0] > 400 and img_a.size == img_b.size
        pa, pb = np.asarray(img_a.convert("RGB")), np.asarray(img_b.convert("RGB"))
    assert pa.std() > 10  # tissue, spots and colour bars, not a blank page
    assert (np.abs(pa.astype(int) - pb.astype(int)).sum(-1) > 30).mean() > 0.01  # other genes, other colours
    with pytest.raises(ValueError, match="at most 16"):
        hx.io.write_png(predicted["store"], tmp_path / "c.png", genes=genes[:17])


def test_csv_has_spots_centres_and_genes(predicted, tmp_path):
    import pandas as pd

    genes = predicted["genes"][:5]
    frame = pd.read_csv(hx.io.write_csv(predicted["store"], tmp_path / "p.csv", genes=genes))
    assert list(frame.columns) == ["spot_id", "x", "y", "x_um", "y_um", *genes]
    assert list(frame["spot_id"]) == predicted["ids"]
    np.testing.assert_allclose(frame[["x", "y"]].to_numpy(), predicted["xy"], rtol=1e-5)
    np.testing.assert_allclose(frame[["x_um", "y_um"]].to_numpy(), predicted["xy"] * MPP, rtol=1e-5)
    np.testing.assert_allclose(frame[genes].to_numpy(), predicted["values"][:, :5], rtol=1e-5)


def test_export_command(predicted, tmp_path, capsys):
    import tifffile

    store, genes = str(predicted["store"]), predicted["genes"][:2]
    out = tmp_path / "s.geojson"
    assert main(["export", store, "--genes", *genes, "--format", "geojson", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["features"]) == len(predicted["ids"])
    assert main(["export", store, "--genes", *genes, "--format", "geojson", "--out", str(out)]) == 2  # exists
    assert main(["export", store, "--genes", "NOT_A_GENE", "--format", "csv", "--out", str(tmp_path / "x.csv")]) == 1
    heat = tmp_path / "heat"
    args = [
        "export",
        store,
        "--genes",
        *genes,
        "--format",
        "ome-tiff",
        "--per-gene",
        "--downsample",
        "8",
        "--out",
        str(heat),
    ]
    assert main(args) == 0
    for g in genes:
        with tifffile.TiffFile(heat / f"{g}.ome.tif") as tif:
            assert tif.series[0].levels[0].shape[-2:] == (HEIGHT // 8, WIDTH // 8)
            assert tif.series[0].levels[0].dtype == np.float32
    assert main(["export", store, "--format", "png", "--out", str(tmp_path / "p.png")]) == 2  # png needs --genes
    assert main(["export", str(tmp_path / "missing.zarr"), "--format", "csv", "--out", str(tmp_path / "m.csv")]) == 2
    assert "wrote" in capsys.readouterr().out
