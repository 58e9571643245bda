"""``hx.tl.consistency``: do serial sections of one tissue tell the same story?

Serial sections of one tumour (her2st C2-C6, for example) should share their expression statistics:
the same genes high on average, the same genes spatially patterned, the same tissue domains in
similar proportions. This module measures that agreement between every pair of sections, for the
predicted expression and, side by side, for the measured expression, so a reader sees whether the
predictions are as consistent across sections as the measurements are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hespotex._compat import renamed_arguments
from hespotex._constants import MEASURED_LAYER, PREDICTION_KEY
from hespotex._sample import as_sample_dict, get_table
from hespotex.tl.prediction._tables import resolve_prediction

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger("hespotex")

__all__ = ["consistency", "morans_i"]

STATISTICS = ("mean", "morans_i", "domains")
MEASURES = {"mean": "pearson", "morans_i": "pearson", "domains": "js_distance"}
MEASURED_X = "X"  # "the log-normalised measured expression of the spot table"
GRAPH_KEY = "spatial_connectivities"
MAX_COMPONENTS = 20


def morans_i(x: Any, connectivities: Any) -> np.ndarray:
    """Moran's I of every column of ``x`` on a spatial graph, vectorised.

    ``W`` is ``connectivities`` row-standardised (each spot's neighbour weights sum to 1; spots
    without neighbours keep an empty row), and for each gene with ``z = x - mean(x)``::

        I = (N / S0) * sum_ij W_ij z_i z_j / sum_i z_i**2,    S0 = sum_ij W_ij

    Parameters
    ----------
    x
        ``(n_spots, n_genes)`` values (dense or sparse).
    connectivities
        ``(n_spots, n_spots)`` non-negative weights, rows and columns in the order of ``x``.

    Returns
    -------
    ``float64`` array of length ``n_genes``; ``NaN`` for a gene constant over the spots.
    """
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    w = sp.csr_matrix(connectivities, dtype=np.float64)
    n = x.shape[0]
    if w.shape != (n, n):
        msg = f"Expected a ({n}, {n}) graph for {n} spots, found {w.shape}."
        raise ValueError(msg)
    w.setdiag(0)
    w.eliminate_zeros()
    rows = np.asarray(w.sum(axis=1)).ravel()
    w = sp.diags(np.divide(1.0, rows, out=np.zeros_like(rows), where=rows > 0)) @ w
    s0 = float(w.sum())
    z = x - x.mean(axis=0)
    num = np.einsum("ij,ij->j", z, np.asarray(w @ z))
    den = np.einsum("ij,ij->j", z, z)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (n / s0) * num / den if s0 > 0 else np.full(x.shape[1], np.nan)
    scale = np.abs(x).max(axis=0) + 1.0
    out[den <= (1e-12 * scale) ** 2 * n] = np.nan
    return out


# --------------------------------------------------------------------------------------------------
# reading the sections


def _tables(sample: Any) -> list[AnnData]:
    main = get_table(sample)
    out = [main]
    if hasattr(sample, "tables"):
        out += [t for t in sample.tables.values() if t is not main and t.obs_names.equals(main.obs_names)]
    return out


def _source(sample: Any, name: str, what: str, section: str) -> tuple[AnnData, str]:
    if what == "predicted":
        try:
            found = resolve_prediction(sample, name)
        except KeyError as err:
            msg = f"Section {section!r}: found no predicted expression. {err.args[0]}"
            raise KeyError(msg) from None
        return found.table, found.layer
    tables = _tables(sample)
    if name == MEASURED_X:
        return tables[0], name
    for t in tables:
        if name in t.layers:
            return t, name
    found = sorted({k for t in tables for k in t.layers})
    hint = (
        "Run `hx.tl.predict` first."
        if what == "predicted"
        else f"Pass `truth={MEASURED_X!r}` for the table's measured counts."
    )
    msg = f"Section {section!r}: expected the {what} expression in layers[{name!r}], found layers {found}. {hint}"
    raise KeyError(msg)


def _values(table: AnnData, name: str, genes: list[str]) -> np.ndarray:
    from hespotex.pp._normalize import log_expression

    if name == MEASURED_X:
        return log_expression(table, genes).astype(np.float64)
    idx = table.var_names.get_indexer(genes)
    x = table.layers[name][:, idx]
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    if not np.isfinite(x).all():
        msg = f"layers[{name!r}] holds NaN or infinite values; expected finite expression."
        raise ValueError(msg)
    return x


def _graph(table: AnnData, n_neighbors: int) -> tuple[sp.csr_matrix, str]:
    from hespotex._sample import SAMPLE_KEY, spot_centres_um
    from hespotex.pp._graph import knn_graph

    if GRAPH_KEY in table.obsp:
        return sp.csr_matrix(table.obsp[GRAPH_KEY]), f"obsp[{GRAPH_KEY!r}]"
    coords = (
        spot_centres_um(table)
        if SAMPLE_KEY in table.uns
        else np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    )
    conn, _ = knn_graph(coords, n_neighbors)
    return conn, f"{n_neighbors}-nearest-neighbour graph of the spot centres"


def _domains(blocks: list[np.ndarray], n_domains: int, seed: int) -> tuple[list[np.ndarray], int]:
    """Cluster all sections' spots jointly; per-section domain fractions and the number of PCs used."""
    from sklearn.cluster import KMeans

    x = np.concatenate(blocks)
    sd = x.std(axis=0)
    keep = sd > 0
    if not keep.any():
        return [np.full(n_domains, np.nan) for _ in blocks], 0
    z = (x[:, keep] - x[:, keep].mean(axis=0)) / sd[keep]
    k = int(min(MAX_COMPONENTS, z.shape[1], z.shape[0] - 1))
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    u *= np.where(u[np.abs(u).argmax(axis=0), range(u.shape[1])] < 0, -1.0, 1.0)  # deterministic signs
    pcs = u[:, :k] * s[:k]
    labels = KMeans(n_clusters=n_domains, n_init=10, random_state=seed).fit_predict(pcs)
    out, start = [], 0
    for b in blocks:
        lab = labels[start : start + len(b)]
        out.append(np.bincount(lab, minlength=n_domains) / len(b))
        start += len(b)
    return out, k


def _pearson(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    if n < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan"), n
    return float(np.corrcoef(a[ok], b[ok])[0, 1]), n


def _js(p: np.ndarray, q: np.ndarray) -> float:
    from scipy.spatial.distance import jensenshannon

    if not (np.isfinite(p).all() and np.isfinite(q).all()):
        return float("nan")
    return float(jensenshannon(p, q, base=2))


# --------------------------------------------------------------------------------------------------
# the tool


@renamed_arguments("tl.consistency")
def consistency(
    samples: Any,
    *,
    key: str = PREDICTION_KEY,
    truth: str | bool | None = MEASURED_LAYER,
    genes: Sequence[str] | None = None,
    n_domains: int = 5,
    statistics: Sequence[str] = STATISTICS,
    n_neighbors: int = 6,
    seed: int = 0,
) -> pd.DataFrame:
    """Agreement of expression statistics between serial sections, predicted beside measured.

    For every section and gene three statistics are computed, on the predicted expression
    (``key``) and, separately, on the measured expression (``truth``):

    - ``"mean"``: the gene's mean over the section's spots;
    - ``"morans_i"``: the gene's Moran's I (spatial autocorrelation, :func:`morans_i`) on the
      section's spatial graph: ``obsp["spatial_connectivities"]`` when the table has one
      (:func:`hespotex.pp.spatial_graph`), else an ``n_neighbors``-nearest-neighbour graph of the spot
      centres in µm; weights row-standardised;
    - ``"domains"``: the fraction of the section's spots in each of ``n_domains`` spatial domains.
      Domains are found once for all sections together: the spots of every section are pooled,
      each gene is z-scored over the pool, the first (up to) 20 principal components are clustered
      with k-means (``n_init=10``, ``random_state=seed``). Predicted and measured expression are
      clustered separately (their domains need not match; each is compared only with itself).

    Agreement between two sections ``a`` and ``b`` is then, for ``"mean"`` and ``"morans_i"``, the
    Pearson correlation across genes of the statistic in ``a`` and in ``b`` (genes where either is
    undefined are left out; higher = more consistent), and for ``"domains"`` the Jensen-Shannon
    distance (base 2, in ``[0, 1]``; lower = more consistent) between the two domain compositions.

    Parameters
    ----------
    samples
        Two or more sections: a dict ``{name: sample}`` or a list (names from
        ``uns["hespotex_sample"]["sample_id"]``); each a SpatialData (its tables are searched for the
        prediction, e.g. ``tables["hespotex"]`` written by :func:`hespotex.tl.predict`) or an AnnData.
    key
        The prediction to read: the ``key_added`` given to :func:`hespotex.tl.predict` (its recorded layer,
        in whichever table of the section holds it), or the name of another layer (a baseline).
        Formerly ``layer``.
    truth
        Layer of measured log-normalised expression (``"measured"``, written by
        :func:`hespotex.tl.predict`), ``"X"`` for the log-normalised counts of the spot table
        (log1p CP10k, library over all genes), or ``None`` / ``False`` to report predictions only.
        Formerly ``measured``.
    genes
        Genes to compare; default those present in every section (in both layers).
    n_domains
        Number of spatial domains.
    statistics
        Which of ``"mean"``, ``"morans_i"``, ``"domains"`` to compute.
    n_neighbors
        Neighbours per spot of the graph built when a section has none stored.
    seed
        Seed of the domain clustering.

    Returns
    -------
    A tidy :class:`pandas.DataFrame`, one row per statistic and pair of sections, with columns
    ``statistic``, ``measure`` (``"pearson"`` or ``"js_distance"``), ``section_a``, ``section_b``,
    ``predicted``, ``measured`` (NaN without ``truth``) and ``n`` (genes compared, or domains).
    ``attrs["per_section"]`` holds the statistics themselves (columns ``statistic``, ``section``,
    ``feature`` (gene or domain), ``predicted``, ``measured``) and ``attrs["params"]`` every parameter
    and where each section's data and graph came from. Writes nothing.
    """
    statistics = [statistics] if isinstance(statistics, str) else list(statistics)
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown or not statistics:
        msg = f"Expected statistics among {list(STATISTICS)}, found {statistics}."
        raise ValueError(msg)
    sections = as_sample_dict(samples)
    if len(sections) < 2:
        msg = f"Consistency compares sections: expected two or more, found {len(sections)} ({list(sections)})."
        raise ValueError(msg)
    if isinstance(n_domains, bool) or int(n_domains) < 2:
        msg = f"Expected `n_domains` of at least 2, found {n_domains!r}."
        raise ValueError(msg)
    if truth is True:
        truth = MEASURED_LAYER
    measured = None if truth is None or truth is False else str(truth)
    kinds = {"predicted": key} if measured is None else {"predicted": key, "measured": measured}
    found = {name: {kind: _source(s, lay, kind, name) for kind, lay in kinds.items()} for name, s in sections.items()}
    sources = {name: {kind: t for kind, (t, _) in src.items()} for name, src in found.items()}
    available = [set(t.var_names) for src in sources.values() for t in src.values()]
    first = next(iter(sources.values()))["predicted"]
    if genes is None:
        genes = [g for g in first.var_names if all(g in a for a in available)]
        if not genes:
            msg = f"The sections share no gene across layers {list(kinds.values())}; pass `genes=`."
            raise ValueError(msg)
    else:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        for name, src in sources.items():
            missing = [g for t in src.values() for g in genes if g not in t.var_names]
            if missing:
                msg = (
                    f"Section {name!r} lacks {len(set(missing))} of the requested genes, e.g. "
                    f"{sorted(set(missing))[:5]}."
                )
                raise KeyError(msg)
    total = sum(src["predicted"].n_obs for src in sources.values())
    if "domains" in statistics and n_domains > total:
        msg = f"Asked for {n_domains} domains but the sections have {total} spots in all; lower `n_domains`."
        raise ValueError(msg)

    values = {k: {} for k in kinds}
    graphs, graph_info = {}, {}
    for name, src in sources.items():
        for kind, table in src.items():
            values[kind][name] = _values(table, found[name][kind][1], genes)
        if "morans_i" in statistics:
            graphs[name], graph_info[name] = _graph(src["predicted"], n_neighbors)

    per_section: list[pd.DataFrame] = []
    stats: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for stat in statistics:
        stats[stat] = {}
        for kind in kinds:
            if stat == "mean":
                stats[stat][kind] = {n: v.mean(axis=0) for n, v in values[kind].items()}
            elif stat == "morans_i":
                stats[stat][kind] = {n: morans_i(v, graphs[n]) for n, v in values[kind].items()}
            else:
                comp, _ = _domains(list(values[kind].values()), int(n_domains), seed)
                stats[stat][kind] = dict(zip(values[kind], comp, strict=True))
        features = genes if stat != "domains" else [f"domain_{i}" for i in range(int(n_domains))]
        for name in sections:
            per_section.append(
                pd.DataFrame(
                    {
                        "statistic": stat,
                        "section": name,
                        "feature": features,
                        "predicted": stats[stat]["predicted"][name],
                        "measured": stats[stat]["measured"][name] if measured is not None else np.nan,
                    }
                )
            )

    rows = []
    for stat in statistics:
        for a, b in combinations(sections, 2):
            row = {"statistic": stat, "measure": MEASURES[stat], "section_a": a, "section_b": b}
            for kind in ("predicted", "measured"):
                if kind not in kinds:
                    row[kind] = np.nan
                    continue
                sa, sb = stats[stat][kind][a], stats[stat][kind][b]
                if stat == "domains":
                    row[kind], row["n"] = _js(sa, sb), int(n_domains)
                else:
                    row[kind], n_used = _pearson(sa, sb)
                    row["n"] = n_used if kind == "predicted" else row["n"]
            rows.append(row)
    out = pd.DataFrame(rows, columns=["statistic", "measure", "section_a", "section_b", "predicted", "measured", "n"])
    out["n"] = out["n"].astype(np.int64)
    out.attrs["per_section"] = pd.concat(per_section, ignore_index=True)
    out.attrs["params"] = {
        "key": key,
        "layers": {name: src["predicted"][1] for name, src in found.items()},
        "truth": measured,
        "genes": list(genes),
        "n_domains": int(n_domains),
        "statistics": statistics,
        "n_neighbors": n_neighbors,
        "seed": seed,
        "graphs": graph_info,
        "sections": list(sections),
        "agreement": {
            "mean": "Pearson across genes",
            "morans_i": "Pearson across genes",
            "domains": "Jensen-Shannon distance (base 2)",
        },
    }
    logger.info("Compared %d sections on %d genes: %s.", len(sections), len(genes), statistics)
    return out
