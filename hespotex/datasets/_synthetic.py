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
   image-driven gene loads on one or two programs. Its log mean is a gene baseline plus the program signal, smoothed
   over
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

from hespotex.datasets._synthetic_expression import (
    FEATURE_CENTRE,
    FEATURE_SCALE,
    FEATURES,
    expression_law,
    gaussian_weights,
    image_signal,
    sample_counts,
    spatial_noise,
    spot_features,
)
from hespotex.datasets._synthetic_tissue import CELL_TYPES, draw_nuclei, render_section, spot_layout, tissue_fields

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

__all__ = ["FEATURES", "synthetic"]


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

    Builds a new sample in memory; writes nothing else.
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
    spots_um, array_rc = spot_layout(n_spots, layout, spacing_um, rng_layout)
    pad_um = 2.0 * spot_diameter_um + 0.5 * spacing_um
    spots_um = spots_um - spots_um.min(axis=0) + pad_um
    extent_um = spots_um.max(axis=0) + pad_um  # (x, y)
    width = math.ceil(extent_um[0] / microns_per_pixel)
    height = math.ceil(extent_um[1] / microns_per_pixel)

    # 2. tissue fields, nuclei and the image
    fields = tissue_fields(spots_um, extent_um, spot_diameter_um, spacing_um, domain_size_um, rng_fields)
    nuclei = draw_nuclei(fields, rng_cells)
    image, maps = render_section(fields, nuclei, height, width, microns_per_pixel, rng_pixels)

    # 3. image features under each spot, and the expression law applied to them
    features, dominant = spot_features(spots_um, spot_diameter_um, nuclei, maps, microns_per_pixel, fields)
    law = expression_law(n_genes, n_programs, image_driven_fraction, rng_programs, rng_genes)
    signal = image_signal(features, law)
    weights = gaussian_weights(spots_um, smoothing, normalise="sum")
    if weights is not None:
        signal = weights @ signal
    log_expected = np.log(depth) + law["log_baseline"][None, :] + signal
    expected = np.exp(log_expected)
    hidden = spatial_noise(spots_um, n_genes, noise_scale_um, rng_counts) * noise
    library = np.exp(library_sd * rng_counts.standard_normal(n_spots) - 0.5 * library_sd**2)
    mu = expected * np.exp(hidden) * library[:, None]
    counts = sample_counts(mu, dispersion, rng_counts)

    # 4. the sample
    obs_names = [f"spot_{i:05d}" for i in range(n_spots)]
    obs = pd.DataFrame(
        {
            "array_row": array_rc[:, 0].astype(np.int64),
            "array_col": array_rc[:, 1].astype(np.int64),
            "synthetic_library_factor": library.astype(np.float32),
            "synthetic_domain": pd.Categorical(np.asarray(CELL_TYPES)[dominant], categories=list(CELL_TYPES)),
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
            "feature_centre": FEATURE_CENTRE.copy(),
            "feature_scale": FEATURE_SCALE.copy(),
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
