"""Published peers of HESpotEx from LazySlide's zoo, scored by :func:`hespotex.tl.cross_validate`.

A peer is a pretrained expression predictor: nothing is fitted on the training fold; it predicts
the held-out samples of each fold from their image embeddings, on the fold's genes, and is scored
beside HESpotEx and the baselines exactly as they are.

- ``"stpath"``: STPath (Huang et al., npj Digit. Med. 2025), as ``lazyslide-models`` builds it: a
  spatial transformer over the GigaPath tile features and coordinates of a whole slide that
  predicts log1p expression of 38,982 genes. It needs the samples embedded with the zoo's
  ``"gigapath"`` encoder (``hx.pp.embed(sdata, encoder="gigapath")``, 224 px at 0.5 µm/px), and
  its weights: ``stfm.pth`` of ``tlhuang/STPath`` and the gene vocabulary
  ``STPath/symbol2ensembl.json`` of ``RendeiroLab/LazySlide-models``, from the hub cache or local
  files (``baseline_kwargs={"stpath": {"model_path": ..., "gene_voc_path": ...}}``; also
  ``organ_type``, ``tech_type``, ``max_spots``). Genes outside its vocabulary are predicted as
  ``NaN`` (so their Pearson is ``NaN``). Its output is on its own log1p scale: compare Pearson,
  not MSE.
- ``"deepspotm"``: DeepSpot-M (Nonchev et al., medRxiv 2026) from its own package ``deepspotm``:
  predicts from each held-out spot's H&E tile (the samples must hold their image), not from the
  embeddings; see :mod:`hespotex.tl.evaluation._peer_deepspotm`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from hespotex.pp._embed import EMBED_KEY

logger = logging.getLogger("hespotex")

PEER_METHODS = ("stpath", "deepspotm")


def _check_features(tables: Mapping[str, Any], embedding_key: str, *, peer: str, encoder: str) -> None:
    """Insist that every test sample was embedded with the zoo encoder the peer was trained on."""
    for name, table in tables.items():
        record = table.uns.get(EMBED_KEY, {}).get(embedding_key, {})
        entry = record.get("encoder_entry") or {}
        if entry.get("name") != encoder:
            msg = (
                f"{peer} predicts from {encoder!r} features; obsm[{embedding_key!r}] of {name!r} was made with "
                f"{record.get('encoder', 'an unrecorded encoder')!r}. Embed the samples with "
                f"hx.pp.embed(sdata, encoder={encoder!r}, key_added=...) and pass that key as `embedding_key`."
            )
            raise ValueError(msg)


def load_stpath(genes: list[str], **kwargs: Any) -> Any:
    """STPath from ``lazyslide-models``, restricted to ``genes``; clear errors when its files are absent."""
    try:
        from lazyslide_models.feature_prediction import STPath
    except ImportError as err:
        msg = "The STPath peer needs lazyslide-models and einops (`pip install 'hespotex[zoo]'`)."
        raise ImportError(msg) from err
    try:
        return STPath(genes=genes, **kwargs)
    except OSError as err:
        msg = (
            f"STPath's files are not on this machine ({type(err).__name__}: {str(err)[:160]}). Download the weights "
            "`hf download tlhuang/STPath stfm.pth` and the vocabulary `hf download RendeiroLab/LazySlide-models "
            "STPath/symbol2ensembl.json` where there is network (into the hub cache), or pass the files: "
            "baseline_kwargs={'stpath': {'model_path': 'stfm.pth', 'gene_voc_path': 'symbol2ensembl.json'}}."
        )
        raise FileNotFoundError(msg) from err


def peer_predictions(
    kind: str,
    tables: Mapping[str, Any],
    test_data: Mapping[str, Any],
    genes: list[str],
    *,
    embedding_key: str,
    kwargs: Mapping[str, Any],
    samples: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Predictions ``(n_spots, n_genes)`` of a pretrained peer for every test sample of a fold."""
    if kind == "deepspotm":
        from hespotex.tl.evaluation._peer_deepspotm import deepspotm_predictions

        return deepspotm_predictions(samples or {}, list(genes), kwargs=kwargs)
    if kind != "stpath":
        msg = f"Unknown peer {kind!r}; the peers are {PEER_METHODS}."
        raise ValueError(msg)
    _check_features(tables, embedding_key, peer="STPath", encoder="gigapath")
    model = load_stpath(list(genes), **dict(kwargs))
    column = {g: j for j, g in enumerate(genes)}
    out = {}
    for name, data in test_data.items():
        scores = model.predict(
            np.asarray(data.emb, dtype=np.float32), coords=np.asarray(data.coords_um, dtype=np.float32)
        )
        pred = np.full((data.emb.shape[0], len(genes)), np.nan, dtype=np.float32)
        for gene, values in scores.items():
            pred[:, column[gene]] = values
        missing = len(genes) - len(scores)
        if missing:
            logger.info(
                "STPath has no output for %d of the %d genes of %s (not in its vocabulary).", missing, len(genes), name
            )
        out[name] = pred
    return out
