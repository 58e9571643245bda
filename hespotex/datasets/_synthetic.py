"""Synthetic tissue sections whose expression is a known function of what the H&E image shows.

The generator works in three stages, each seeded on its own so that the *law* linking image to
expression can be shared between sections that differ in everything else:

1. **Tissue** (``seed``). Smooth Gaussian random fields set, at every point of the section, the
   tissue composition (tumour nests, immune infiltrate, stroma), the cell density, the nucleus size
   and haematoxylin darkness, the eosin intensity of the cytoplasm, and the amount and orientation
   of stroma fibres. Nuclei are scattered from these fields (an inhomogeneous Poisson process),
   each with a type, size, shape, orientation and stain, and the section is rendered by
   Beer-Lambert stain mixing: purple haematoxylin nuclei on pink eosin cytoplasm with oriented
   collagen fibres, and near-white glass around the tissue.
2. **Image features** (``seed``). Under each spot (the disc of one spot diameter) the generator
   measures what the pixels show: nuclear density, mean nucleus area, the fraction of tumour-like
   and of lymphocyte-like nuclei, mean nuclear haematoxylin, mean cytoplasmic eosin and fibre
   density (:data:`FEATURES`). They are stored in ``obsm["synthetic_features"]``.
3. **Expression** (``program_seed``). ``n_programs`` gene programs are mildly non-linear functions
   (softplus of a linear combination, standardised) of the standardised features; each
   image-driven gene loads on one or two programs. Its log mean is a gene baseline plus the program signal, smoothed over
   neighbouring spots (``smoothing``), plus spatially smooth noise that no image shows (``noise``),
   times a per-spot library size; counts are negative binomial (Poisson with ``dispersion=0``).
   A fraction ``1 - image_driven_fraction`` of genes carries no image signal at all
   (``var["image_driven"]`` is ``False``): their expression is baseline, noise and library size only.

Sections built with different ``seed`` and the same ``program_seed`` (and the same ``n_genes``,
``n_programs`` and ``image_driven_fraction``) share one image -> expression law: train on one,
test on another.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

__all__ = ["FEATURES", "synthetic"]

#: Names of the per-spot image features, the columns of ``obsm["synthetic_features"]``.
FEATURES: tuple[str, ...] = (
    "nuclear_density",  # nuclei per 1000 µm² inside the spot
    "nucleus_area",  # mean nucleus area, µm²
    "tumour_fraction",  # fraction of nuclei that are tumour-like (large, pleomorphic, paler)
    "immune_fraction",  # fraction of nuclei that are lymphocyte-like (small, round, dark)
    "haematoxylin",  # mean haematoxylin optical density of the nuclei
    "eosin",  # mean eosin optical density of the cytoplasm (fibres excluded)
    "fibre",  # mean eosin optical density added by stroma fibres
)
# Fixed centring and scaling of the features (typical value, typical spread) so that the law does
# not depend on the section it is applied to.
_FEATURE_CENTRE = np.array([7.5, 40.0, 0.45, 0.25, 1.05, 0.4, 0.07])
_FEATURE_SCALE = np.array([4.5, 20.0, 0.4, 0.33, 0.2, 0.13, 0.085])

# Stain vectors: optical density per unit concentration (R, G, B), unit length.
_HAEMATOXYLIN = np.array([0.62, 0.74, 0.26])
_EOSIN = np.array([0.16, 0.86, 0.48])
_GLASS_OD = 0.04

# Cell types: relative nuclear density (nuclei per 1000 µm²), semi-axes (µm), haematoxylin OD.
_TYPES = ("tumour", "immune", "stroma")
_DENSITY = np.array([9.0, 20.0, 2.5])
_SEMI_MAJOR = np.array([4.6, 2.7, 5.0])
_SEMI_MINOR = np.array([3.6, 2.5, 1.5])
_HAEM = np.array([0.85, 1.35, 1.05])

_FIELD_CELL_UM = 10.0  # resolution of the tissue fields before they are rendered at pixel scale


def synthetic(
    n_spots: int = 400,
    n_genes: int = 200,
    *,
    seed: int = 0,
    program_seed: int = 0,
    layout: Literal["hex", "square", "random"] = "hex",
    spot_diameter_um: float = 55.0,
    spacing_um: float = 100.0,
    microns_per_pixel: float = 2.0,
    n_programs: int = 4,
    image_driven_fraction: float = 0.8,
    noise: float = 0.3,
    noise_scale_um: float = 150.0,
    smoothing: float = 40.0,
    depth: float = 2000.0,
    library_sd: float = 0.3,
    dispersion: float = 0.1,
    domain_size_um: float = 400.0,
    sample_id: str | None = None,
) -> SpatialData:
    """A synthetic tissue section whose expression is a known function of its H&E image.

    See the module docstring for the generative model. Same arguments, same section (image and
    counts, bit for bit).

    Parameters
    ----------
    n_spots
        Number of spots.
    n_genes
        Number of genes.
    seed
        Seed of the section: spot layout, tissue, image, noise and counts.
    program_seed
        Seed of the image -> expression law (gene baselines, programs, loadings, which genes are
        image-driven). Sections sharing it share the law.
    layout
        ``"hex"`` (Visium-like hexagonal grid), ``"square"`` (legacy ST grid) or ``"random"``
        (hexagonal grid positions jittered by up to a third of the spacing). The tissue outline is
        a random blob that changes with ``seed``.
    spot_diameter_um
        Spot diameter in µm; features are measured on the disc under each spot.
    spacing_um
        Centre-to-centre distance of neighbouring spots in µm.
    microns_per_pixel
        Resolution of the rendered image. Nuclei are a few µm wide, so values above ~2 blur them away.
    n_programs
        Number of gene programs (functions of the image features) genes load on.
    image_driven_fraction
        Fraction of genes whose expression depends on the image; the rest carry no image signal.
    noise
        Standard deviation (log scale) of the spatially smooth per-gene noise that no image shows.
    noise_scale_um
        Length scale (µm) of that noise; ``0`` gives independent noise per spot.
    smoothing
        Standard deviation (µm) of the Gaussian weights with which a spot's image signal is
        averaged with its neighbours' (expression at a spot depends on its surroundings); ``0``
        keeps it purely local.
    depth
        Total counts per spot (over all genes) with every gene program at its centre, average library
        size and no noise. The image signal is skewed upwards on the count scale, so observed totals
        are typically 1-1.5 times ``depth``.
    library_sd
        Standard deviation of the log library-size factor of each spot (independent of the image).
    dispersion
        Negative-binomial dispersion ``phi`` (variance ``mu + phi * mu**2``); ``0`` gives Poisson counts.
    domain_size_um
        Typical size (µm) of tissue domains (tumour nests, infiltrates, stain variation).
    sample_id
        Sample id and coordinate system name; ``f"synthetic_{seed}"`` when ``None``.

    Returns
    -------
    A sample (:func:`hespotex.io.build_sample`): image ``{sample_id}_image`` (uint8 RGB), spot circles
    ``{sample_id}_spots`` and the table ``"table"`` with

    - ``X``: raw integer counts (CSR);
    - ``obsm["spatial"]``: spot centres (x = column, y = row) in pixels of the image; every spot
      lies at least two spot diameters from the image border;
    - ``obsm["synthetic_features"]``: the measured image features (:data:`FEATURES`, in their
      natural units, ``float32``);
    - ``layers["expected"]``: the noiseless mean counts (baseline and image signal at average
      library size, without the hidden noise, library-size variation and count noise);
    - ``obs["array_row"]``, ``obs["array_col"]``: grid indices (of the unjittered grid for ``"random"``);
    - ``obs["synthetic_library_factor"]``: the library-size factor of each spot;
    - ``obs["synthetic_domain"]``: the dominant cell type under each spot;
    - ``var["image_driven"]``: whether the gene depends on the image; ``var["baseline_mean"]``;
    - ``varm["synthetic_loadings"]``: gene loadings on the programs (zero for genes without image signal);
    - ``uns["synthetic"]``: every parameter (``"params"``), the feature names, centring and scaling,
      and the program weights, biases, centring and scaling: with ``varm["synthetic_loadings"]`` and
      ``var["baseline_mean"]``, the whole law (``uns["synthetic"]["description"]`` spells it out);
    - ``uns["hespotex_sample"]``: the sample info.
    """
    from hespotex.io._build import build_sample

    _check_args(
        n_spots=n_spots,
        n_genes=n_genes,
        layout=layout,
        spot_diameter_um=spot_diameter_um,
        spacing_um=spacing_um,
        microns_per_pixel=microns_per_pixel,
        n_programs=n_programs,
        image_driven_fraction=image_driven_fraction,
        noise=noise,
        noise_scale_um=noise_scale_um,
        smoothing=smoothing,
        depth=depth,
        library_sd=library_sd,
        dispersion=dispersion,
        domain_size_um=domain_size_um,
    )
    params: dict[str, Any] = {
        "n_spots": int(n_spots),
        "n_genes": int(n_genes),
        "seed": int(seed),
        "program_seed": int(program_seed),
        "layout": layout,
        "spot_diameter_um": float(spot_diameter_um),
        "spacing_um": float(spacing_um),
        "microns_per_pixel": float(microns_per_pixel),
        "n_programs": int(n_programs),
        "image_driven_fraction": float(image_driven_fraction),
        "noise": float(noise),
        "noise_scale_um": float(noise_scale_um),
        "smoothing": float(smoothing),
        "depth": float(depth),
        "library_sd": float(library_sd),
        "dispersion": float(dispersion),
        "domain_size_um": float(domain_size_um),
    }
    sid = f"synthetic_{seed}" if sample_id is None else str(sample_id)
    params["sample_id"] = sid
    rng_layout, rng_fields, rng_cells, rng_pixels, rng_counts = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 0x5EC7]).spawn(5)
    )
    rng_programs, rng_genes = (
        np.random.default_rng(s) for s in np.random.SeedSequence([int(program_seed), 0x1A3]).spawn(2)
    )

    # 1. spots and image geometry (µm; the image origin is the top-left corner)
    spots_um, array_rc = _layout(n_spots, layout, spacing_um, rng_layout)
    pad_um = 2.0 * spot_diameter_um + 0.5 * spacing_um
    spots_um = spots_um - spots_um.min(axis=0) + pad_um
    extent_um = spots_um.max(axis=0) + pad_um  # (x, y)
    width = math.ceil(extent_um[0] / microns_per_pixel)
    height = math.ceil(extent_um[1] / microns_per_pixel)

    # 2. tissue fields, nuclei and the image
    fields = _tissue_fields(spots_um, extent_um, spot_diameter_um, spacing_um, domain_size_um, rng_fields)
    nuclei = _nuclei(fields, rng_cells)
    image, maps = _render(fields, nuclei, height, width, microns_per_pixel, rng_pixels)

    # 3. image features under each spot, and the expression law applied to them
    features, dominant = _spot_features(spots_um, spot_diameter_um, nuclei, maps, microns_per_pixel, fields)
    law = _law(n_genes, n_programs, image_driven_fraction, rng_programs, rng_genes)
    signal = _image_signal(features, law)
    weights = _gaussian_weights(spots_um, smoothing, normalise="sum")
    if weights is not None:
        signal = weights @ signal
    log_expected = np.log(depth) + law["log_baseline"][None, :] + signal
    expected = np.exp(log_expected)
    hidden = _spatial_noise(spots_um, n_genes, noise_scale_um, rng_counts) * noise
    library = np.exp(library_sd * rng_counts.standard_normal(n_spots) - 0.5 * library_sd**2)
    mu = expected * np.exp(hidden) * library[:, None]
    counts = _sample_counts(mu, dispersion, rng_counts)

    # 4. the sample
    obs_names = [f"spot_{i:05d}" for i in range(n_spots)]
    obs = pd.DataFrame(
        {
            "array_row": array_rc[:, 0].astype(np.int64),
            "array_col": array_rc[:, 1].astype(np.int64),
            "synthetic_library_factor": library.astype(np.float32),
            "synthetic_domain": pd.Categorical(np.asarray(_TYPES)[dominant], categories=list(_TYPES)),
        },
        index=pd.Index(obs_names),
    )
    var = pd.DataFrame(
        {
            "image_driven": law["image_driven"],
            "baseline_mean": (depth * np.exp(law["log_baseline"])).astype(np.float32),
        },
        index=pd.Index([f"gene_{g:04d}" for g in range(n_genes)]),
    )
    centres_px = spots_um / microns_per_pixel
    uns = {
        "synthetic": {
            "params": params,
            "feature_names": list(FEATURES),
            "feature_centre": _FEATURE_CENTRE.copy(),
            "feature_scale": _FEATURE_SCALE.copy(),
            "program_weights": law["program_weights"],
            "program_bias": law["program_bias"],
            "program_centre": law["program_centre"],
            "program_scale": law["program_scale"],
            "n_nuclei": len(nuclei["x"]),
            "image_shape": [height, width],
            "description": (
                "log expected = log(depth) + log_baseline + smoothing(loadings @ ((softplus(program_weights @ "
                "z + program_bias) - program_centre) / program_scale)), z = (features - feature_centre) / "
                "feature_scale; loadings in varm['synthetic_loadings'], log(depth) + log_baseline = "
                "log(var['baseline_mean'])"
            ),
        }
    }
    sdata = build_sample(
        image,
        centres_px,
        sp.csr_matrix(counts),
        obs=obs,
        var=var,
        sample_id=sid,
        microns_per_pixel=microns_per_pixel,
        spot_diameter_um=spot_diameter_um,
        counts=True,
        uns=uns,
        obsm={"synthetic_features": features.astype(np.float32)},
    )
    table = sdata.tables["table"]
    table.layers["expected"] = expected.astype(np.float32)
    table.varm["synthetic_loadings"] = law["loadings"].astype(np.float32)
    logger.debug(
        "synthetic section %s: %d spots, %d genes, image %d x %d px, %d nuclei",
        sid,
        n_spots,
        n_genes,
        width,
        height,
        len(nuclei["x"]),
    )
    return sdata


# --------------------------------------------------------------------------------------------------
# checks


def _check_args(**kw: Any) -> None:
    if int(kw["n_spots"]) < 1 or int(kw["n_genes"]) < 1 or int(kw["n_programs"]) < 1:
        msg = (
            f"Expected n_spots, n_genes and n_programs >= 1, found {kw['n_spots']}, {kw['n_genes']}, "
            f"{kw['n_programs']}."
        )
        raise ValueError(msg)
    if kw["layout"] not in ("hex", "square", "random"):
        msg = f"Expected layout 'hex', 'square' or 'random', found {kw['layout']!r}."
        raise ValueError(msg)
    positive = ("spot_diameter_um", "spacing_um", "microns_per_pixel", "depth", "domain_size_um")
    for name in positive:
        if not (np.isfinite(kw[name]) and kw[name] > 0):
            msg = f"Expected a positive {name}, found {kw[name]!r}."
            raise ValueError(msg)
    for name in ("noise", "noise_scale_um", "smoothing", "library_sd", "dispersion"):
        if not (np.isfinite(kw[name]) and kw[name] >= 0):
            msg = f"Expected {name} >= 0, found {kw[name]!r}."
            raise ValueError(msg)
    if not 0.0 <= kw["image_driven_fraction"] <= 1.0:
        msg = f"Expected image_driven_fraction within [0, 1], found {kw['image_driven_fraction']!r}."
        raise ValueError(msg)
    if kw["spot_diameter_um"] / kw["microns_per_pixel"] < 4:
        msg = (
            f"A spot of {kw['spot_diameter_um']} µm is only {kw['spot_diameter_um'] / kw['microns_per_pixel']:.1f} px "
            f"at {kw['microns_per_pixel']} µm/px; expected at least 4 px. Lower `microns_per_pixel`."
        )
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------------
# layout


def _layout(n: int, layout: str, spacing: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` spot centres (µm, x/y) inside a random blob-shaped tissue outline, and their (row, col)."""
    side = math.ceil(math.sqrt(3.0 * n)) + 4
    rows, cols = np.mgrid[0:side, 0:side]
    rows, cols = rows.ravel(), cols.ravel()
    if layout == "square":
        x, y = cols * spacing, rows * spacing
        array_col = cols
    else:
        x = (cols + 0.5 * (rows % 2)) * spacing
        y = rows * spacing * math.sqrt(3.0) / 2.0
        array_col = 2 * cols + rows % 2  # Visium convention: doubled columns on a hexagonal grid
    xy = np.stack([x, y], axis=1).astype(np.float64)
    xy -= xy.mean(axis=0)
    # random star-shaped outline: an ellipse with a few low harmonics
    aspect = math.exp(rng.uniform(-0.35, 0.35))
    tilt = rng.uniform(0, math.pi)
    c, s = math.cos(tilt), math.sin(tilt)
    u = (c * xy[:, 0] + s * xy[:, 1]) / math.sqrt(aspect)
    v = (-s * xy[:, 0] + c * xy[:, 1]) * math.sqrt(aspect)
    phi = np.arctan2(v, u)
    radius = np.ones_like(phi)
    for k in (2, 3, 4, 5):
        radius += rng.normal(0.0, 0.12 / k**0.5) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    score = np.hypot(u, v) / np.clip(radius, 0.5, None) + rng.uniform(0, 1e-3 * spacing, len(phi))
    keep = np.sort(np.argsort(score, kind="stable")[:n])
    xy, rc = xy[keep], np.stack([rows[keep], array_col[keep]], axis=1)
    if layout == "random":
        xy = xy + rng.uniform(-spacing / 3.0, spacing / 3.0, size=xy.shape)
    return xy, rc


# --------------------------------------------------------------------------------------------------
# tissue


class _Fields:
    """Tissue fields on a regular grid of ``_FIELD_CELL_UM`` cells covering the section."""

    def __init__(self, extent_um: np.ndarray) -> None:
        self.cell = _FIELD_CELL_UM
        self.shape = (math.ceil(extent_um[1] / self.cell) + 1, math.ceil(extent_um[0] / self.cell) + 1)
        self.maps: dict[str, np.ndarray] = {}

    def at(self, name: str, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Bilinear value of a field at points (µm)."""
        from scipy.ndimage import map_coordinates

        coords = np.stack([y_um / self.cell - 0.5, x_um / self.cell - 0.5])
        return map_coordinates(self.maps[name], coords, order=1, mode="nearest")

    def to_pixels(self, name: str, height: int, width: int, mpp: float) -> np.ndarray:
        """The field resampled (bilinear, separable) on the pixel grid, ``float32``."""
        grid = self.maps[name].astype(np.float32)
        x0, wx = _interp_index((np.arange(width) + 0.5) * mpp / self.cell - 0.5, grid.shape[1])
        cols = grid[:, x0] * (1 - wx) + grid[:, x0 + 1] * wx  # (grid rows, width): small
        y0, wy = _interp_index((np.arange(height) + 0.5) * mpp / self.cell - 0.5, grid.shape[0])
        out = cols[y0]
        out *= (1 - wy)[:, None]
        out += cols[y0 + 1] * wy[:, None]
        return out


def _interp_index(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.clip(pos, 0, n - 1.000001)
    i0 = np.floor(pos).astype(np.int64)
    return i0, (pos - i0).astype(np.float32)


def _grf(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    """A Gaussian random field of unit variance and Gaussian correlation (``sigma_cells`` kernel)."""
    from scipy.ndimage import gaussian_filter

    white = rng.standard_normal(shape)
    field = gaussian_filter(white, sigma=sigma_cells, mode="reflect", truncate=3.0)
    return field * (2.0 * math.sqrt(math.pi) * max(sigma_cells, 0.5))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _tissue_fields(
    spots_um: np.ndarray,
    extent_um: np.ndarray,
    spot_diameter: float,
    spacing: float,
    domain_size: float,
    rng: np.random.Generator,
) -> _Fields:
    """Composition, density, size, stain and fibre fields of the section, and its tissue mask."""
    from scipy.ndimage import binary_fill_holes, distance_transform_edt, gaussian_filter
    from scipy.spatial import cKDTree

    f = _Fields(extent_um)
    shape = f.shape
    big = domain_size / 3.0 / f.cell  # kernel sigma (cells) of domain-scale fields
    small = min(30.0, domain_size / 6.0) / f.cell
    # composition: tumour nests with irregular borders, immune infiltrate, stroma in between
    g_tumour = _grf(rng, shape, big) + 0.35 * _grf(rng, shape, small)
    g_immune = _grf(rng, shape, big * 0.7) + 0.3 * _grf(rng, shape, small)
    tumour = _sigmoid(4.0 * (g_tumour - 0.2))
    immune = _sigmoid(3.5 * (g_immune - 0.9)) * (1.0 - tumour)
    stroma = 1.0 - tumour - immune
    f.maps["w_tumour"], f.maps["w_immune"], f.maps["w_stroma"] = tumour, immune, stroma
    # per-type modulations
    f.maps["density_mod"] = np.exp(0.2 * _grf(rng, shape, big))
    f.maps["size_mod"] = np.exp(0.18 * _grf(rng, shape, big))
    f.maps["haem_mod"] = np.exp(0.18 * _grf(rng, shape, big))
    # cytoplasm eosin: stain variation, less cytoplasm where lymphocytes pack tightly
    # (paler in stroma, where collagen fibres carry the eosin)
    f.maps["eosin"] = 0.5 * np.exp(0.25 * _grf(rng, shape, big)) * (1.0 - 0.35 * immune) * (1.0 - 0.45 * stroma)
    # fibres: stroma only, in varying amounts; orientation from two smooth fields
    f.maps["fibre"] = 0.4 * stroma * _sigmoid(2.5 * _grf(rng, shape, big) + 1.0)
    a, b = _grf(rng, shape, big * 0.6), _grf(rng, shape, big * 0.6)
    f.maps["theta"] = 0.5 * np.arctan2(a, b)  # fibre orientation, radians in (-pi/2, pi/2]
    f.maps["cos2"], f.maps["sin2"] = np.cos(2 * f.maps["theta"]), np.sin(2 * f.maps["theta"])
    # tissue: the spots' neighbourhood with a smooth, wobbly outline; every spot's disc is inside
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres = np.stack([(xx.ravel() + 0.5) * f.cell, (yy.ravel() + 0.5) * f.cell], axis=1)
    dist = cKDTree(spots_um).query(centres, workers=-1)[0].reshape(shape)
    near = gaussian_filter((dist <= spacing).astype(float), sigma=0.5 * spacing / f.cell)
    wobble = _grf(rng, shape, max(1.0, 1.5 * spacing / f.cell))
    mask = (near - 0.5 + 0.12 * wobble > 0) | (dist <= 0.5 * spot_diameter + 2.0 * f.cell)
    mask = binary_fill_holes(mask)
    signed = distance_transform_edt(mask) - distance_transform_edt(~mask)  # in cells, > 0 inside
    f.maps["tissue"] = gaussian_filter(signed, sigma=1.0)
    return f


def _nuclei(fields: _Fields, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Nuclei (µm) scattered from the fields: position, type, semi-axes, orientation, haematoxylin."""
    m = fields.maps
    inside = np.clip(m["tissue"] + 0.5, 0.0, 1.0)
    type_rate = np.stack([m["w_tumour"], m["w_immune"], m["w_stroma"]]) * _DENSITY[:, None, None]
    rate = type_rate.sum(axis=0) * m["density_mod"] * inside  # nuclei per 1000 µm²
    expected = rate * fields.cell**2 / 1000.0
    n_cell = rng.poisson(expected).ravel()
    cell = np.repeat(np.arange(n_cell.size), n_cell)
    cy, cx = np.divmod(cell, fields.shape[1])
    x = (cx + rng.random(cell.size)) * fields.cell
    y = (cy + rng.random(cell.size)) * fields.cell
    n = x.size
    # type, drawn from the local type rates
    probs = np.stack([fields.at(k, x, y) for k in ("w_tumour", "w_immune", "w_stroma")], axis=1) * _DENSITY
    probs = np.clip(probs, 1e-9, None)
    cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    kind = (rng.random(n)[:, None] > cum[:, :-1]).sum(axis=1)
    # size and shape
    size = fields.at("size_mod", x, y)
    size = np.where(kind == 0, size, size**0.3) * np.exp(0.12 * rng.standard_normal(n))
    elong = np.where(kind == 0, np.exp(0.15 * rng.standard_normal(n)), 1.0)
    a = _SEMI_MAJOR[kind] * size * elong
    b = _SEMI_MINOR[kind] * size / np.sqrt(elong)
    a, b = np.maximum(a, b), np.minimum(a, b)
    cap = 1.8 * _SEMI_MAJOR[kind]
    b, a = b * np.minimum(1.0, cap / a), np.minimum(a, cap)
    theta_fibre = 0.5 * np.arctan2(fields.at("sin2", x, y), fields.at("cos2", x, y))
    angle = np.where(kind == 2, theta_fibre + 0.15 * rng.standard_normal(n), rng.uniform(0, math.pi, n))
    haem = fields.at("haem_mod", x, y)
    haem = _HAEM[kind] * np.where(kind == 0, haem, haem**0.3) * np.exp(0.1 * rng.standard_normal(n))
    vesicular = np.where(kind == 0, 0.35, 0.0)
    return {"x": x, "y": y, "kind": kind, "a": a, "b": b, "angle": angle, "haem": haem, "vesicular": vesicular}


# --------------------------------------------------------------------------------------------------
# rendering


def _render(
    fields: _Fields, nuclei: dict[str, np.ndarray], height: int, width: int, mpp: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render the RGB image; also return the pixel maps the features are measured on."""
    tissue = fields.to_pixels("tissue", height, width, mpp)
    tissue *= fields.cell / mpp / 1.5  # a soft edge about 1.5 px wide
    tissue += 0.5
    np.clip(tissue, 0.0, 1.0, out=tissue)
    grain = _smooth_noise(rng, (height, width), max(0.5, 0.6 / mpp))  # cytoplasm and chromatin texture
    eosin = fields.to_pixels("eosin", height, width, mpp)
    eosin *= 1.0 + 0.12 * grain
    eosin *= tissue
    fibre = _fibre_texture(fields, height, width, mpp, rng)
    fibre *= fields.to_pixels("fibre", height, width, mpp)
    fibre *= tissue
    c_h = _stamp_nuclei(nuclei, height, width, mpp)
    c_h *= 1.0 + 0.25 * np.roll(grain, 3, axis=1)
    c_h += 0.1 * fields.to_pixels("w_tumour", height, width, mpp)  # amphophilic cytoplasm in tumour nests
    c_h *= tissue
    c_e = eosin + fibre
    glass = 1.0 - tissue
    glass *= _GLASS_OD
    image = np.empty((height, width, 3), dtype=np.uint8)
    for ch in range(3):
        od = c_h * np.float32(_HAEMATOXYLIN[ch])
        od += c_e * np.float32(_EOSIN[ch])
        od += glass
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= 255.0
        od += 2.0 * rng.standard_normal((height, width), dtype=np.float32) + 0.5  # sensor noise; round
        np.clip(od, 0.0, 255.0, out=od)
        image[..., ch] = od
    return image, {"eosin": eosin, "fibre": fibre}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise blurred by a Gaussian of ``sigma`` pixels, scaled to unit variance, ``float32``."""
    from scipy.ndimage import gaussian_filter

    radius = int(4.0 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    noise = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma, truncate=4.0)
    noise *= np.float32(1.0 / (kernel**2).sum())  # 2-D separable: variance = (sum of squared 1-D weights)^2
    return noise


def _fibre_texture(fields: _Fields, height: int, width: int, mpp: float, rng: np.random.Generator) -> np.ndarray:
    """Oriented collagen-like streaks (>= 0, mean about 1), following the local fibre orientation."""
    from scipy import fft

    white = rng.standard_normal((height, width), dtype=np.float32)
    spec = fft.rfft2(white, workers=-1)
    fy = fft.fftfreq(height).astype(np.float32)[:, None]
    fx = fft.rfftfreq(width).astype(np.float32)[None, :]
    s_par = 12.0 / mpp  # along the fibre (pixels)
    s_perp = max(0.6, 1.0 / mpp)  # across it
    norm = 2.0 * math.sqrt(math.pi * s_par * s_perp)  # unit variance of the filtered noise
    cos2 = fields.to_pixels("cos2", height, width, mpp)
    sin2 = fields.to_pixels("sin2", height, width, mpp)
    texture = np.zeros((height, width), dtype=np.float32)
    total = np.zeros((height, width), dtype=np.float32)
    for k in range(3):  # three orientations, blended by the local fibre orientation
        t = k * math.pi / 3.0
        f_par = fx * math.cos(t) + fy * math.sin(t)
        f_perp = -fx * math.sin(t) + fy * math.cos(t)
        transfer = np.exp(-2.0 * math.pi**2 * (s_par**2 * f_par**2 + s_perp**2 * f_perp**2)).astype(np.float32)
        streaks = fft.irfft2(spec * (transfer * np.float32(norm)), s=(height, width), workers=-1)
        w = cos2 * np.float32(math.cos(2 * t))
        w += sin2 * np.float32(math.sin(2 * t))
        np.clip(w, 0.0, None, out=w)
        w *= w
        streaks *= w
        texture += streaks
        w *= w
        total += w
    np.sqrt(total, out=total)
    total += 1e-6
    texture /= total
    texture -= 0.4
    np.clip(texture, 0.0, None, out=texture)
    texture *= 2.5
    return texture


def _stamp_nuclei(nuclei: dict[str, np.ndarray], height: int, width: int, mpp: float) -> np.ndarray:
    """Haematoxylin optical density of all nuclei (soft-edged ellipses, overlaps add).

    Vesicular nuclei (``nuclei["vesicular"]`` > 0) are paler in the centre than at the rim.
    """
    flats: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    cx, cy = (nuclei["x"] / mpp).astype(np.float32), (nuclei["y"] / mpp).astype(np.float32)
    a, b = (nuclei["a"] / mpp).astype(np.float32), (nuclei["b"] / mpp).astype(np.float32)
    cos, sin = np.cos(nuclei["angle"]).astype(np.float32), np.sin(nuclei["angle"]).astype(np.float32)
    haem, ves = nuclei["haem"].astype(np.float32), nuclei["vesicular"].astype(np.float32)
    halves = np.ceil(a + 1.0).astype(np.int64)  # stamp boxes sized per nucleus, grouped by size
    for half in np.unique(halves):
        group = np.flatnonzero(halves == half)
        dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
        dy, dx = dy.ravel(), dx.ravel()
        chunk = max(1, (1 << 21) // dx.size)
        for start in range(0, group.size, chunk):
            sel = group[start : start + chunk]
            ix, iy = np.floor(cx[sel]).astype(np.int64), np.floor(cy[sel]).astype(np.int64)
            px = ix[:, None] + dx[None, :]
            py = iy[:, None] + dy[None, :]
            rx = (ix - cx[sel] + 0.5)[:, None] + dx[None, :].astype(np.float32)
            ry = (iy - cy[sel] + 0.5)[:, None] + dy[None, :].astype(np.float32)
            c, s = cos[sel, None], sin[sel, None]
            u = (rx * c + ry * s) / a[sel, None]
            v = (ry * c - rx * s) / b[sel, None]
            rho2 = u * u + v * v
            # soft edge about one pixel wide; vesicular nuclei paler inside
            alpha = np.clip((1.0 - np.sqrt(rho2)) * b[sel, None] + 0.5, 0.0, 1.0)
            alpha *= 1.0 - ves[sel, None] * np.clip(1.0 - rho2, 0.0, 1.0)
            valid = (alpha > 0) & (px >= 0) & (py >= 0) & (px < width) & (py < height)
            flats.append(py[valid] * width + px[valid])
            weights.append((alpha * haem[sel, None])[valid])
    if not flats:
        return np.zeros((height, width), dtype=np.float32)
    out = np.bincount(np.concatenate(flats), weights=np.concatenate(weights), minlength=height * width)
    return out.reshape(height, width).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# features and expression


def _spot_features(
    spots_um: np.ndarray,
    diameter: float,
    nuclei: dict[str, np.ndarray],
    maps: dict[str, np.ndarray],
    mpp: float,
    fields: _Fields,
) -> tuple[np.ndarray, np.ndarray]:
    """Measure :data:`FEATURES` on the disc under each spot; also the dominant cell type there."""
    from scipy.spatial import cKDTree

    n = len(spots_um)
    r = diameter / 2.0
    area = math.pi * r**2
    feats = np.zeros((n, len(FEATURES)))
    nxy = np.stack([nuclei["x"], nuclei["y"]], axis=1)
    if len(nxy):
        hits = cKDTree(nxy).query_ball_point(spots_um, r, workers=-1)
        count = np.array([len(h) for h in hits])
        idx = np.concatenate([np.asarray(h, dtype=np.int64) for h in hits])
    else:
        count, idx = np.zeros(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(n), count)

    def mean_of(values: np.ndarray, fallback: np.ndarray) -> np.ndarray:
        sums = np.bincount(owner, weights=values[idx], minlength=n)
        return np.where(count > 0, sums / np.maximum(count, 1), fallback)

    # fallbacks (spots with no nucleus inside, rare at realistic densities): the local field values
    x, y = spots_um[:, 0], spots_um[:, 1]
    w = np.stack([fields.at(k, x, y) for k in ("w_tumour", "w_immune", "w_stroma")], axis=1) * _DENSITY
    frac = w / w.sum(axis=1, keepdims=True)
    area_n = math.pi * nuclei["a"] * nuclei["b"]
    feats[:, 0] = count / area * 1000.0
    feats[:, 1] = mean_of(area_n, frac @ (math.pi * _SEMI_MAJOR * _SEMI_MINOR))
    feats[:, 2] = mean_of((nuclei["kind"] == 0).astype(float), frac[:, 0])
    feats[:, 3] = mean_of((nuclei["kind"] == 1).astype(float), frac[:, 1])
    feats[:, 4] = mean_of(nuclei["haem"], frac @ _HAEM)
    feats[:, 5] = _disc_mean(maps["eosin"], spots_um / mpp, r / mpp)
    feats[:, 6] = _disc_mean(maps["fibre"], spots_um / mpp, r / mpp)
    kinds = np.stack([mean_of((nuclei["kind"] == k).astype(float), frac[:, k]) for k in range(3)], axis=1)
    return feats, kinds.argmax(axis=1)


def _disc_mean(image: np.ndarray, centres_px: np.ndarray, radius_px: float) -> np.ndarray:
    """Mean of a 2-D map over the pixels whose centres lie within ``radius_px`` of each centre."""
    h = math.ceil(radius_px) + 1
    dy, dx = np.mgrid[-h : h + 1, -h : h + 1]
    out = np.empty(len(centres_px))
    ix0 = np.floor(centres_px[:, 0]).astype(np.int64)
    iy0 = np.floor(centres_px[:, 1]).astype(np.int64)
    chunk = max(1, (1 << 22) // dx.size)
    for start in range(0, len(centres_px), chunk):
        sl = slice(start, start + chunk)
        px = ix0[sl, None] + dx.ravel()[None, :]
        py = iy0[sl, None] + dy.ravel()[None, :]
        inside = np.hypot(px + 0.5 - centres_px[sl, 0, None], py + 0.5 - centres_px[sl, 1, None]) <= radius_px
        px = np.clip(px, 0, image.shape[1] - 1)
        py = np.clip(py, 0, image.shape[0] - 1)
        vals = image[py, px]
        out[sl] = (vals * inside).sum(axis=1) / np.maximum(inside.sum(axis=1), 1)
    return out


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _law(
    n_genes: int,
    n_programs: int,
    image_driven_fraction: float,
    rng_programs: np.random.Generator,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The image -> expression law: program weights, gene baselines and loadings, which genes see the image.

    The programs depend only on ``n_programs`` and their seed, not on the number of genes.
    """
    n_feat = len(FEATURES)
    weights = rng_programs.normal(0.0, 1.0, (n_programs, n_feat)) * (1.5 / math.sqrt(n_feat))
    bias = rng_programs.normal(0.0, 0.5, n_programs)
    log_baseline = rng.normal(0.0, 1.0, n_genes)
    log_baseline -= np.log(np.exp(log_baseline).sum())  # proportions of the total counts
    # standardise each program to mean 0 and variance 1 over z ~ N(0, I) (Gauss-Hermite quadrature),
    # so that every program seed gives signals of comparable strength and a gene's baseline is its
    # typical expression
    nodes, wq = np.polynomial.hermite_e.hermegauss(40)
    wq = wq / wq.sum()
    values = _softplus(bias[:, None] + np.linalg.norm(weights, axis=1)[:, None] * nodes[None, :])
    centre = (values * wq).sum(axis=1)
    spread = np.sqrt(((values - centre[:, None]) ** 2 * wq).sum(axis=1))
    n_driven = round(image_driven_fraction * n_genes)
    image_driven = np.zeros(n_genes, dtype=bool)
    image_driven[rng.permutation(n_genes)[:n_driven]] = True
    loadings = np.zeros((n_genes, n_programs))
    first = rng.integers(0, n_programs, n_genes)
    second = rng.integers(0, n_programs, n_genes)
    strength = rng.uniform(0.4, 0.9, (n_genes, 2)) * rng.choice([-1.0, 1.0], (n_genes, 2))
    has_second = rng.random(n_genes) < 0.5
    rows = np.arange(n_genes)
    loadings[rows, first] += strength[:, 0]
    loadings[rows[has_second], second[has_second]] += 0.6 * strength[has_second, 1]
    loadings[~image_driven] = 0.0
    return {
        "log_baseline": log_baseline,
        "program_weights": weights,
        "program_bias": bias,
        "program_centre": centre,
        "program_scale": spread,
        "loadings": loadings,
        "image_driven": image_driven,
    }


def _image_signal(features: np.ndarray, law: dict[str, np.ndarray]) -> np.ndarray:
    """Log-scale image signal ``(n_spots, n_genes)`` of the law applied to the measured features."""
    z = (features - _FEATURE_CENTRE) / _FEATURE_SCALE
    programs = _softplus(z @ law["program_weights"].T + law["program_bias"]) - law["program_centre"]
    return (programs / law["program_scale"]) @ law["loadings"].T


def _gaussian_weights(spots_um: np.ndarray, sigma: float, *, normalise: str) -> sp.csr_matrix | None:
    """Sparse Gaussian weights between spots within ``3 * sigma``; rows sum to 1 or have unit norm."""
    from scipy.spatial import cKDTree

    if sigma <= 0:
        return None
    n = len(spots_um)
    pairs = cKDTree(spots_um).query_pairs(3.0 * sigma, output_type="ndarray")
    rows = np.concatenate([np.arange(n), pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([np.arange(n), pairs[:, 1], pairs[:, 0]])
    d2 = ((spots_um[rows] - spots_um[cols]) ** 2).sum(axis=1)
    w = sp.csr_matrix((np.exp(-0.5 * d2 / sigma**2), (rows, cols)), shape=(n, n))
    if normalise == "sum":
        scale = 1.0 / np.asarray(w.sum(axis=1)).ravel()
    else:
        scale = 1.0 / np.sqrt(np.asarray(w.multiply(w).sum(axis=1)).ravel())
    return sp.csr_matrix(sp.diags(scale) @ w)


def _spatial_noise(spots_um: np.ndarray, n_genes: int, length: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance per-gene noise, smooth over ``length`` µm (independent per spot when 0)."""
    white = rng.standard_normal((len(spots_um), n_genes))
    weights = _gaussian_weights(spots_um, length, normalise="norm")
    return white if weights is None else weights @ white


def _sample_counts(mu: np.ndarray, dispersion: float, rng: np.random.Generator) -> np.ndarray:
    """Negative-binomial (gamma-Poisson) counts with mean ``mu``; Poisson when ``dispersion`` is 0."""
    if dispersion > 0:
        shape = 1.0 / dispersion
        mu = rng.gamma(shape, mu / shape)
    return rng.poisson(mu).astype(np.int64)
