"""Space Ranger Visium HD output folders, written from arrays: the fixture of ``hx.io.read_visium_hd``.

:func:`write_visium_hd` lays out what Space Ranger (3.x) writes for a Visium HD slide and what
:func:`spatialdata_io.visium_hd` reads::

    {path}/
      feature_slice.h5                    # only its ``metadata_json`` attribute (HD layout, file format)
      spatial/scalefactors_json.json      # the slide's scale factors (2 µm bins)
      spatial/tissue_hires_image.png      # longest side ``hires_px``
      spatial/tissue_lowres_image.png     # longest side ``lowres_px``
      microscope_image/tissue.ome.tif     # the full-resolution H&E (pyramidal OME-TIFF), when written
      binned_outputs/square_{bb:03d}um/   # one folder per bin size
        filtered_feature_bc_matrix.h5     # 10x HDF5 feature-barcode matrix (int32 counts)
        spatial/tissue_positions.parquet  # barcode, in_tissue, array_row, array_col, pxl_row/col_in_fullres
        spatial/scalefactors_json.json    # + bin_size_um, spot_diameter_fullres = bin_size_um / microns_per_pixel

Bins of ``b`` µm are squares on one grid: bin ``(array_row, array_col)`` covers
``[origin + col·b, origin + (col+1)·b)`` µm along x (rows along y), its centre is what
``pxl_col_in_fullres`` / ``pxl_row_in_fullres`` hold (full-resolution pixels). Coarser bins sum the
counts of the finer bins they contain (a 16 µm bin is 2 × 2 bins of 8 µm), as Space Ranger sums its
2 µm bins. The Space Ranger files not read by spatialdata-io (``raw_feature_bc_matrix.h5``, the 2 µm
bins, the UMI image of ``feature_slice.h5``, CytAssist and fiducial images) are not written.

:func:`synthetic_visium_hd` writes a synthetic tissue (:func:`hespotex.datasets.synthetic` on an
8 µm square grid, so expression is a known function of the H&E image) in that layout.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger("hespotex")

BASE_BIN_UM = 8
FEATURE_SLICE_FILE = "feature_slice.h5"


def _downsample(image: Any, max_px: int) -> tuple[np.ndarray, float]:
    """``image`` (``(h, w, 3)``, numpy or dask) shrunk so its longest side is ``max_px``, and the scale factor."""
    from PIL import Image

    h, w = int(image.shape[0]), int(image.shape[1])
    scale = min(1.0, max_px / max(h, w))
    step = max(1, int(1.0 / scale) // 2)  # strided pre-shrink (cheap on dask), then an antialiased resize
    small = image[::step, ::step]
    small = np.asarray(small.compute() if hasattr(small, "compute") else small, dtype=np.uint8)
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(small).resize((out_w, out_h), Image.Resampling.LANCZOS))
    return resized, out_w / w


def _write_10x_h5(file: Path, counts: sp.csr_matrix, barcodes: Sequence[str], genes: Sequence[str]) -> None:
    """A 10x Genomics feature-barcode matrix (HDF5, v3 layout: ``matrix/`` with a ``features/`` group)."""
    import h5py

    csr = sp.csr_matrix(counts)
    csr.sort_indices()
    genes = [str(g) for g in genes]
    with h5py.File(file, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.asarray(barcodes, dtype="S"))
        m.create_dataset("data", data=np.asarray(np.rint(csr.data), dtype=np.int32), compression="gzip")
        m.create_dataset("indices", data=csr.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=csr.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([csr.shape[1], csr.shape[0]], dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(genes)))
        feat.create_dataset("genome", data=np.array([b"synthetic"] * len(genes)))
        feat.create_dataset("id", data=np.asarray([f"SYN{i:08d}" for i in range(len(genes))], dtype="S"))
        feat.create_dataset("name", data=np.asarray(genes, dtype="S"))


def _write_tiff(file: Path, image: Any, microns_per_pixel: float) -> None:
    from hespotex.datasets._synthetic_wsi import write_ome_tiff

    tile = 256
    levels: list[Any] = [image]

    def tiles(level: int, row: int, col: int) -> np.ndarray:
        while len(levels) <= level:  # 2 x 2 means of the level above, computed once per level
            prev = np.asarray(levels[-1])
            h, w = (prev.shape[0] + 1) // 2, (prev.shape[1] + 1) // 2
            pad = np.pad(prev, ((0, 2 * h - prev.shape[0]), (0, 2 * w - prev.shape[1]), (0, 0)), mode="edge")
            levels.append(pad.reshape(h, 2, w, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
        arr = levels[level]
        block = arr[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile]
        return np.asarray(block.compute() if hasattr(block, "compute") else block, dtype=np.uint8)

    write_ome_tiff(file, tiles, image.shape[:2], microns_per_pixel=microns_per_pixel, tile=tile, compression="zlib")


def _scalefactors(bin_um: float, mpp: float, hires: float, lowres: float) -> dict[str, float]:
    return {
        "spot_diameter_fullres": bin_um / mpp,
        "bin_size_um": float(bin_um),
        "microns_per_pixel": float(mpp),
        "regist_target_img_scalef": hires,
        "tissue_lowres_scalef": lowres,
        "fiducial_diameter_fullres": 120.0 / mpp,
        "tissue_hires_scalef": hires,
    }


def write_visium_hd(
    path: str | Path,
    counts: Any,
    array_row: np.ndarray,
    array_col: np.ndarray,
    *,
    genes: Sequence[str],
    image: Any,
    microns_per_pixel: float,
    origin_px: tuple[float, float] = (0.0, 0.0),
    bin_sizes: Sequence[int] = (8, 16),
    fullres_image: str | Path | bool = True,
    hires_px: int = 2000,
    lowres_px: int = 600,
    overwrite: bool = False,
) -> Path:
    """Write 8 µm bins (counts, grid positions) and an H&E image as a Space Ranger Visium HD output folder.

    Parameters
    ----------
    path
        Output folder (the Space Ranger ``outs`` folder).
    counts
        ``(n_bins, n_genes)`` integer counts of the 8 µm bins (sparse or dense).
    array_row, array_col
        Grid position of each 8 µm bin (unique pairs).
    genes
        Gene names (``var_names`` of what is read back).
    image
        Full-resolution H&E ``(height, width, 3)`` ``uint8`` (numpy or dask); the hires and lowres PNGs
        are made from it.
    microns_per_pixel
        Resolution of ``image``.
    origin_px
        ``(x, y)`` in full-resolution pixels of the top-left corner of bin ``(0, 0)``.
    bin_sizes
        Bin sizes to write, multiples of 8 µm (coarser bins sum the 8 µm bins they contain).
    fullres_image
        ``True``: write ``image`` as ``microscope_image/tissue.ome.tif`` (pyramidal, lossless); a path:
        link that existing file there instead; ``False``: no full-resolution image.
    hires_px, lowres_px
        Longest side of ``spatial/tissue_hires_image.png`` and ``spatial/tissue_lowres_image.png``.
    overwrite
        Replace an existing folder at ``path``.

    Returns
    -------
    ``path``. Writes the files listed in the module docstring; reads nothing else.
    """
    import h5py
    from PIL import Image

    from hespotex import _ownership

    path = Path(path)
    mpp = float(microns_per_pixel)
    counts = sp.csr_matrix(counts)
    rows, cols = np.asarray(array_row, dtype=np.int64), np.asarray(array_col, dtype=np.int64)
    if counts.shape[0] != len(rows) or len(rows) != len(cols) or counts.shape[1] != len(genes):
        msg = (
            f"Expected counts (n_bins, n_genes) = ({len(rows)}, {len(genes)}) matching array_row/array_col and "
            f"genes, found {counts.shape}."
        )
        raise ValueError(msg)
    if (rows < 0).any() or (cols < 0).any() or len(np.unique(rows * (cols.max() + 1) + cols)) != len(rows):
        msg = "Expected unique, non-negative (array_row, array_col) pairs, one per 8 µm bin."
        raise ValueError(msg)
    bad = [b for b in bin_sizes if int(b) != b or int(b) % BASE_BIN_UM]
    if bad:
        msg = f"Expected bin sizes that are multiples of {BASE_BIN_UM} µm, found {bad}."
        raise ValueError(msg)
    # only a folder this function wrote (its marker) is replaced, and only once everything is written
    with _ownership.replacing_dir(
        path, "dataset", what="Visium HD folder written by hespotex", overwrite=overwrite
    ) as out:
        (out / "spatial").mkdir()
        hires, s_hi = _downsample(image, hires_px)
        lowres, s_lo = _downsample(hires, lowres_px)
        s_lo *= s_hi
        Image.fromarray(hires).save(out / "spatial" / "tissue_hires_image.png")
        Image.fromarray(lowres).save(out / "spatial" / "tissue_lowres_image.png")
        (out / "spatial" / "scalefactors_json.json").write_text(
            json.dumps(_scalefactors(2.0, mpp, s_hi, s_lo), indent=2)
        )
        if fullres_image is not False:
            (out / "microscope_image").mkdir()
            target = out / "microscope_image" / "tissue.ome.tif"
            if fullres_image is True:
                _write_tiff(target, image, mpp)
            else:
                target.symlink_to(Path(fullres_image).resolve())
        hd_layout = {"file_format": "1.0", "transform": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}
        identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        metadata = {
            "hd_layout_json": json.dumps(hd_layout),
            "transform_matrices": {
                k: identity
                for k in (
                    "cytassist_colrow_to_spot_colrow",
                    "spot_colrow_to_cytassist_colrow",
                    "microscope_colrow_to_spot_colrow",
                    "spot_colrow_to_microscope_colrow",
                )
            },
            "hespotex_note": "written by hespotex.datasets.write_visium_hd: metadata only, no UMI image",
        }
        with h5py.File(out / FEATURE_SLICE_FILE, "w") as f:
            f.attrs["metadata_json"] = json.dumps(metadata)
        for b in sorted({int(b) for b in bin_sizes}):
            f = b // BASE_BIN_UM
            group = np.c_[rows // f, cols // f]
            uniq, inverse = np.unique(group, axis=0, return_inverse=True)
            inverse = inverse.ravel()
            agg = sp.csr_matrix(
                (np.ones(len(rows), dtype=np.float32), (inverse, np.arange(len(rows)))), shape=(len(uniq), len(rows))
            )
            binned = (agg @ counts).tocsr()
            r, c = uniq[:, 0], uniq[:, 1]
            barcodes = [f"s_{b:03d}um_{ri:05d}_{ci:05d}-1" for ri, ci in zip(r, c, strict=True)]
            folder = out / "binned_outputs" / f"square_{b:03d}um"
            (folder / "spatial").mkdir(parents=True)
            _write_10x_h5(folder / "filtered_feature_bc_matrix.h5", binned, barcodes, genes)
            positions = pd.DataFrame(
                {
                    "barcode": barcodes,
                    "in_tissue": np.ones(len(uniq), dtype=np.int32),
                    "array_row": r.astype(np.int32),
                    "array_col": c.astype(np.int32),
                    "pxl_row_in_fullres": origin_px[1] + (r + 0.5) * b / mpp,
                    "pxl_col_in_fullres": origin_px[0] + (c + 0.5) * b / mpp,
                }
            )
            positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
            (folder / "spatial" / "scalefactors_json.json").write_text(
                json.dumps(_scalefactors(b, mpp, s_hi, s_lo), indent=2)
            )
            logger.info("write_visium_hd: %d bins of %d µm in %s.", len(uniq), b, path / folder.relative_to(out))
    return path


def synthetic_visium_hd(
    path: str | Path,
    n_bins: int = 4096,
    n_genes: int = 50,
    *,
    seed: int = 0,
    program_seed: int = 0,
    microns_per_pixel: float = 0.5,
    bin_sizes: Sequence[int] = (8, 16),
    fullres_image: bool = True,
    smoothing: float = 12.0,
    domain_size_um: float = 120.0,
    noise_scale_um: float = 40.0,
    depth: float = 200.0,
    overwrite: bool = False,
    **kwargs: Any,
):
    """Write a synthetic tissue section as a Space Ranger Visium HD output folder.

    The section is :func:`hespotex.datasets.synthetic` on a square grid of 8 µm bins (``layout="square"``,
    ``spot_diameter_um = spacing_um = 8``): expression is a known function of the H&E image under each
    bin. The folder is written by :func:`write_visium_hd` (8 and 16 µm bins by default).

    Parameters
    ----------
    path
        Output folder.
    n_bins
        Number of 8 µm bins under tissue (4,096 bins cover about 0.26 mm²).
    n_genes, seed, program_seed, microns_per_pixel, smoothing, domain_size_um, noise_scale_um, depth
        As in :func:`hespotex.datasets.synthetic`, with defaults scaled to 8 µm bins (tissue domains
        of about 120 µm, shallow bins).
    bin_sizes, fullres_image, overwrite
        As in :func:`write_visium_hd`.
    **kwargs
        Passed to :func:`hespotex.datasets.synthetic`.

    Returns
    -------
    The 8 µm sample (a SpatialData as :func:`hespotex.datasets.synthetic` returns it: the truth the
    folder was written from, ``obsm["spatial"]`` in full-resolution pixels). Writes ``path``.
    """
    from hespotex.datasets._synthetic import synthetic

    sdata = synthetic(
        n_spots=n_bins,
        n_genes=n_genes,
        seed=seed,
        program_seed=program_seed,
        layout="square",
        spot_diameter_um=float(BASE_BIN_UM),
        spacing_um=float(BASE_BIN_UM),
        microns_per_pixel=microns_per_pixel,
        smoothing=smoothing,
        domain_size_um=domain_size_um,
        noise_scale_um=noise_scale_um,
        depth=depth,
        **kwargs,
    )
    table = sdata.tables["table"]
    info = table.uns["hespotex_sample"]
    from spatialdata import get_pyramid_levels
    from xarray import DataArray

    element = sdata.images[info["image_key"]]
    level0 = element if isinstance(element, DataArray) else get_pyramid_levels(element, n=0)
    image = level0.transpose("y", "x", "c").data
    rows = table.obs["array_row"].to_numpy()
    cols = table.obs["array_col"].to_numpy()
    r0, c0 = rows.min(), cols.min()
    xy = np.asarray(table.obsm["spatial"])
    # bin (r, c) of the written grid has its centre at origin + (c - c0 + 0.5) * 8 µm: solve for the origin
    origin_x = float(np.median(xy[:, 0] - (cols - c0 + 0.5) * BASE_BIN_UM / microns_per_pixel))
    origin_y = float(np.median(xy[:, 1] - (rows - r0 + 0.5) * BASE_BIN_UM / microns_per_pixel))
    if not math.isfinite(origin_x) or not math.isfinite(origin_y):
        msg = "Could not place the synthetic bins on a grid."
        raise RuntimeError(msg)
    write_visium_hd(
        path,
        table.X,
        rows - r0,
        cols - c0,
        genes=list(table.var_names),
        image=image,
        microns_per_pixel=microns_per_pixel,
        origin_px=(origin_x, origin_y),
        bin_sizes=bin_sizes,
        fullres_image=fullres_image,
        hires_px=max(64, max(image.shape[:2]) // 2),
        lowres_px=max(32, max(image.shape[:2]) // 8),
        overwrite=overwrite,
    )
    return sdata
