"""Every default key hespotex reads or writes, in one place (issue #11: one vocabulary).

Writers take ``key_added`` (default below) and refuse to replace what is stored unless
``overwrite=True``; readers of a prediction take ``key`` (what ``hx.tl.predict(key_added=...)`` wrote)
and resolve it through :mod:`hespotex.tl.prediction._tables`. No default of a writer equals a key
another function writes.
"""

from __future__ import annotations

#: The sample's spot table in a SpatialData (``sdata.tables["table"]``).
TABLE_KEY = "table"
#: ``uns`` entry with the sample info (µm per pixel, spot diameter, element keys).
SAMPLE_KEY = "hespotex_sample"
#: ``obsm`` key of the image embeddings (``hx.pp.embed(key_added=)``, ``use_rep`` of the readers).
EMBEDDING_KEY = "X_hespotex_image"
#: ``uns`` entry recording how each embedding was made (``uns[EMBED_RECORD_KEY][use_rep]``).
EMBED_RECORD_KEY = "hespotex_embed"
#: ``uns`` entry recording how ``hx.pp.normalize`` normalised a table.
NORMALIZE_KEY = "hespotex_normalize"
#: ``attrs`` of the tissue shapes written by ``hx.pp.detect_tissue``.
TISSUE_ATTRS_KEY = "hespotex_tissue"
#: ``uns`` entry recording the pseudo-spot layout of ``hx.pp.tile``.
TILE_KEY = "hespotex_tile"
#: SpatialData ``attrs`` entry describing a whole-slide image (``hx.io.read_wsi``).
SLIDE_KEY = "hespotex_slide"
#: ``uns`` entry with the genes selected by ``hx.pp.select_genes``.
GENES_KEY = "hespotex_genes"
#: Raw counts layer read by normalisation and gene selection.
COUNTS_LAYER = "counts"
#: Log-normalised measured expression of the predicted genes (written by ``predict`` beside its table).
MEASURED_LAYER = "measured"
#: Default ``key_added`` of ``hx.tl.predict`` = default ``key`` of every reader of a prediction: the layer,
#: the table (when the genes differ), ``uns[key]`` (its record), ``obsm[f"X_{key}"]``, ``obsp[f"{key}_attention"]``.
PREDICTION_KEY = "hespotex"
#: Suffix of the decoder attention ``predict`` writes: ``obsp[f"{key}_attention"]``.
ATTENTION_SUFFIX = "_attention"
#: Suffix of the summaries ``hx.tl.attention`` writes: ``f"{key}_attention_stats"`` (never the obsp key).
ATTENTION_STATS_SUFFIX = "_attention_stats"
#: Suffix of the scores ``hx.tl.evaluate`` writes: ``uns[f"{key}_evaluation"]``.
EVALUATION_SUFFIX = "_evaluation"
#: Default ``key_added`` of ``hx.tl.diagnostic_patches``.
DIAGNOSTIC_KEY = "diagnostic_patches"
#: Removal release of the argument names deprecated in 0.2 (see :mod:`hespotex._compat`).
REMOVAL_RELEASE = "0.3"


def attention_key(key: str = PREDICTION_KEY) -> str:
    """``obsp`` key of the decoder attention written by ``hx.tl.predict(key_added=key)``."""
    return f"{key}{ATTENTION_SUFFIX}"


def attention_stats_key(key: str = PREDICTION_KEY) -> str:
    """Default ``key_added`` of ``hx.tl.attention(key=key)``."""
    return f"{key}{ATTENTION_STATS_SUFFIX}"


def evaluation_key(key: str = PREDICTION_KEY) -> str:
    """Default ``key_added`` of ``hx.tl.evaluate(key=key)``: ``uns[f"{key}_evaluation"]``."""
    return f"{key}{EVALUATION_SUFFIX}"
