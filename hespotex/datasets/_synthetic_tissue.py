"""The tissue model behind :func:`hespotex.datasets.synthetic` and :func:`hespotex.datasets.synthetic_wsi`.

Stain physics (Beer-Lambert mixing of haematoxylin and eosin), the cell types and their nuclei,
smooth random tissue fields on a coarse grid (:class:`Fields`), the spot layout inside a random
tissue outline, and the rendering of a section to an RGB image.
"""

from __future__ import annotations

import math

import numpy as np

# Stain vectors: optical density per unit concentration (R, G, B), unit length.
HAEMATOXYLIN = np.array([0.62, 0.74, 0.26])
EOSIN = np.array([0.16, 0.86, 0.48])
GLASS_OD = 0.04

# Cell types: relative nuclear density (nuclei per 1000 µm²), semi-axes (µm), haematoxylin OD.
CELL_TYPES = ("tumour", "immune", "stroma")
DENSITY = np.array([9.0, 20.0, 2.5])
SEMI_MAJOR = np.array([4.6, 2.7, 5.0])
SEMI_MINOR = np.array([3.6, 2.5, 1.5])
HAEM = np.array([0.85, 1.35, 1.05])

_FIELD_CELL_UM = 10.0  # resolution of the tissue fields before they are rendered at pixel scale


# --------------------------------------------------------------------------------------------------
# layout


def spot_layout(n: int, layout: str, spacing: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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


class Fields:
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
        x0, wx = interp_index((np.arange(width) + 0.5) * mpp / self.cell - 0.5, grid.shape[1])
        cols = grid[:, x0] * (1 - wx) + grid[:, x0 + 1] * wx  # (grid rows, width): small
        y0, wy = interp_index((np.arange(height) + 0.5) * mpp / self.cell - 0.5, grid.shape[0])
        out = cols[y0]
        out *= (1 - wy)[:, None]
        out += cols[y0 + 1] * wy[:, None]
        return out


def interp_index(pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.clip(pos, 0, n - 1.000001)
    i0 = np.floor(pos).astype(np.int64)
    return i0, (pos - i0).astype(np.float32)


def grf(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    """A Gaussian random field of unit variance and Gaussian correlation (``sigma_cells`` kernel)."""
    from scipy.ndimage import gaussian_filter

    white = rng.standard_normal(shape)
    field = gaussian_filter(white, sigma=sigma_cells, mode="reflect", truncate=3.0)
    return field * (2.0 * math.sqrt(math.pi) * max(sigma_cells, 0.5))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def tissue_fields(
    spots_um: np.ndarray,
    extent_um: np.ndarray,
    spot_diameter: float,
    spacing: float,
    domain_size: float,
    rng: np.random.Generator,
) -> Fields:
    """Composition, density, size, stain and fibre fields of the section, and its tissue mask."""
    from scipy.ndimage import binary_fill_holes, distance_transform_edt, gaussian_filter
    from scipy.spatial import cKDTree

    f = Fields(extent_um)
    shape = f.shape
    big = domain_size / 3.0 / f.cell  # kernel sigma (cells) of domain-scale fields
    small = min(30.0, domain_size / 6.0) / f.cell
    # composition: tumour nests with irregular borders, immune infiltrate, stroma in between
    g_tumour = grf(rng, shape, big) + 0.35 * grf(rng, shape, small)
    g_immune = grf(rng, shape, big * 0.7) + 0.3 * grf(rng, shape, small)
    tumour = sigmoid(4.0 * (g_tumour - 0.2))
    immune = sigmoid(3.5 * (g_immune - 0.9)) * (1.0 - tumour)
    stroma = 1.0 - tumour - immune
    f.maps["w_tumour"], f.maps["w_immune"], f.maps["w_stroma"] = tumour, immune, stroma
    # per-type modulations
    f.maps["density_mod"] = np.exp(0.2 * grf(rng, shape, big))
    f.maps["size_mod"] = np.exp(0.18 * grf(rng, shape, big))
    f.maps["haem_mod"] = np.exp(0.18 * grf(rng, shape, big))
    # cytoplasm eosin: stain variation, less cytoplasm where lymphocytes pack tightly
    # (paler in stroma, where collagen fibres carry the eosin)
    f.maps["eosin"] = 0.5 * np.exp(0.25 * grf(rng, shape, big)) * (1.0 - 0.35 * immune) * (1.0 - 0.45 * stroma)
    # fibres: stroma only, in varying amounts; orientation from two smooth fields
    f.maps["fibre"] = 0.4 * stroma * sigmoid(2.5 * grf(rng, shape, big) + 1.0)
    a, b = grf(rng, shape, big * 0.6), grf(rng, shape, big * 0.6)
    f.maps["theta"] = 0.5 * np.arctan2(a, b)  # fibre orientation, radians in (-pi/2, pi/2]
    f.maps["cos2"], f.maps["sin2"] = np.cos(2 * f.maps["theta"]), np.sin(2 * f.maps["theta"])
    # tissue: the spots' neighbourhood with a smooth, wobbly outline; every spot's disc is inside
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    centres = np.stack([(xx.ravel() + 0.5) * f.cell, (yy.ravel() + 0.5) * f.cell], axis=1)
    dist = cKDTree(spots_um).query(centres, workers=-1)[0].reshape(shape)
    near = gaussian_filter((dist <= spacing).astype(float), sigma=0.5 * spacing / f.cell)
    wobble = grf(rng, shape, max(1.0, 1.5 * spacing / f.cell))
    mask = (near - 0.5 + 0.12 * wobble > 0) | (dist <= 0.5 * spot_diameter + 2.0 * f.cell)
    mask = binary_fill_holes(mask)
    signed = distance_transform_edt(mask) - distance_transform_edt(~mask)  # in cells, > 0 inside
    f.maps["tissue"] = gaussian_filter(signed, sigma=1.0)
    return f


def draw_nuclei(fields: Fields, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Nuclei (µm) scattered from the fields: position, type, semi-axes, orientation, haematoxylin."""
    m = fields.maps
    inside = np.clip(m["tissue"] + 0.5, 0.0, 1.0)
    type_rate = np.stack([m["w_tumour"], m["w_immune"], m["w_stroma"]]) * DENSITY[:, None, None]
    rate = type_rate.sum(axis=0) * m["density_mod"] * inside  # nuclei per 1000 µm²
    expected = rate * fields.cell**2 / 1000.0
    n_cell = rng.poisson(expected).ravel()
    cell = np.repeat(np.arange(n_cell.size), n_cell)
    cy, cx = np.divmod(cell, fields.shape[1])
    x = (cx + rng.random(cell.size)) * fields.cell
    y = (cy + rng.random(cell.size)) * fields.cell
    n = x.size
    # type, drawn from the local type rates
    probs = np.stack([fields.at(k, x, y) for k in ("w_tumour", "w_immune", "w_stroma")], axis=1) * DENSITY
    probs = np.clip(probs, 1e-9, None)
    cum = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    kind = (rng.random(n)[:, None] > cum[:, :-1]).sum(axis=1)
    # size and shape
    size = fields.at("size_mod", x, y)
    size = np.where(kind == 0, size, size**0.3) * np.exp(0.12 * rng.standard_normal(n))
    elong = np.where(kind == 0, np.exp(0.15 * rng.standard_normal(n)), 1.0)
    a = SEMI_MAJOR[kind] * size * elong
    b = SEMI_MINOR[kind] * size / np.sqrt(elong)
    a, b = np.maximum(a, b), np.minimum(a, b)
    cap = 1.8 * SEMI_MAJOR[kind]
    b, a = b * np.minimum(1.0, cap / a), np.minimum(a, cap)
    theta_fibre = 0.5 * np.arctan2(fields.at("sin2", x, y), fields.at("cos2", x, y))
    angle = np.where(kind == 2, theta_fibre + 0.15 * rng.standard_normal(n), rng.uniform(0, math.pi, n))
    haem = fields.at("haem_mod", x, y)
    haem = HAEM[kind] * np.where(kind == 0, haem, haem**0.3) * np.exp(0.1 * rng.standard_normal(n))
    vesicular = np.where(kind == 0, 0.35, 0.0)
    return {"x": x, "y": y, "kind": kind, "a": a, "b": b, "angle": angle, "haem": haem, "vesicular": vesicular}


# --------------------------------------------------------------------------------------------------
# rendering


def render_section(
    fields: Fields, nuclei: dict[str, np.ndarray], height: int, width: int, mpp: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render the RGB image; also return the pixel maps the features are measured on."""
    tissue = fields.to_pixels("tissue", height, width, mpp)
    tissue *= fields.cell / mpp / 1.5  # a soft edge about 1.5 px wide
    tissue += 0.5
    np.clip(tissue, 0.0, 1.0, out=tissue)
    grain = smooth_noise(rng, (height, width), max(0.5, 0.6 / mpp))  # cytoplasm and chromatin texture
    eosin = fields.to_pixels("eosin", height, width, mpp)
    eosin *= 1.0 + 0.12 * grain
    eosin *= tissue
    fibre = _fibre_texture(fields, height, width, mpp, rng)
    fibre *= fields.to_pixels("fibre", height, width, mpp)
    fibre *= tissue
    c_h = stamp_nuclei(nuclei, height, width, mpp)
    c_h *= 1.0 + 0.25 * np.roll(grain, 3, axis=1)
    c_h += 0.1 * fields.to_pixels("w_tumour", height, width, mpp)  # amphophilic cytoplasm in tumour nests
    c_h *= tissue
    c_e = eosin + fibre
    glass = 1.0 - tissue
    glass *= GLASS_OD
    image = np.empty((height, width, 3), dtype=np.uint8)
    for ch in range(3):
        od = c_h * np.float32(HAEMATOXYLIN[ch])
        od += c_e * np.float32(EOSIN[ch])
        od += glass
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= 255.0
        od += 2.0 * rng.standard_normal((height, width), dtype=np.float32) + 0.5  # sensor noise; round
        np.clip(od, 0.0, 255.0, out=od)
        image[..., ch] = od
    return image, {"eosin": eosin, "fibre": fibre}


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise blurred by a Gaussian of ``sigma`` pixels, scaled to unit variance, ``float32``."""
    from scipy.ndimage import gaussian_filter

    radius = int(4.0 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    noise = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=sigma, truncate=4.0)
    noise *= np.float32(1.0 / (kernel**2).sum())  # 2-D separable: variance = (sum of squared 1-D weights)^2
    return noise


def _fibre_texture(fields: Fields, height: int, width: int, mpp: float, rng: np.random.Generator) -> np.ndarray:
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


def stamp_nuclei(nuclei: dict[str, np.ndarray], height: int, width: int, mpp: float) -> np.ndarray:
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
