"""Images decoded by their real bit depth and colour model, and spots placed outside the image (issue 10).

Every image here is a real file written by Pillow or tifffile; the tests compare the decoded pixels
(or the patches cut from them) with the colours that were written.
"""

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
import tifffile
from PIL import Image

import hespotex as hx
from hespotex.io._anndata import open_image

PINK, PURPLE = (230, 150, 200), (110, 50, 150)


def _rgb(h: int = 64, w: int = 96) -> np.ndarray:
    """Two flat H&E-like colours, left pink and right purple (8 px aligned, so JPEG keeps them)."""
    img = np.empty((h, w, 3), np.uint8)
    img[:, : w // 2] = PINK
    img[:, w // 2 :] = PURPLE
    return img


def _noise(h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _adata(h: int = 64, w: int = 96) -> ad.AnnData:
    """Spots on a grid well inside an image of ``h`` x ``w`` px."""
    xs, ys = np.meshgrid(np.arange(16, w - 15, 16.0), np.arange(16, h - 15, 16.0))
    xy = np.column_stack([xs.ravel(), ys.ravel()])
    a = ad.AnnData(X=sp.csr_matrix(np.random.default_rng(0).poisson(2.0, size=(len(xy), 4)).astype(np.float32)))
    a.obs_names = [f"s{i}" for i in range(a.n_obs)]
    a.var_names = [f"g{i}" for i in range(a.n_vars)]
    a.obsm["spatial"] = xy
    return a


def _level0(element) -> np.ndarray:
    """Full-resolution ``(h, w, 3)`` pixels of an image element."""
    from spatialdata import get_pyramid_levels
    from xarray import DataArray

    arr = element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)
    return np.asarray(arr.data).transpose(1, 2, 0)


def _shape(image) -> tuple[int, int]:
    if not isinstance(image, (str, Path)):
        return image.shape[:2]
    if Path(image).suffix == ".tif":
        with tifffile.TiffFile(image) as tif:
            return tif.pages[0].shape[:2]
    with Image.open(image) as im:
        return im.size[::-1]


def _pixels(image) -> np.ndarray:
    """Decoded ``(h, w, 3)`` pixels of a sample built from ``image`` (path or array) with from_anndata."""
    sdata = hx.io.from_anndata(_adata(*_shape(image)), image, microns_per_pixel=0.5, spot_diameter_um=4.0)
    return _level0(sdata.images["sample_image"])


def _halves(px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the left and right halves (away from the border between them)."""
    w = px.shape[1]
    return px[:, : w // 2 - 8].reshape(-1, 3).mean(0), px[:, w // 2 + 8 :].reshape(-1, 3).mean(0)


# ----------------------------------------------------------------------------- bit depth


def test_uint16_tiff_holding_8bit_values_keeps_them(tmp_path, caplog):
    """Before: divided by 257, all black. After: the values are 8-bit values in a 16-bit container."""
    img = _noise()
    path = tmp_path / "u16.tif"
    tifffile.imwrite(path, img.astype(np.uint16), photometric="rgb")
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        px = _pixels(path)
    np.testing.assert_array_equal(px, img)
    assert "fits 8 bits" in caplog.text
    np.testing.assert_array_equal(np.asarray(open_image(path)), img)  # the lazy reader too (read_hest's path)


def test_12bit_data_in_uint16_scaled_from_4095(tmp_path):
    """Before: divided by 257, nearly black (max 15). After: 4095 maps to white."""
    img = _noise()
    twelve = (img.astype(np.float64) * 4095 / 255).round().astype(np.uint16)
    expected = (twelve.astype(np.float64) * 255 / 4095).round()
    path = tmp_path / "c12.tif"
    tifffile.imwrite(path, twelve, photometric="rgb")  # BitsPerSample 16: the range is inferred from the data
    np.testing.assert_allclose(_pixels(path), expected, atol=1)
    packed = tmp_path / "packed12.tif"
    tifffile.imwrite(packed, twelve, photometric="rgb", bitspersample=12)  # BitsPerSample 12 declared
    assert tifffile.TiffFile(packed).pages[0].bitspersample == 12
    np.testing.assert_allclose(_pixels(packed), expected, atol=1)


def test_smaxsamplevalue_is_the_white_level(tmp_path):
    """A declared SMaxSampleValue of 1023 wins over the data's maximum (a dark 10-bit image stays dark)."""
    img = (_noise() // 2).astype(np.uint16)  # values up to 127: inferred as 8-bit without the tag
    path = tmp_path / "smax.tif"
    tifffile.imwrite(path, img, photometric="rgb", extratags=[(341, "H", 3, (1023, 1023, 1023), True)])
    np.testing.assert_allclose(_pixels(path), (img * 255.0 / 1023).round(), atol=1)


def test_16bit_grey_png_with_12bit_values(tmp_path):
    grey = (_noise()[..., 0].astype(np.float64) * 4095 / 255).round().astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    px = _pixels(path)
    np.testing.assert_allclose(px[..., 0], (grey * 255.0 / 4095).round(), atol=1)
    np.testing.assert_array_equal(px[..., 0], px[..., 2])


def test_uint16_wsi_levels_share_one_mapping(tmp_path):
    """read_wsi: a pyramidal 16-bit TIFF holding 8-bit values; every level keeps the values of its source."""
    img = _noise(256, 256)
    path = tmp_path / "slide16.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img.astype(np.uint16), tile=(64, 64), photometric="rgb", subifds=1)
        tw.write(img[::2, ::2].astype(np.uint16) // 2, tile=(64, 64), photometric="rgb", subfiletype=1)
    image = hx.io.read_wsi(path, microns_per_pixel=0.5).images["slide16_image"]
    np.testing.assert_array_equal(_level0(image), img)
    # level 1 holds values up to 127: decoded with level 0's white level, not stretched on its own
    np.testing.assert_array_equal(np.asarray(image["scale1"]["image"].data).transpose(1, 2, 0), img[::2, ::2] // 2)


# ----------------------------------------------------------------------------- colour models


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    """Before: the CMYK planes read as RGBA (K dropped as 'alpha'): inverted colours. After: the source colours."""
    img = _rgb()
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(img).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    left, right = _halves(_pixels(path))
    np.testing.assert_allclose(left, PINK, atol=3)
    np.testing.assert_allclose(right, PURPLE, atol=3)


def test_cmyk_jpeg_slide(tmp_path):
    img = _rgb(512, 512)
    path = tmp_path / "cmykslide.jpg"
    Image.fromarray(img).convert("CMYK").save(path, quality=95)
    image = hx.io.read_wsi(path, microns_per_pixel=0.5).images["cmykslide_image"]
    left, right = _halves(_level0(image))
    np.testing.assert_allclose(left, PINK, atol=3)
    np.testing.assert_allclose(right, PURPLE, atol=3)


def test_cmyk_tiff_is_converted_to_rgb(tmp_path):
    img = _rgb()
    cmyk = np.asarray(Image.fromarray(img).convert("CMYK"))
    path = tmp_path / "cmyk.tif"
    tifffile.imwrite(path, cmyk, photometric="separated")
    np.testing.assert_array_equal(_pixels(path), img)
    image = hx.io.read_wsi(path, microns_per_pixel=0.5).images["cmyk_image"]
    np.testing.assert_array_equal(_level0(image), img)


def test_palette_png_mapped_through_its_palette(tmp_path):
    """Before: the indices (0, 1) read as grey levels, a black image. After: the palette's colours."""
    img = _rgb()
    path = tmp_path / "pal.png"
    Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(_pixels(path), img)
    image = hx.io.read_wsi(path, microns_per_pixel=0.5).images["pal_image"]
    np.testing.assert_array_equal(_level0(image), img)


def test_palette_tiff_mapped_through_its_colormap(tmp_path):
    img = _rgb()
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 1], colormap[:, 2] = np.array(PINK) * 257, np.array(PURPLE) * 257
    index = np.where(np.arange(img.shape[1]) < img.shape[1] // 2, 1, 2).astype(np.uint8)[None].repeat(img.shape[0], 0)
    path = tmp_path / "pal.tif"
    tifffile.imwrite(path, index, photometric="palette", colormap=colormap)
    np.testing.assert_array_equal(_pixels(path), img)
    image = hx.io.read_wsi(path, microns_per_pixel=0.5).images["pal_image"]
    np.testing.assert_array_equal(_level0(image), img)


def test_miniswhite_tiff_is_inverted(tmp_path):
    grey = _noise()[..., 0]
    path = tmp_path / "white.tif"
    tifffile.imwrite(path, 255 - grey, photometric="miniswhite")
    px = _pixels(path)
    np.testing.assert_array_equal(px, np.repeat(grey[..., None], 3, axis=2))


def test_rgba_with_real_alpha_composited_on_white(tmp_path, caplog):
    """Before: alpha dropped, the hidden colours kept. After: transparent pixels are white glass."""
    img = _rgb()
    alpha = np.full(img.shape[:2], 255, np.uint8)
    alpha[:, img.shape[1] // 2 :] = 0  # the purple half is fully transparent
    alpha[:8, :8] = 128  # a half-transparent corner
    rgba = np.dstack([img, alpha])
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    for source in (path, rgba):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hespotex"):
            px = _pixels(source)
        assert "compositing it on white" in caplog.text
        left, right = _halves(px[8:])
        np.testing.assert_allclose(left, PINK)
        np.testing.assert_allclose(right, 255)
        expected = np.round(np.array(PINK) * 128 / 255 + 255 * (1 - 128 / 255))
        np.testing.assert_allclose(px[0, 0], expected, atol=1)
    tif = tmp_path / "rgba.tif"
    tifffile.imwrite(tif, rgba, photometric="rgb", extrasamples=[2])
    np.testing.assert_allclose(_halves(_pixels(tif)[8:])[1], 255)


def test_grayscale_is_expanded_with_a_note(tmp_path, caplog):
    grey = _noise()[..., 1]
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        px = _pixels(path)
    assert "grayscale" in caplog.text
    np.testing.assert_array_equal(px, np.repeat(grey[..., None], 3, axis=2))


# ----------------------------------------------------------------------------- floats


def test_float_ranges():
    img = _noise()
    np.testing.assert_array_equal(_pixels(img / 255.0), img)  # [0, 1]
    np.testing.assert_array_equal(_pixels(img.astype(np.float32)), img)  # [0, 255]
    shifted = img / 255.0 - 0.5  # [-0.5, 0.5]: before, clipped silently into a dark image
    with pytest.raises(ValueError, match=r"floats in \[0, 1\] or \[0, 255\], found values from -0.5"):
        _pixels(shifted)


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
def test_nan_and_inf_refused_by_name(bad, word):
    img = _noise() / 255.0
    img[3, 4, 1] = bad
    img[5, 6, 0] = bad
    with pytest.raises(ValueError, match=rf"2 {word} pixel values"):
        _pixels(img)


def test_float_tiff_nan_refused(tmp_path):
    img = (_noise() / 255.0).astype(np.float32)
    img[0, 0, 0] = np.nan
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, img, photometric="rgb")
    with pytest.raises(ValueError, match="1 NaN pixel values"):
        _pixels(path)


# ----------------------------------------------------------------------------- readers


def test_read_st_and_read_hest_decode_their_files(tmp_path):
    """read_st (a CMYK JPEG) and read_hest (a 16-bit TIFF) decode through the same rules."""
    counts = pd.DataFrame(np.ones((4, 3), int), index=["1x1", "2x1", "1x2", "2x2"], columns=["A", "B", "C"])
    spots = pd.DataFrame(
        {"x": [1, 2, 1, 2], "y": [1, 1, 2, 2], "pixel_x": [24.0, 72, 24, 72], "pixel_y": [24.0, 24, 40, 40]}
    )
    spots["selected"] = 1
    counts.to_csv(tmp_path / "c.tsv", sep="\t")
    spots.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    Image.fromarray(_rgb()).convert("CMYK").save(tmp_path / "st.jpg", quality=95)
    sdata = hx.io.read_st(tmp_path / "c.tsv", tmp_path / "s.tsv", tmp_path / "st.jpg", microns_per_pixel=4.0)
    px = _level0(sdata.images[next(iter(sdata.images))])
    np.testing.assert_allclose(_halves(px)[0], PINK, atol=3)

    img = _noise(400, 500)
    tifffile.imwrite(tmp_path / "wsi.tif", img.astype(np.uint16) * 257, photometric="rgb", tile=(128, 128))
    a = _adata(400, 500)
    a.write_h5ad(tmp_path / "H1.h5ad")
    sdata = hx.io.read_hest(tmp_path / "H1.h5ad", tmp_path / "wsi.tif", microns_per_pixel=0.5, spot_diameter_um=4.0)
    np.testing.assert_array_equal(_level0(sdata.images["H1_image"]), img)  # full 16-bit range: /257


@pytest.mark.realdata
def test_read_visium_fullres_cmyk_jpeg(shared_data, tmp_path):
    """The Visium full-resolution image goes through the same decoder (it was read by spatialdata-io before)."""
    src = shared_data / "visium_outs_fixture"
    outs = tmp_path / "cm" / "outs"
    (outs / "spatial").mkdir(parents=True)
    shutil.copy(src / "filtered_feature_bc_matrix.h5", outs)
    pos = pd.read_csv(src / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    pos.columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] = (pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]] // 8).astype(
        int
    )
    pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False)
    scalef = json.loads((src / "spatial" / "scalefactors_json.json").read_text())
    scalef = {k: v * 8 if k.endswith("scalef") else v / 8 for k, v in scalef.items()}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalef))
    side = (int(pos[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy().max()) + 50) // 16 * 16
    Image.fromarray(_rgb(side, side)).convert("CMYK").save(tmp_path / "full.jpg", quality=95)
    sdata = hx.io.read_visium(outs, fullres_image=tmp_path / "full.jpg")
    left, right = _halves(_level0(sdata.images["cm_full_image"]))
    np.testing.assert_allclose(left, PINK, atol=3)
    np.testing.assert_allclose(right, PURPLE, atol=3)


# ----------------------------------------------------------------------------- spots outside the image


def _sample(h: int = 64, w: int = 96):
    return hx.io.from_anndata(_adata(h, w), _rgb(h, w), microns_per_pixel=0.5, spot_diameter_um=4.0)


def test_spots_entirely_outside_the_image_are_an_error():
    """Before: white patches (and constant predictions), no warning. After: an error with the count and extent."""
    sdata = _sample()
    table = sdata.tables["table"]
    xy = table.obsm["spatial"].copy()
    xy[:3] += 1000.0  # three spots moved far off the 96 x 64 px image
    table.obsm["spatial"] = xy
    with pytest.raises(
        ValueError, match=r"3 of 15 spots .* entirely outside the image 'sample_image' \(x 0 to 96, y 0 to 64"
    ):
        hx.pp.extract_patches(sdata, size=16)


def test_spots_partly_outside_warn_with_the_count(caplog):
    """Patches crossing the edge: a warning with the count at build time and at patch extraction; padded white."""
    a = _adata()
    xy = a.obsm["spatial"].copy()
    xy[0] = (1.0, 1.0)  # centre inside, circle (radius 4 px) and patch (16 px) cross the corner
    xy[1] = (94.5, 30.0)
    a.obsm["spatial"] = xy
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        sdata = hx.io.from_anndata(a, _rgb(), microns_per_pixel=0.5, spot_diameter_um=4.0)
    assert "2 of 15 spots lie partly outside the image (96 x 64 px" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        patches = hx.pp.extract_patches(sdata, patch_um=8.0, size=16)  # 8 µm = 16 px at 0.5 µm/px: no resampling
    assert "2 of 15 spots of 'sample' have their 8 µm patches partly outside" in caplog.text
    corner = patches[0]
    assert (corner[:7, :, :] == 255).all() and (corner[:, :7, :] == 255).all()  # padded with white glass
    np.testing.assert_array_equal(corner[7:, 7:], np.broadcast_to(PINK, (9, 9, 3)))
    inside = patches[5]
    assert not (inside == 255).all(axis=-1).any()
