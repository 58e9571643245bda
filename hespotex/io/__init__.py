"""Readers that turn spatial transcriptomics layouts into SpatialData samples, and writers.

Every reader returns a sample shaped as ``DESIGN.md`` describes: an H&E image element, spot
circles in that image's coordinate system, and a table with ``obsm["spatial"]`` and
``uns["hespotex_sample"]`` (microns per pixel, spot diameter). ``hx.io`` never imports torch.
"""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "read_visium": "_visium",
        "read_visium_hd": "_visium_hd",
        "read_st": "_st",
        "read_hest": "_hest",
        "from_anndata": "_anndata",
        "from_scanpy": "_scanpy",
        "build_sample": "_build",
        "read_zarr": "_zarr",
        "write_zarr": "_zarr",
        "read_wsi": "_wsi",
        "write_geojson": "_export_geojson",
        "write_ome_tiff": "_export_ometiff",
        "write_csv": "_export_table",
        "write_png": "_export_table",
    },
)
