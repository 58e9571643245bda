"""Streaming prediction of a :class:`~hespotex.tl.HESpotExEnsemble` (``hx.tl.predict(ensemble, out=...)``).

The embeddings (stage 1 of :mod:`hespotex.tl.prediction._stream`) are shared: every member uses the same
encoder and patch size. Stages 2 and 3 (graph blocks, expression rows) run once per member, each in its own
progress sub-group ``member_{k}`` with its own done markers, so an interrupted run resumes inside the member
it was in. A last stage combines the members row step by row step into the mean ``expression`` and the spread
``spread`` (the members' standard deviation per spot and gene, as in memory), again with done markers, and their
agreement per gene (over at most ``AGREEMENT_SPOTS`` spots, whole row chunks drawn at random beyond). The
latent is the first member's and the attention the members' mean (each row still sums to 1), as
:meth:`HESpotExEnsemble.predict_graph` gives in memory. Peak memory is one member's per-spot arrays and one
row step of every member's expression (``n_members`` × ~64 MB).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._settings import settings
from hespotex.tl.prediction._stream_stages import model_stages

if TYPE_CHECKING:
    from hespotex.tl.model._data import GraphData
    from hespotex.tl.model._ensemble import HESpotExEnsemble

logger = logging.getLogger("hespotex")

MEMBER_GROUP = "member_{}"
AGREEMENT_SPOTS = 50_000  # spots behind a streamed prediction's member agreement (all of them when fewer)


def _rows_array(group: Any, name: str, shape: tuple[int, int], rows: int, done: str) -> Any:
    """The float32 array ``name`` (created when missing or of another shape, dropping the done markers ``done``
    with it: a marker never vouches for rows that are not there)."""
    if name in group:
        if tuple(group[name].shape) == tuple(shape):
            return group[name]
        del group[name]
    if done in group:
        del group[done]
    return group.create_array(name, shape=shape, chunks=(rows, shape[1]), dtype=np.float32)


def _markers(group: Any, name: str, n: int) -> Any:
    if name in group:
        return group[name]
    return group.create_array(name, shape=(max(n, 1),), chunks=(1,), dtype=bool, fill_value=False)


def ensemble_stages(
    group: Any,
    model: HESpotExEnsemble,
    sample: GraphData,
    *,
    layout: dict[str, Any],
    device: str | None,
    smooth: float | None = None,
) -> tuple[np.ndarray, Any, Any, Any, np.ndarray, int]:
    """Stages 2 and 3 for every member, then the combination: ``(latent, attention, expression, spread, agreement,
    n_agreement)``, expression and spread zarr arrays of the progress group in table order, the members'
    agreement per gene and the number of spots it used (:func:`sampled_agreement`)."""
    latent = attention = None
    members = []
    for k, member in enumerate(model.members):
        logger.info("Ensemble member %d of %d.", k + 1, len(model.members))
        lat, att, expr = model_stages(
            group.require_group(MEMBER_GROUP.format(k)), member, sample, layout=layout, device=device, smooth=smooth
        )
        members.append(expr)
        if k == 0:
            latent = lat
        if att is not None:
            attention = att if attention is None else attention + att
    if attention is not None:
        attention = (attention / len(model.members)).tocsr()
    expr, spread = combine_stage(group, members, step=layout["expression_step"], rows=layout["expression_rows"])
    agreement, n_used = sampled_agreement(members, rows=layout["expression_rows"])
    return latent, attention, expr, spread, agreement, n_used


def sampled_agreement(
    members: list[Any], *, rows: int, max_spots: int = AGREEMENT_SPOTS, seed: int = 0
) -> tuple[np.ndarray, int]:
    """The members' agreement per gene (:func:`~hespotex.tl.model._ensemble.member_agreement`) over every spot, or
    over whole row chunks drawn at random (``seed``) until ``max_spots`` spots when there are more; one chunk of
    every member in memory at a time. Returns the agreement and the number of spots it used."""
    from hespotex.tl.model._ensemble import AgreementStats

    n, n_genes = (int(s) for s in members[0].shape)
    n_chunks = -(-n // rows)
    chunks = np.arange(n_chunks)
    if n > max_spots:
        chunks = np.sort(np.random.default_rng(seed).permutation(n_chunks)[: max(1, max_spots // rows)])
    stats = AgreementStats(len(members), n_genes)
    for j in chunks:
        a, b = int(j) * rows, min(n, (int(j) + 1) * rows)
        stats.update(np.stack([np.asarray(m[a:b], dtype=np.float32) for m in members]))
    return stats.agreement(), stats.n


def combine_stage(group: Any, members: list[Any], *, step: int, rows: int) -> tuple[Any, Any]:
    """The members' mean and standard deviation (``ddof=0``), ``step`` rows at a time, whole zarr chunks each."""
    from tqdm.auto import tqdm

    n, n_genes = (int(s) for s in members[0].shape)
    expr = _rows_array(group, "expression", (n, n_genes), rows, done="combined_done")
    spread = _rows_array(group, "spread", (n, n_genes), rows, done="combined_done")
    n_steps = -(-n // step)
    done = _markers(group, "combined_done", n_steps)
    todo = [int(j) for j in np.flatnonzero(~np.asarray(done[:n_steps], dtype=bool))]
    logger.info("Ensemble: %d of %d row chunks to combine (%d done before).", len(todo), n_steps, n_steps - len(todo))
    for j in tqdm(todo, desc="combining members", unit="chunk", disable=not settings.progress):
        a, b = j * step, min(n, (j + 1) * step)
        stack = np.stack([np.asarray(m[a:b], dtype=np.float32) for m in members])
        expr[a:b] = stack.mean(axis=0)
        spread[a:b] = stack.std(axis=0)
        done[j] = True
    return expr, spread
