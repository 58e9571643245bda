"""Data sets: synthetic tissue with known truth, the embedded Visium crop, public layouts."""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "synthetic": "_synthetic",
        "mouse_brain_crop": "_mouse_brain",
        "her2st": "_her2st",
        "her2st_path": "_her2st",
        "her2st_genes": "_her2st",
        "her2st_sections": "_her2st",
        "synthetic_wsi": "_synthetic_wsi",
        "synthetic_visium_hd": "_visium_hd",
        "write_visium_hd": "_visium_hd",
    },
)
