"""Network sizes shared by the tests that train small models (``ModelConfig.preset("hespotex", **SMALL)``)."""

from __future__ import annotations

#: A small HESpotEx network: trains in seconds on a few hundred synthetic spots.
SMALL = {
    "ae_epochs": 5,
    "ae_hidden_dim": 32,
    "latent_dim": 8,
    "projection_hidden_dim": 32,
    "head_hidden_dim": 32,
    "decoder_heads": 2,
}

#: A smaller one still, for tests where the model only has to run (stain options, context embeddings).
TINY = {
    "ae_epochs": 2,
    "ae_hidden_dim": 16,
    "latent_dim": 8,
    "projection_hidden_dim": 16,
    "head_hidden_dim": 16,
    "decoder_heads": 1,
}
