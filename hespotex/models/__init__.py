"""Pure torch / torch-geometric modules of HESpotEx. No AnnData in here."""

from hespotex._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "GraphAttentionAutoencoder": "_autoencoder",
        "ImageProjection": "_projection",
        "GraphDecoder": "_decoder",
        "HESpotExNet": "_net",
        "ModelConfig": "_config",
        "PRESETS": "_config",
        "pearson_loss": "_losses",
        "pearson_corr": "_losses",
        "parameter_count": "_net",
    },
)
