"""Prediction tables: what ``hx.tl.predict`` records with a prediction (``uns[key_added]["params"]``) and how
every reader (attention, diagnostic patches, evaluation, plots) finds the prediction table, layer and record."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hespotex._sample import get_table
from hespotex.pp._targets import TARGET_NORMS

if TYPE_CHECKING:
    from anndata import AnnData

    from hespotex.tl.model._model import HESpotEx

PREDICTION_KEY = "hespotex"  # default key_added of hx.tl.predict: layer, table and uns entry


def prediction_params(
    model: HESpotEx, embed_params: dict[str, Any], *, key_added: str, attention: bool
) -> dict[str, Any]:
    """``uns[key_added]["params"]`` of a prediction: model id, genes hash, encoder, patch size, seed, config, versions, keys."""
    setup = model.setup_dict()
    return {
        "model_id": model.model_id,
        "genes_hash": setup["gene_hash"],
        "n_genes": len(model.genes),
        "encoder": embed_params.get("encoder"),
        "encoder_id": embed_params.get("encoder_id"),
        "patch_um": embed_params.get("patch_um"),
        "seed": model.config.seed,
        "target_sum": model.target_sum,
        "target_norm": model.target_norm,
        "target": TARGET_NORMS[model.target_norm],
        "embedding_norm": model.embedding_norm,
        "tta": model.embedding.get("tta"),
        "stain_augment_views": int((model.stain_augment or {}).get("n_views", 0)),  # 0: trained on clean embeddings only
        "config": setup["config"],
        "versions": setup["versions"],
        "layer": key_added,
        "latent_key": f"X_{key_added}",
        "attention_key": f"{key_added}_attention" if attention else None,
    }


def spot_tables(data: Any) -> list[tuple[str, AnnData]]:
    """The sample's spot table first, then other tables of the same spots (e.g. ``tables["hespotex"]`` from predict)."""
    main = get_table(data)
    out = [("table", main)]
    if hasattr(data, "tables"):
        for name, t in data.tables.items():
            if t is not main and t.n_obs == main.n_obs and t.obs_names.equals(main.obs_names):
                out.append((str(name), t))
    return out
