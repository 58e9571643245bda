"""Whole-slide reading (hx.io.read_wsi) and the synthetic WSI writer (hx.datasets.synthetic_wsi)."""

from __future__ import annotations

import logging
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile

import hespotex as hx
from hespotex.datasets._synthetic_wsi import write_ome_tiff

TILE = 512
BIG = (16_384, 24_576)  # height, width: 1.2 GB of RGB at full resolution
TISSUE_ROWS, TISSUE_COLS = (10, 26), (20, 41)  # tile rows / columns painted as "tissue"


def tile_colour(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Colour of full-resolution tile (row, col) of the big test slide: glass, or a purple that encodes the tile."""
    row, col = np.broadcast_arrays(np.asarray(row), np.asarray(col))
    out = np.empty((*row.shape, 3), dtype=np.uint8)
    out[...] = 240
    tissue = (row >= TISSUE_ROWS[0]) & (row < TISSUE_ROWS[1]) & (col >= TISSUE_COLS[0]) & (col < TISSUE_COLS[1])
    out[tissue, 0] = 120 + (row[tissue] * 7) % 60
    out[tissue, 1] = 40 + (col[tissue] * 5) % 60
    out[tissue, 2] = 150
    return out


def big_tiles(level: int, row: int, col: int) -> np.ndarray:
    """Tile of ``level``: each pixel takes the colour of the full-resolution tile it falls in (an exact pyramid)."""
    f = 2**level
    block = TILE // f  # level pixels per full-resolution tile (f <= TILE here)
    rows, cols = row * f + np.arange(f), col * f + np.arange(f)
    colours = tile_colour(rows[:, None], cols[None, :])
    return np.repeat(np.repeat(colours, block, axis=0), block, axis=1)


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("wsi") / "big.ome.tif"
    return write_ome_tiff(path, big_tiles, BIG, microns_per_pixel=0.5, tile=TILE, compression="jpeg")


def test_read_wsi_levels_are_the_files_levels(big_slide):
    from spatialdata.transformations import get_transformation

    sdata = hx.io.read_wsi(big_slide)
    slide = sdata.attrs["hespotex_slide"]
    assert slide["sample_id"] == "big" and slide["image_key"] == "big_image" and slide["coordinate_system"] == "big"
    assert slide["microns_per_pixel"] == pytest.approx(0.5) and slide["microns_per_pixel_source"].startswith("OME")
    with tifffile.TiffFile(big_slide) as tif:
        stored = [list(lv.shape[:2]) for lv in tif.series[0].levels]
    assert len(stored) == 7 and slide["level_shapes"] == stored and slide["stored_pyramid"]
    image = sdata.images["big_image"]
    for i, (h, w) in enumerate(stored):
        arr = image[f"scale{i}"]["image"]
        assert arr.dims == ("c", "y", "x") and arr.dtype == np.uint8 and arr.shape == (3, h, w)
        assert arr.data.chunksize[1:] == (min(TILE, h), min(TILE, w))  # the file's tiles, read lazily
        affine = get_transformation(arr, to_coordinate_system="big").to_affine_matrix(("x", "y"), ("x", "y"))
        assert affine[0, 0] == pytest.approx(BIG[1] / w) and affine[1, 1] == pytest.approx(BIG[0] / h)
    # a coarse level decodes to the file's pixels
    level3 = np.asarray(image["scale3"]["image"].data).transpose(1, 2, 0)
    expected = tifffile.imread(big_slide, level=3)
    assert np.abs(level3.astype(int) - expected.astype(int)).max() == 0


def test_slide_to_tiles_never_loads_the_full_resolution(big_slide):
    """read_wsi + detect_tissue + tile + patch reads stay far below the 1.2 GB of the full-resolution level."""
    import geopandas  # noqa: F401  (imports first: tracemalloc makes importing slow)
    import skimage.measure  # noqa: F401
    import spatialdata  # noqa: F401
    import torch  # noqa: F401

    tracemalloc.start()
    try:
        sdata = hx.io.read_wsi(big_slide)
        tissue = hx.pp.detect_tissue(sdata)
        table = hx.pp.tile(sdata, spot_diameter_um=55.0, spacing_um=100.0)
        idx = np.arange(table.n_obs // 2, table.n_obs // 2 + 300)  # a band of neighbouring tiles: one read
        patches = hx.pp.extract_patches(sdata, patch_um=40.0, size=16, spots=idx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 150e6, f"peak traced memory {peak / 1e6:.0f} MB"
    # the tissue is the painted block of tiles
    x0, y0, x1, y1 = tissue.total_bounds
    assert x0 == pytest.approx(TISSUE_COLS[0] * TILE, abs=40) and x1 == pytest.approx(TISSUE_COLS[1] * TILE, abs=40)
    assert y0 == pytest.approx(TISSUE_ROWS[0] * TILE, abs=40) and y1 == pytest.approx(TISSUE_ROWS[1] * TILE, abs=40)
    assert len(tissue) == 1
    # every tile centre lies on tissue (up to the mask's 8 µm/px outline) and reads the pixels written there
    xy = table.obsm["spatial"]
    assert table.n_obs > 1500
    assert (xy[:, 0] > TISSUE_COLS[0] * TILE - 20).all() and (xy[:, 0] < TISSUE_COLS[1] * TILE + 20).all()
    assert (xy[:, 1] > TISSUE_ROWS[0] * TILE - 20).all() and (xy[:, 1] < TISSUE_ROWS[1] * TILE + 20).all()
    cols, rows = (xy[:, 0] // TILE).astype(int), (xy[:, 1] // TILE).astype(int)
    inner = (np.abs(xy[idx] % TILE - TILE / 2) < TILE / 2 - 45).all(axis=1)  # the patch lies within one written tile
    centre = patches[:, 8, 8].astype(int)
    assert inner.sum() > 50
    assert np.abs(centre[inner] - tile_colour(rows[idx], cols[idx])[inner].astype(int)).max() <= 3
    level0 = sdata.images["big_image"]["scale0"]["image"].data
    for i in idx[inner][:5]:
        x, y = (int(v) for v in xy[i])
        assert np.abs(np.asarray(level0[:, y, x]).astype(int) - tile_colour(rows[i], cols[i]).astype(int)).max() <= 3


def test_synthetic_wsi_pyramid_and_determinism(tmp_path):
    a = hx.datasets.synthetic_wsi(
        tmp_path / "a.ome.tif", width=1000, height=700, microns_per_pixel=0.5, tile=256, seed=3
    )
    b = hx.datasets.synthetic_wsi(
        tmp_path / "b.ome.tif", width=1000, height=700, microns_per_pixel=0.5, tile=256, seed=3
    )
    c = hx.datasets.synthetic_wsi(
        tmp_path / "c.ome.tif", width=1000, height=700, microns_per_pixel=0.5, tile=256, seed=4
    )
    with tifffile.TiffFile(a) as tif:
        assert tif.is_ome and 'PhysicalSizeX="0.5"' in tif.ome_metadata
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(700, 1000, 3), (350, 500, 3), (175, 250, 3)]
        assert tif.pages.first.is_tiled and tif.pages.first.tilewidth == 256
        full = levels[0].asarray()
    assert np.array_equal(full, tifffile.imread(b))
    assert not np.array_equal(full, tifffile.imread(c))
    glass = (full > 235).all(axis=2)
    assert 0.3 < glass.mean() < 0.98  # tissue blobs on white glass
    tissue = full[~glass]
    assert (
        tissue[:, 1].mean() < tissue[:, 0].mean() and tissue[:, 1].mean() < tissue[:, 2].mean()
    )  # pink/purple: green absorbed
    with pytest.raises(FileExistsError, match="overwrite=True"):
        hx.datasets.synthetic_wsi(a, width=1000, height=700)
    empty = hx.datasets.synthetic_wsi(tmp_path / "e.ome.tif", width=600, height=600, n_blobs=0, tile=256)
    assert (tifffile.imread(empty) == 245).all()


def _svs(path, mpp):
    desc = f"Aperio Image Library v12.0.15\r\n512x384 [0,0 512x384] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = {mpp}"
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path, shaped=False) as tw:
        tw.write(
            rng.integers(0, 255, (384, 512, 3), dtype=np.uint8), tile=(256, 256), photometric="rgb", description=desc
        )
        tw.write(
            rng.integers(0, 255, (96, 128, 3), dtype=np.uint8),
            photometric="rgb",
            description="thumbnail",
            metadata=None,
        )
        tw.write(
            rng.integers(0, 255, (192, 256, 3), dtype=np.uint8), tile=(256, 256), photometric="rgb", description="level"
        )
    return path


def test_microns_per_pixel_from_each_metadata_flavour(tmp_path, caplog):
    img = np.full((300, 400, 3), 200, dtype=np.uint8)
    ome = tmp_path / "nm.ome.tif"
    tifffile.imwrite(
        ome, img, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"}
    )
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, img, photometric="rgb", resolution=(1e4 / 0.8, 1e4 / 0.8), resolutionunit="CENTIMETER")
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, img, photometric="rgb", resolution=(25_400 / 0.3, 25_400 / 0.3), resolutionunit="INCH")
    dpi72 = tmp_path / "dpi72.tif"  # a placeholder resolution, not a scan resolution
    tifffile.imwrite(dpi72, img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    svs = _svs(tmp_path / "slide.svs", 0.499)
    expected = {ome: (0.25, "OME"), cm: (0.8, "TIFF"), inch: (0.3, "TIFF"), svs: (0.499, "Aperio")}
    for path, (mpp, source) in expected.items():
        slide = hx.io.read_wsi(path).attrs["hespotex_slide"]
        assert slide["microns_per_pixel"] == pytest.approx(mpp), path.name
        assert slide["microns_per_pixel_source"].startswith(source), path.name
    svs_slide = hx.io.read_wsi(svs).attrs["hespotex_slide"]
    assert svs_slide["level_shapes"] == [[384, 512], [192, 256]] and svs_slide["stored_pyramid"]
    with pytest.raises(ValueError, match=r"records no microns per pixel.*microns_per_pixel="):
        hx.io.read_wsi(dpi72)
    assert hx.io.read_wsi(dpi72, microns_per_pixel=0.5).attrs["hespotex_slide"]["microns_per_pixel"] == 0.5
    # the argument wins; a warning only when it disagrees with the metadata by more than 5 %
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        caplog.clear()
        assert hx.io.read_wsi(cm, microns_per_pixel=0.81).attrs["hespotex_slide"]["microns_per_pixel"] == 0.81
        assert "disagrees" not in caplog.text
        slide = hx.io.read_wsi(cm, microns_per_pixel=1.0).attrs["hespotex_slide"]
        assert slide["microns_per_pixel"] == 1.0 and slide["microns_per_pixel_source"] == "argument"
        assert "disagrees" in caplog.text
    with pytest.raises(ValueError, match="within"):
        hx.io.read_wsi(cm, microns_per_pixel=500.0)


def test_tiff_without_pyramid_rgba_grayscale_and_jpeg(tmp_path, caplog):
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (600, 520, 3), dtype=np.uint8)
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, rgb, photometric="rgb", tile=(128, 128), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        sdata = hx.io.read_wsi(flat)
    assert "no pyramid" in caplog.text
    image = sdata.images["flat_image"]
    assert not sdata.attrs["hespotex_slide"]["stored_pyramid"]
    assert np.array_equal(np.asarray(image["scale0"]["image"].data).transpose(1, 2, 0), rgb)
    level1 = np.asarray(image["scale1"]["image"].data).transpose(1, 2, 0)
    means = rgb.reshape(300, 2, 260, 2, 3).mean(axis=(1, 3))
    assert level1.shape == (300, 260, 3) and np.abs(level1 - means).max() <= 0.5 + 1e-6

    caplog.clear()
    rgba = tmp_path / "rgba.tif"
    tifffile.imwrite(
        rgba, np.concatenate([rgb, np.full((600, 520, 1), 255, np.uint8)], axis=2), photometric="rgb", extrasamples=[2]
    )
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        image = hx.io.read_wsi(rgba, microns_per_pixel=0.5).images["rgba_image"]
    assert "alpha" in caplog.text and image["scale0"]["image"].shape == (3, 600, 520)
    assert np.array_equal(np.asarray(image["scale0"]["image"].data[:, 10, 10]), rgb[10, 10])

    caplog.clear()
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, rgb[..., 0], tile=(128, 128))
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        image = hx.io.read_wsi(gray, microns_per_pixel=0.5).images["gray_image"]
    assert "grayscale" in caplog.text
    px = np.asarray(image["scale0"]["image"].data[:, 5, 7])
    assert (px == rgb[5, 7, 0]).all()

    jpg = tmp_path / "photo.jpg"
    Image.fromarray(rgb).save(jpg, quality=95, dpi=(50_800, 50_800))  # 0.5 µm/px
    sdata = hx.io.read_wsi(jpg, sample_id="photo_1")
    slide = sdata.attrs["hespotex_slide"]
    assert slide["microns_per_pixel"] == pytest.approx(0.5, rel=1e-3) and slide["image_key"] == "photo_1_image"
    assert slide["level_shapes"][0] == [600, 520]


def test_bad_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.ome.tif"
    write_ome_tiff(
        good,
        lambda level, r, c: np.full((256, 256, 3), 200 - 20 * level, np.uint8),
        (2048, 2048),
        microns_per_pixel=0.5,
        tile=256,
    )
    truncated = tmp_path / "cut.ome.tif"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"truncated|damaged|Could not read"):
        hx.io.read_wsi(truncated)
    text = tmp_path / "notes.tif"
    text.write_text("this is not an image\n" * 10)
    with pytest.raises(ValueError, match="not a TIFF"):
        hx.io.read_wsi(text)
    png = tmp_path / "broken.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ValueError, match=r"Could not read broken\.png"):
        hx.io.read_wsi(png, microns_per_pixel=0.5)
    with pytest.raises(FileNotFoundError, match="no file"):
        hx.io.read_wsi(tmp_path / "missing.svs")
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((4, 64, 64), np.uint8), metadata={"axes": "ZYX"})
    with pytest.raises(ValueError, match="planes"):
        hx.io.read_wsi(stack, microns_per_pixel=0.5)


def test_slide_attrs_survive_zarr(tmp_path):
    path = hx.datasets.synthetic_wsi(tmp_path / "z.ome.tif", width=700, height=500, tile=256, seed=1)
    sdata = hx.io.read_wsi(path)
    hx.io.write_zarr(sdata, tmp_path / "z.zarr")
    back = hx.io.read_zarr(tmp_path / "z.zarr", validate=False)
    assert back.attrs["hespotex_slide"] == sdata.attrs["hespotex_slide"]


@pytest.mark.realdata
def test_her2st_slide_as_pyramidal_ome_tiff(shared_data, tmp_path):
    """A real H&E image written as a pyramidal OME-TIFF: metadata, levels, and the tissue mask under every spot."""
    import shapely
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # 92 M pixels: a slide, not a bomb
        with Image.open(shared_data / "her2st" / "images" / "C2.jpg") as im:
            im.load()
            pyramid = [im]
            while max(pyramid[-1].size) > 1024:
                pyramid.append(pyramid[-1].reduce(2))  # 2 x 2 box means, sizes rounded up
    pyramid = [np.asarray(p) for p in pyramid]
    full = pyramid[0]

    def tiles(level, row, col):
        return pyramid[level][row * 512 : (row + 1) * 512, col * 512 : (col + 1) * 512]

    path = write_ome_tiff(tmp_path / "C2.ome.tif", tiles, full.shape[:2], microns_per_pixel=0.735, levels=len(pyramid))
    sdata = hx.io.read_wsi(path)
    slide = sdata.attrs["hespotex_slide"]
    assert slide["sample_id"] == "C2" and slide["microns_per_pixel"] == pytest.approx(0.735)
    assert slide["level_shapes"][0] == list(full.shape[:2]) and len(slide["level_shapes"]) == 5
    # pixels of the stored level 0 are the JPEG's (up to JPEG re-encoding)
    crop = np.asarray(sdata.images["C2_image"]["scale0"]["image"].data[:, 4000:4064, 5000:5064]).transpose(1, 2, 0)
    assert np.abs(crop.astype(int) - full[4000:4064, 5000:5064].astype(int)).mean() < 4
    spots = pd.read_csv(shared_data / "her2st" / "spots" / "C2_selection.tsv", sep="\t")
    for channel in ("saturation", "hematoxylin"):
        tissue = hx.pp.detect_tissue(sdata, channel=channel, overwrite=True)
        record = sdata.attrs["hespotex_tissue"]["C2_tissue"]
        assert 8 <= record["level_microns_per_pixel"] <= 16
        union = shapely.union_all(tissue.geometry.values)
        inside = shapely.contains_xy(union, spots["pixel_x"].to_numpy(), spots["pixel_y"].to_numpy())
        assert inside.all(), f"{channel}: {(~inside).sum()} of {len(spots)} spots off the mask"
        # a sensible fraction: the section covers about a sixth of the image
        assert 0.12 < record["fraction"] < 0.3, record
    table = hx.pp.tile(sdata, spot_diameter_um=100.0, spacing_um=200.0, layout="grid")
    assert 150 <= table.n_obs <= 320  # her2st selects 187 spots under tissue on this section
