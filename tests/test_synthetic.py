"""hx.datasets.synthetic: contract, determinism, and an image -> expression law that is real and learnable."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import hespotex as hx
from hespotex._sample import get_sample_info, spot_centres
from hespotex.datasets._synthetic import FEATURES

N_LEARN = 500  # spots per section in the learnability tests


def _image(sdata) -> np.ndarray:
    """Full-resolution image of a sample as (height, width, 3) uint8."""
    from spatialdata import get_pyramid_levels
    from xarray import DataArray

    element = sdata.images[get_sample_info(sdata).image_key]
    level0 = element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)
    return np.asarray(level0.values).transpose(1, 2, 0)


def _pixel_stats(sdata) -> np.ndarray:
    """Simple statistics of the pixels under each spot, straight from the image (no generator internals)."""
    info = get_sample_info(sdata)
    image = _image(sdata).astype(np.float32)
    radius = info.spot_diameter_px / 2.0
    h = int(np.ceil(radius))
    dy, dx = np.mgrid[-h : h + 1, -h : h + 1]
    disc = dx**2 + dy**2 <= radius**2
    dy, dx = dy[disc], dx[disc]
    xy = np.round(spot_centres(sdata)).astype(int)
    px = image[xy[:, 1, None] + dy[None, :], xy[:, 0, None] + dx[None, :]]  # (spots, pixels, rgb)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    return np.column_stack(
        [
            px.mean(axis=1),
            px.std(axis=1),
            (px.sum(axis=2) < 400).mean(axis=1),  # dark (nuclear) pixels
            (b - g > 40).mean(axis=1),  # purple: haematoxylin
            (r - g > 70).mean(axis=1),  # deep pink: eosin-rich fibres
        ]
    )


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


def _ridge_pearson(x_train, y_train, x_test, y_test) -> np.ndarray:
    model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x_train, y_train)
    return _pearson(model.predict(x_test), y_test)


@pytest.fixture(scope="module")
def small():
    return hx.datasets.synthetic(60, 40, seed=0)


@pytest.fixture(scope="module")
def pair():
    """Two sections sharing one image -> expression law (same program_seed), different tissue (seed)."""
    train = hx.datasets.synthetic(N_LEARN, 200, seed=0, program_seed=0)
    test = hx.datasets.synthetic(N_LEARN, 200, seed=1, program_seed=0)
    return train, test


def test_sample_contract(small):
    table = small.tables["table"]
    info = get_sample_info(small)
    assert (info.sample_id, info.coordinate_system) == ("synthetic_0", "synthetic_0")
    assert info.microns_per_pixel == 2.0 and info.spot_diameter_um == 55.0
    assert info.image_key in small.images and info.shapes_key in small.shapes
    image = _image(small)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert list(image.shape[:2]) == list(table.uns["synthetic"]["image_shape"])
    # every spot, with a patch of two spot diameters around it, lies inside the image
    xy = spot_centres(small)
    half = info.spot_diameter_px
    assert (xy[:, 0] - half >= 0).all() and (xy[:, 0] + half < image.shape[1]).all()
    assert (xy[:, 1] - half >= 0).all() and (xy[:, 1] + half < image.shape[0]).all()
    # spots sit on stained tissue: under each spot the pixels are darker than the glass around the section
    glass = image[:5, :5].reshape(-1, 3).astype(float).sum(axis=1).mean()
    assert (_pixel_stats(small)[:, :3].sum(axis=1) < glass - 30).all()
    assert table.shape == (60, 40)
    x = table.X.toarray()
    assert np.array_equal(x, np.round(x)) and (x >= 0).all() and x.sum() > 0
    assert table.obsm["synthetic_features"].shape == (60, len(FEATURES))
    assert np.isfinite(table.obsm["synthetic_features"]).all()
    assert table.layers["expected"].shape == (60, 40) and (table.layers["expected"] > 0).all()
    driven = table.var["image_driven"].to_numpy()
    assert driven.dtype == bool and driven.sum() == 32  # 0.8 of 40 genes
    # genes without image signal: no loadings, and a noiseless mean that is the same at every spot
    assert (table.varm["synthetic_loadings"][~driven] == 0).all()
    expected = table.layers["expected"]
    assert np.allclose(expected[:, ~driven], expected[:1, ~driven], rtol=1e-6)
    assert (expected[:, driven].std(axis=0) > 0).all()
    params = table.uns["synthetic"]["params"]
    assert params["seed"] == 0 and params["n_spots"] == 60 and params["layout"] == "hex"
    assert list(table.uns["synthetic"]["feature_names"]) == list(FEATURES)
    assert set(table.obs["synthetic_domain"].cat.categories) == {"tumour", "immune", "stroma"}


def test_same_arguments_same_section(small):
    again = hx.datasets.synthetic(60, 40, seed=0)
    a, b = small.tables["table"], again.tables["table"]
    assert np.array_equal(_image(small), _image(again))
    assert np.array_equal(a.X.toarray(), b.X.toarray())
    assert np.array_equal(a.layers["expected"], b.layers["expected"])
    assert np.array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert np.array_equal(a.obsm["synthetic_features"], b.obsm["synthetic_features"])


def test_seed_changes_the_section_program_seed_the_law(small):
    other = hx.datasets.synthetic(60, 40, seed=1)
    a, b = small.tables["table"], other.tables["table"]
    # a different tissue outline: the spots occupy other grid positions, the image differs
    grid_a = set(map(tuple, a.obs[["array_row", "array_col"]].to_numpy()))
    grid_b = set(map(tuple, b.obs[["array_row", "array_col"]].to_numpy()))
    assert grid_a != grid_b
    assert _image(small).shape != _image(other).shape or not np.array_equal(_image(small), _image(other))
    assert not np.allclose(a.obsm["synthetic_features"], b.obsm["synthetic_features"])
    # the same law
    assert a.var.equals(b.var)
    assert np.array_equal(a.varm["synthetic_loadings"], b.varm["synthetic_loadings"])
    for key in ("program_weights", "program_bias", "program_centre", "program_scale"):
        assert np.array_equal(a.uns["synthetic"][key], b.uns["synthetic"][key])
    # a different law
    new_law = hx.datasets.synthetic(20, 40, seed=0, program_seed=1).tables["table"]
    assert not np.array_equal(a.uns["synthetic"]["program_weights"], new_law.uns["synthetic"]["program_weights"])
    assert not np.array_equal(a.var["image_driven"], new_law.var["image_driven"])


def test_expected_is_the_stored_law_applied_to_the_features():
    sdata = hx.datasets.synthetic(80, 30, seed=2, smoothing=0.0)
    table = sdata.tables["table"]
    law = table.uns["synthetic"]
    z = (table.obsm["synthetic_features"].astype(float) - law["feature_centre"]) / law["feature_scale"]
    programs = np.logaddexp(0.0, z @ law["program_weights"].T + law["program_bias"]) - law["program_centre"]
    programs /= law["program_scale"]
    log_mean = np.log(table.var["baseline_mean"].to_numpy()) + programs @ table.varm["synthetic_loadings"].T
    assert np.allclose(table.layers["expected"], np.exp(log_mean), rtol=1e-4)
    # with smoothing, a spot's signal mixes its neighbours' but stays close to its own
    smooth = hx.datasets.synthetic(80, 30, seed=2).tables["table"]
    driven = smooth.var["image_driven"].to_numpy()
    log_smooth = np.log(smooth.layers["expected"][:, driven])
    assert not np.allclose(log_smooth, log_mean[:, driven], atol=1e-3)
    assert np.median(_pearson(log_smooth, log_mean[:, driven])) > 0.9


@pytest.mark.parametrize("layout", ["hex", "square", "random"])
def test_layouts(layout):
    from scipy.spatial import cKDTree

    sdata = hx.datasets.synthetic(90, 10, seed=3, layout=layout, spacing_um=100.0)
    table = sdata.tables["table"]
    assert table.n_obs == 90
    xy_um = spot_centres(sdata) * get_sample_info(sdata).microns_per_pixel
    dist, _ = cKDTree(xy_um).query(xy_um, k=2)
    nearest = dist[:, 1]
    if layout == "random":
        assert nearest.std() > 5.0  # jittered: neighbour distances vary
    else:
        assert np.allclose(nearest, 100.0)
        if layout == "hex":  # six neighbours at one spacing for interior spots
            counts = np.array([len(n) - 1 for n in cKDTree(xy_um).query_ball_point(xy_um, 101.0)])
            assert counts.max() == 6


def test_features_are_physical_not_pixel_units():
    """Nuclei live in µm: the same section rendered at another resolution has the same nuclear features."""
    coarse = hx.datasets.synthetic(40, 10, seed=4, microns_per_pixel=2.0).tables["table"]
    fine = hx.datasets.synthetic(40, 10, seed=4, microns_per_pixel=1.0).tables["table"]
    fc, ff = coarse.obsm["synthetic_features"], fine.obsm["synthetic_features"]
    assert np.array_equal(fc[:, :5], ff[:, :5])
    # stain maps are re-rendered on the other pixel grid: cytoplasm eosin barely moves; the fibre
    # streaks are a new random texture over the same fibre field
    assert np.allclose(fc[:, 5], ff[:, 5], atol=0.03)
    assert np.corrcoef(fc[:, 6], ff[:, 6])[0, 1] > 0.5
    assert np.allclose(fine.obsm["spatial"], 2.0 * coarse.obsm["spatial"])


def test_count_model():
    """Without hidden noise, library-size variation or overdispersion, counts are Poisson around `expected`."""
    table = hx.datasets.synthetic(200, 50, seed=5, noise=0.0, library_sd=0.0, dispersion=0.0).tables["table"]
    x, mu = table.X.toarray(), table.layers["expected"].astype(float)
    assert np.allclose(table.obs["synthetic_library_factor"], 1.0)
    assert abs(x.sum() / mu.sum() - 1.0) < 0.02
    # Pearson residuals of Poisson counts have unit variance
    assert abs(((x - mu) ** 2 / mu).mean() - 1.0) < 0.05
    # overdispersed counts spread more
    nb = hx.datasets.synthetic(200, 50, seed=5, noise=0.0, library_sd=0.0, dispersion=0.5).tables["table"]
    assert ((nb.X.toarray() - mu) ** 2 / mu).mean() > 1.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout"):
        hx.datasets.synthetic(10, 5, layout="spiral")
    with pytest.raises(ValueError, match="image_driven_fraction"):
        hx.datasets.synthetic(10, 5, image_driven_fraction=1.5)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        hx.datasets.synthetic(10, 5, spot_diameter_um=5.0, microns_per_pixel=2.0)
    with pytest.raises(ValueError, match="noise"):
        hx.datasets.synthetic(10, 5, noise=-1.0)


def test_features_are_visible_in_the_pixels(pair):
    """Each latent feature is measured on the pixels: simple pixel statistics recover it on another section."""
    train, test = pair
    r = _ridge_pearson(
        _pixel_stats(train),
        train.tables["table"].obsm["synthetic_features"],
        _pixel_stats(test),
        test.tables["table"].obsm["synthetic_features"],
    )
    assert (r > 0.5).all(), dict(zip(FEATURES, r.round(2), strict=True))


def test_image_law_is_learnable_from_pixels(pair):
    """Fit pixel statistics -> log1p counts on section seed=0, evaluate on section seed=1 (same law).

    Margins follow from the generative law, not from tuning:
    - ``ceiling``: the Pearson the true noiseless mean reaches on the test counts (a perfect model);
    - a linear model on the true features comes close to it (the law is a softplus of linear
      combinations, mildly non-linear);
    - genes without image signal are independent of the image, so their Pearson is 0 with a standard
      error of 1/sqrt(n) (3 standard errors allowed);
    - shuffling the training features breaks the image -> expression link: the expected Pearson is 0,
      but one permutation yields a random linear read-out of informative test pixels, which
      correlates by chance with about (pixel-model Pearson) / sqrt(number of statistics) ~ 0.1; the
      mean of 8 permutations is held within 0.1 of 0;
    - a model on pixel statistics must beat that control by at least half of the ceiling.
    """
    train, test = pair
    ta, tb = train.tables["table"], test.tables["table"]
    driven = ta.var["image_driven"].to_numpy()
    assert np.array_equal(driven, tb.var["image_driven"].to_numpy())
    ya, yb = np.log1p(ta.X.toarray()), np.log1p(tb.X.toarray())
    pa, pb = _pixel_stats(train), _pixel_stats(test)

    ceiling = _pearson(np.log(tb.layers["expected"][:, driven]), yb[:, driven]).mean()
    truth = _ridge_pearson(ta.obsm["synthetic_features"], ya, tb.obsm["synthetic_features"], yb)
    pixels = _ridge_pearson(pa, ya, pb, yb)
    rng = np.random.default_rng(0)
    control = np.mean([_ridge_pearson(pa[rng.permutation(len(pa))], ya, pb, yb)[driven].mean() for _ in range(8)])

    assert ceiling > 0.4  # the default noise leaves a clear signal to learn
    assert truth[driven].mean() > 0.8 * ceiling
    assert abs(control) < 0.1
    assert pixels[driven].mean() - control > 0.5 * ceiling
    assert abs(pixels[~driven].mean()) < 3.0 / np.sqrt(N_LEARN)  # no image signal where the law puts none


def test_writes_and_reads_back(small, tmp_path):
    import spatialdata as sd

    path = tmp_path / "synthetic.zarr"
    small.write(path)
    back = sd.read_zarr(path)
    table = back.tables["table"]
    assert table.uns["synthetic"]["params"]["seed"] == 0
    assert np.array_equal(table.layers["expected"], small.tables["table"].layers["expected"])
    assert np.array_equal(_image(back), _image(small))
