"""The image -> expression law of :func:`hespotex.datasets.synthetic`.

What the pixels under each spot show (:data:`FEATURES`, measured by :func:`spot_features`), the gene
programs that turn them into expression (:func:`expression_law`, :func:`image_signal`), spatial
smoothing and noise, and negative-binomial counts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from hespotex.datasets._synthetic_tissue import DENSITY, HAEM, SEMI_MAJOR, SEMI_MINOR

if TYPE_CHECKING:
    from hespotex.datasets._synthetic_tissue import Fields

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
FEATURE_CENTRE = np.array([7.5, 40.0, 0.45, 0.25, 1.05, 0.4, 0.07])
FEATURE_SCALE = np.array([4.5, 20.0, 0.4, 0.33, 0.2, 0.13, 0.085])


# --------------------------------------------------------------------------------------------------
# features and expression


def spot_features(
    spots_um: np.ndarray,
    diameter: float,
    nuclei: dict[str, np.ndarray],
    maps: dict[str, np.ndarray],
    mpp: float,
    fields: Fields,
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
    w = np.stack([fields.at(k, x, y) for k in ("w_tumour", "w_immune", "w_stroma")], axis=1) * DENSITY
    frac = w / w.sum(axis=1, keepdims=True)
    area_n = math.pi * nuclei["a"] * nuclei["b"]
    feats[:, 0] = count / area * 1000.0
    feats[:, 1] = mean_of(area_n, frac @ (math.pi * SEMI_MAJOR * SEMI_MINOR))
    feats[:, 2] = mean_of((nuclei["kind"] == 0).astype(float), frac[:, 0])
    feats[:, 3] = mean_of((nuclei["kind"] == 1).astype(float), frac[:, 1])
    feats[:, 4] = mean_of(nuclei["haem"], frac @ HAEM)
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


def expression_law(
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


def image_signal(features: np.ndarray, law: dict[str, np.ndarray]) -> np.ndarray:
    """Log-scale image signal ``(n_spots, n_genes)`` of the law applied to the measured features."""
    z = (features - FEATURE_CENTRE) / FEATURE_SCALE
    programs = _softplus(z @ law["program_weights"].T + law["program_bias"]) - law["program_centre"]
    return (programs / law["program_scale"]) @ law["loadings"].T


def gaussian_weights(spots_um: np.ndarray, sigma: float, *, normalise: str) -> sp.csr_matrix | None:
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


def spatial_noise(spots_um: np.ndarray, n_genes: int, length: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance per-gene noise, smooth over ``length`` µm (independent per spot when 0)."""
    white = rng.standard_normal((len(spots_um), n_genes))
    weights = gaussian_weights(spots_um, length, normalise="norm")
    return white if weights is None else weights @ white


def sample_counts(mu: np.ndarray, dispersion: float, rng: np.random.Generator) -> np.ndarray:
    """Negative-binomial (gamma-Poisson) counts with mean ``mu``; Poisson when ``dispersion`` is 0."""
    if dispersion > 0:
        shape = 1.0 / dispersion
        mu = rng.gamma(shape, mu / shape)
    return rng.poisson(mu).astype(np.int64)
