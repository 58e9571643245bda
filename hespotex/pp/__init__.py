"""Preprocessing: genes, normalisation, spatial graph, H&E patches and their embeddings."""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "select_genes": "_genes",
        "normalize": "_normalize",
        "log_normalize": "_normalize",
        "spatial_graph": "_graph",
        "extract_patches": "_patches",
        "embed": "_embed",
        "stain_reference": "_stain_norm",
        "load_encoder": "_encoders",
        "list_encoders": "_encoder_zoo",
        "detect_tissue": "_tissue",
        "tile": "_tile",
    },
)
