"""``hx.tl.explain``: what drives a predicted gene or gene programme at a spot.

Two attributions, both by integrated gradients (:class:`captum.attr.IntegratedGradients`) of a
*score*, the weighted mean of the predicted log expression of the chosen genes at the target spot:

- **pixels**: through the frozen image encoder, the model's embedding standardisation and
  :class:`~hespotex.models.HESpotExNet`, on exactly the patch the encoder saw when the slide was
  embedded (same crop geometry, resizing and normalisation as :func:`hespotex.pp.embed`). The
  neighbours' embeddings stay at their stored values; only the target's patch varies, from a
  baseline patch (white glass by default) to the real one.
- **neighbouring spots**: with respect to the standardised embeddings of every spot that can reach
  the target through the decoder's ``n_hops`` graph layers, from the all-zero baseline (every spot
  at the training mean embedding); attributions are summed over embedding dimensions per source spot.

Integrated gradients are complete: the attributions sum to ``score(input) - score(baseline)`` up to
the integration error, which captum reports as the convergence delta (stored).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hespotex._sample import SAMPLE_KEY, get_sample_info, get_table
from hespotex._settings import resolve_device, settings
from hespotex.tl._data import EMBEDDING_KEY, graph_data, induced_edges, k_hop_halo
from hespotex.tl._model import HESpotEx

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from hespotex.pp._encoders import Encoder
    from hespotex.pp._patches import PatchPlan

logger = logging.getLogger("hespotex")

__all__ = ["Explanation", "explain", "patch_saliency"]

BASELINES = ("white", "black", "blur")
EMBED_RECORD_KEY = "hespotex_embed"


@dataclass
class Explanation:
    """Attributions of a gene score at a few spots (returned by :func:`explain`).

    The *score* at a spot is ``sum_g w_g * y_g`` with ``y_g`` the predicted log1p expression and the
    weights ``w`` normalised to ``sum_g |w_g| = 1`` (a plain mean for a list of genes).

    Attributes
    ----------
    spots
        ``obs_names`` of the explained spots, in the order of every per-spot array.
    genes, weights
        The genes of the score and their normalised weights.
    score
        ``(n_spots,)`` the model's score at each spot (from a whole-slide prediction).
    patches
        ``(n_spots, h, w, 3)`` uint8: the patch each spot's embedding was computed from, at the encoder
        input size; ``None`` without pixel attribution.
    saliency
        ``(n_spots, h, w)`` float32: absolute integrated-gradients attribution summed over the colour
        channels (not normalised); ``None`` without pixel attribution.
    pixel_attribution_sum
        ``(n_spots,)`` sum of the signed pixel attributions (over pixels and channels).
    pixel_score, pixel_baseline_score
        ``(n_spots,)`` the score with the real patch (recomputed through the encoder: equals ``score``
        when the stored embeddings came from this image and encoder) and with the baseline patch.
    pixel_delta
        ``(n_spots,)`` captum's convergence delta: ``pixel_attribution_sum - (pixel_score - pixel_baseline_score)``.
    neighbours
        Tidy table, one row per (target, source) pair: ``target``, ``source`` (obs names), ``hop`` (graph
        distance; 0 for the spot itself), ``attribution`` (signed, summed over embedding dimensions),
        ``share`` (``|attribution|`` over the target's total ``|attribution|``) and ``attention`` (the
        decoder's attention of target on source; NaN beyond one hop or for decoders without attention).
        ``None`` without neighbour attribution.
    agreement
        Per target (index): ``spearman`` rank correlation of ``|attribution|`` and attention over the
        target's one-hop sources (itself included), ``top_attribution`` and ``top_attention`` (the strongest
        one-hop neighbour, self excluded, by each), ``top_match`` (whether they agree), ``self_share``,
        ``self_attention``, and ``delta`` (the convergence delta of the neighbour attribution).
    params
        Every parameter that shaped the result (model id, encoder, patch size, baseline, steps, ...).
    """

    spots: list[str]
    genes: list[str]
    weights: np.ndarray
    score: np.ndarray
    patches: np.ndarray | None = None
    saliency: np.ndarray | None = None
    pixel_attribution_sum: np.ndarray | None = None
    pixel_score: np.ndarray | None = None
    pixel_baseline_score: np.ndarray | None = None
    pixel_delta: np.ndarray | None = None
    neighbours: pd.DataFrame | None = None
    agreement: pd.DataFrame | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        parts = [f"{len(self.spots)} spots", f"{len(self.genes)} genes"]
        if self.saliency is not None:
            parts.append(f"pixel saliency {self.saliency.shape[1]}x{self.saliency.shape[2]}")
        if self.neighbours is not None:
            parts.append(f"{len(self.neighbours)} neighbour attributions")
        return f"Explanation({', '.join(parts)})"

    def normalised_saliency(self) -> np.ndarray:
        """:attr:`saliency` scaled to [0, 1] per patch (each patch divided by its maximum)."""
        if self.saliency is None:
            msg = "This explanation has no pixel saliency: explain a SpatialData with its image (`pixels=True`)."
            raise ValueError(msg)
        return _normalise_per_patch(self.saliency)


# ---------------------------------------------------------------------------------------------- inputs


def _resolve_score(model: HESpotEx, genes: Any, signature: Any) -> tuple[list[str], np.ndarray]:
    """Genes and weights (``sum |w| = 1``) of the score from ``genes`` or ``signature``."""
    if (genes is None) == (signature is None):
        msg = "Pass exactly one of `genes` (a gene or list of genes) and `signature` (a list of genes or a dict gene -> weight)."
        raise ValueError(msg)
    spec = genes if genes is not None else signature
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping):
        names = [str(g) for g in spec]
        weights = np.array([float(spec[g]) for g in spec], dtype=np.float64)
    elif isinstance(spec, Sequence | np.ndarray | pd.Index):
        names = [str(g) for g in spec]
        weights = np.ones(len(names), dtype=np.float64)
    else:
        msg = f"Expected genes as a string, a list of strings or a dict gene -> weight, found {type(spec).__name__}."
        raise TypeError(msg)
    if not names:
        msg = "Expected at least one gene, found none."
        raise ValueError(msg)
    if len(set(names)) != len(names):
        msg = f"Genes are listed more than once: {sorted({g for g in names if names.count(g) > 1})}."
        raise ValueError(msg)
    known = set(model.genes)
    unknown = [g for g in names if g not in known]
    if unknown:
        import difflib

        hints = {g: difflib.get_close_matches(g, model.genes, n=3) for g in unknown[:5]}
        msg = (
            f"The model does not predict {len(unknown)} of the requested genes: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (close matches: {hints}). Choose genes from `model.genes`."
        )
        raise KeyError(msg)
    if not np.isfinite(weights).all() or np.abs(weights).sum() == 0:
        msg = "Expected finite signature weights that are not all zero."
        raise ValueError(msg)
    return names, weights / np.abs(weights).sum()


def _positions(table: AnnData, spots: Any) -> np.ndarray:
    """Table positions of ``spots`` (obs names, or integer positions)."""
    if isinstance(spots, str):
        spots = [spots]
    arr = np.asarray(list(spots))
    if arr.size == 0:
        msg = "Expected at least one spot, found an empty selection."
        raise ValueError(msg)
    if arr.dtype.kind in "iu":
        idx = arr.astype(np.int64)
        bad = arr[(idx < 0) | (idx >= table.n_obs)]
    else:
        idx = table.obs_names.get_indexer(arr.astype(str))
        bad = arr[idx < 0]
    if len(bad):
        msg = (
            f"{len(bad)} requested spots are not in the table: {list(bad[:10])}. Pass obs names of the table "
            f"(e.g. {list(table.obs_names[:3])}) or positions below {table.n_obs}."
        )
        raise KeyError(msg)
    if len(set(idx.tolist())) != len(idx):
        msg = "Each spot may be explained once; remove the duplicates from `spots`."
        raise ValueError(msg)
    return idx


def _has_image(data: Any) -> bool:
    if not hasattr(data, "images"):
        return False
    try:
        key = get_sample_info(data).image_key
    except KeyError:
        return False
    return key is not None and key in data.images


def _check_baseline(baseline: str) -> None:
    if baseline not in BASELINES:
        msg = f"Expected `baseline` to be one of {BASELINES}, found {baseline!r}."
        raise ValueError(msg)


def _check_steps(n_steps: int, internal_batch_size: int | None) -> None:
    if not isinstance(n_steps, (int, np.integer)) or n_steps < 2:
        msg = f"Expected `n_steps` to be an integer of at least 2, found {n_steps!r}."
        raise ValueError(msg)
    if internal_batch_size is not None and internal_batch_size < 1:
        msg = f"Expected a positive `internal_batch_size` (or None), found {internal_batch_size!r}."
        raise ValueError(msg)


def _load_model_encoder(model: HESpotEx) -> Encoder:
    """The model's frozen encoder, loaded as :func:`hespotex.pp.embed` loads it from the same record."""
    from hespotex.pp._encoders import load_encoder

    rec = model.embedding
    name = rec.get("encoder")
    if name in (None, "unknown"):
        msg = "The model has no record of its image encoder, so the pixels cannot be attributed. Explain the neighbours only (`pixels=False`)."
        raise ValueError(msg)
    # the same arguments ensure_embeddings/predict hand to hx.pp.embed
    enc = load_encoder(name, weights=rec.get("weights"), seed=int(rec.get("seed", 0)), input_size=rec.get("input_size"))
    expected = rec.get("encoder_id")
    if expected not in (None, "unknown") and enc.encoder_id != expected:
        msg = (
            f"Loading the model's encoder {name!r} gave {enc.encoder_id!r}, but the model was trained on embeddings of "
            f"{expected!r}; the attributions would explain another network. Make the same weights available "
            f"(weights={rec.get('weights')!r})."
        )
        raise ValueError(msg)
    return enc


def _patch_plan(data: Any, table: AnnData, model: HESpotEx, enc: Encoder, embedding_key: str) -> PatchPlan:
    """The crops the slide's embeddings were computed from (checked against the slide's embedding record)."""
    from hespotex.pp._patches import plan_patches

    plan = plan_patches(data, patch_um=model.embedding.get("patch_um"), out_px=enc.input_size)
    record = table.uns.get(EMBED_RECORD_KEY, {}).get(embedding_key)
    if record is not None:
        if record.get("encoder_id") != enc.encoder_id or not np.isclose(record.get("patch_um", np.nan), plan.patch_um):
            msg = (
                f"obsm[{embedding_key!r}] was made with {record.get('encoder_id')!r} at {record.get('patch_um')} µm, the model "
                f"uses {enc.encoder_id!r} at {plan.patch_um} µm. Re-embed the slide with the model's encoder (hx.tl.predict does)."
            )
            raise ValueError(msg)
        if record.get("crop_px", plan.size) != plan.size or record.get("level", plan.level.level) != plan.level.level:
            msg = (
                f"The slide's embeddings were cut as {record.get('crop_px')} px crops from pyramid level {record.get('level')}; "
                f"the image now gives {plan.size} px crops from level {plan.level.level}. The image changed since it was "
                "embedded: embed it again (hx.pp.embed(..., overwrite=True)) and predict again."
            )
            raise ValueError(msg)
    else:
        logger.warning(
            "obsm[%r] has no embedding record; cannot check that the patches are the ones it was computed from.",
            embedding_key,
        )
    return plan


# ---------------------------------------------------------------------------------------------- model pieces


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module, device: Any = None) -> Iterator[None]:
    """Eval mode, no parameter gradients and ``device`` for ``modules``, gradients on for inputs (even inside
    ``torch.inference_mode``); the modules' flags and devices are restored afterwards."""
    import torch

    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for m in modules]
    places = [(m, next(iter([*m.parameters(), *m.buffers()]), None)) for m in modules]
    places = [(m, t.device) for m, t in places if t is not None]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for m, _ in modes:
            m.eval()
            if device is not None:
                m.to(device)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.train(mode)
        for m, dev in places:
            m.to(dev)


class _Scorer:
    """The score at a target spot as a differentiable function of its neighbourhood's standardised embeddings."""

    def __init__(
        self, model: HESpotEx, table: AnnData, embedding_key: str, genes: list[str], weights: np.ndarray, device
    ) -> None:
        import torch

        self.model = model
        self.net = model.module_
        self.device = device
        sample = graph_data(
            table, str(table.uns.get(SAMPLE_KEY, {}).get("sample_id", "slide")), genes=None, embedding_key=embedding_key
        )
        if sample.emb.shape[1] != len(model.embedding_mean_):
            msg = (
                f"Expected embeddings of width {len(model.embedding_mean_)} (encoder {model.embedding.get('encoder')!r}) in "
                f"obsm[{embedding_key!r}], found {sample.emb.shape[1]}. Predict the slide with this model first."
            )
            raise ValueError(msg)
        self.sample = sample
        self.std = model._standardised(sample).emb
        self.use_graph = self.net.decoder is not None
        cfg = self.net.config
        self.edges = sample.graph(cfg.decoder_neighbors) if self.use_graph else np.zeros((2, 0), dtype=np.int64)
        self.hops = cfg.n_hops if self.use_graph else 0
        self.gene_idx = torch.as_tensor(pd.Index(model.genes).get_indexer(genes), device=device)
        self.weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
        self.mean = torch.as_tensor(model.embedding_mean_, device=device)
        self.scale = torch.as_tensor(model.embedding_scale_, device=device)

    def predict_all(self) -> np.ndarray:
        """The score at every spot from a whole-slide prediction (``(n_spots,)``)."""
        out = self.model.predict_graph(self.sample, device=str(self.device))
        idx = self.gene_idx.cpu().numpy()
        return out["expression"][:, idx].astype(np.float64) @ self.weights.cpu().numpy().astype(np.float64)

    def neighbourhood(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nodes that reach ``t`` in ``n_hops`` (``t`` first), their induced edges and hop distances to ``t``."""
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import shortest_path

        core = np.array([t], dtype=np.int64)
        nodes = k_hop_halo(self.edges, core, self.sample.n, self.hops) if self.use_graph else core
        sub = induced_edges(self.edges, nodes, self.sample.n)
        adj = csr_matrix((np.ones(sub.shape[1]), (sub[0], sub[1])), shape=(len(nodes), len(nodes)))
        hop = shortest_path(adj, directed=False, unweighted=True, indices=0)
        return nodes, sub, np.where(np.isfinite(hop), hop, -1).astype(np.int64)

    def scores(self, emb: torch.Tensor, sub: torch.Tensor | None) -> torch.Tensor:
        """Scores ``(B,)`` at node 0 of ``B`` copies of a neighbourhood with embeddings ``emb`` ``(B, m, F)``."""
        import torch

        b, m, f = emb.shape
        edges = None
        if self.use_graph:
            offsets = (torch.arange(b, device=emb.device) * m).repeat_interleave(sub.shape[1])
            edges = sub.repeat(1, b) + offsets
        out = self.net(emb.reshape(b * m, f), edges)["expression"]
        return out[::m][:, self.gene_idx] @ self.weights

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.scale


def _normalise_per_patch(saliency: np.ndarray) -> np.ndarray:
    peak = saliency.reshape(len(saliency), -1).max(axis=1)
    peak = np.where(peak > 0, peak, 1.0)
    return (saliency / peak[:, None, None]).astype(np.float32)


def _baseline_patch(x: torch.Tensor, baseline: str) -> torch.Tensor:
    import torch

    if baseline == "white":
        return torch.ones_like(x)
    if baseline == "black":
        return torch.zeros_like(x)
    from torchvision.transforms.functional import gaussian_blur

    size = x.shape[-1]
    sigma = max(size / 16.0, 1.0)
    kernel = min(2 * int(np.ceil(3 * sigma)) + 1, 2 * ((size - 1) // 2) + 1)
    return gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def _pixel_attributions(
    scorer: _Scorer,
    enc: Encoder,
    plan: PatchPlan,
    positions: np.ndarray,
    *,
    n_steps: int,
    internal_batch_size: int | None,
    baseline: str,
    embedding_key: str,
) -> dict[str, np.ndarray]:
    import torch
    from captum.attr import IntegratedGradients
    from tqdm.auto import tqdm

    from hespotex.pp._patches import resize_batch

    dev = scorer.device
    n = len(positions)
    size = enc.input_size
    out = {
        "patches": np.empty((n, size, size, 3), dtype=np.uint8),
        "saliency": np.empty((n, size, size), dtype=np.float32),
        "pixel_attribution_sum": np.empty(n),
        "pixel_score": np.empty(n),
        "pixel_baseline_score": np.empty(n),
        "pixel_delta": np.empty(n),
    }
    worst = 0.0
    enc_model = enc.model
    for i, t in enumerate(tqdm(positions, desc="pixel attributions", unit="spot", disable=not settings.progress)):
        t = int(t)
        x = resize_batch(plan.read(np.array([t])), size).to(dev)  # (1, 3, S, S) in [0, 1], as hx.pp.embed resizes
        out["patches"][i] = x[0].mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        nodes, sub, _ = scorer.neighbourhood(t)
        rest = torch.from_numpy(scorer.std[nodes[1:]]).to(dev)
        sub_t = torch.from_numpy(sub).to(dev)

        def forward(patch: torch.Tensor, rest=rest, sub_t=sub_t) -> torch.Tensor:
            z = scorer.standardise(enc_model(enc.normalize(patch)))
            emb = torch.cat([z[:, None, :], rest.expand(len(patch), *rest.shape)], dim=1)
            return scorer.scores(emb, sub_t)

        base = _baseline_patch(x, baseline)
        with torch.no_grad():
            feats = enc_model(enc.normalize(x))[0].cpu().numpy()
            stored = scorer.sample.emb[t]
            worst = max(worst, float(np.abs(feats - stored).max() / max(np.abs(stored).max(), 1e-6)))
            f_x, f_b = forward(x).item(), forward(base).item()
        ig = IntegratedGradients(forward)
        attr, delta = ig.attribute(
            x,
            baselines=base,
            n_steps=int(n_steps),
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        attr = attr[0].detach().float().cpu().numpy()
        out["saliency"][i] = np.abs(attr).sum(axis=0)
        out["pixel_attribution_sum"][i] = float(attr.sum())
        out["pixel_score"][i], out["pixel_baseline_score"][i] = f_x, f_b
        out["pixel_delta"][i] = float(delta.reshape(-1)[0])
    gap = np.abs(out["pixel_delta"]) > 0.1 * np.abs(out["pixel_score"] - out["pixel_baseline_score"]) + 0.01
    if gap.any():
        logger.warning(
            "Pixel integrated gradients are incomplete at %d of %d spots (|delta| above 10%% of the score change): the "
            "encoder is rough along the path from the %r baseline. Raise `n_steps`, or try another baseline "
            "('blur' stays closest to real tissue).",
            int(gap.sum()),
            n,
            baseline,
        )
    if worst > 1e-2:
        logger.warning(
            "The patches re-encoded for attribution differ from the stored obsm[%r] (relative difference up to %.3g): "
            "the image or encoder changed since the slide was embedded, so the attributions explain other embeddings.",
            embedding_key,
            worst,
        )
    return out


def _neighbour_attributions(
    scorer: _Scorer, table: AnnData, positions: np.ndarray, *, n_steps: int, internal_batch_size: int | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    import torch
    from captum.attr import IntegratedGradients
    from scipy.stats import spearmanr
    from tqdm.auto import tqdm

    dev = scorer.device
    names = np.asarray(table.obs_names)
    frames, rows = [], []
    for t in tqdm(positions, desc="neighbour attributions", unit="spot", disable=not settings.progress):
        t = int(t)
        nodes, sub, hop = scorer.neighbourhood(t)
        emb = torch.from_numpy(scorer.std[nodes]).to(dev)[None]  # (1, m, F)
        sub_t = torch.from_numpy(sub).to(dev)
        ig = IntegratedGradients(lambda e, sub_t=sub_t: scorer.scores(e, sub_t))
        attr, delta = ig.attribute(
            emb,
            baselines=torch.zeros_like(emb),
            n_steps=int(n_steps),
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        per_source = attr[0].sum(dim=1).detach().double().cpu().numpy()
        attention = np.full(len(nodes), np.nan)
        if scorer.use_graph:
            with torch.no_grad():
                res = scorer.net(emb[0], sub_t)
            if res["attention"] is not None:
                ei, alpha = res["attention"]
                ei, alpha = ei.cpu().numpy(), alpha.float().cpu().numpy()
                into = ei[1] == 0
                attention[ei[0][into]] = alpha[into]
        total = np.abs(per_source).sum()
        share = np.abs(per_source) / total if total > 0 else np.zeros_like(per_source)
        frames.append(
            pd.DataFrame(
                {
                    "target": names[t],
                    "source": names[nodes],
                    "hop": hop,
                    "attribution": per_source,
                    "share": share,
                    "attention": attention,
                }
            )
        )
        one_hop = np.flatnonzero(hop <= 1)
        neigh = one_hop[one_hop != 0]
        row = {
            "target": names[t],
            "delta": float(delta.reshape(-1)[0]),
            "self_share": float(share[0]),
            "self_attention": attention[0],
        }
        if len(neigh):
            row["top_attribution"] = names[nodes[neigh[np.argmax(np.abs(per_source[neigh]))]]]
        if np.isfinite(attention[one_hop]).all() and len(neigh):
            row["top_attention"] = names[nodes[neigh[np.argmax(attention[neigh])]]]
            row["top_match"] = row["top_attention"] == row["top_attribution"]
            a, b = np.abs(per_source[one_hop]), attention[one_hop]
            row["spearman"] = float(spearmanr(a, b).statistic) if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan
        rows.append(row)
    columns = ["spearman", "top_attribution", "top_attention", "top_match", "self_share", "self_attention", "delta"]
    agreement = pd.DataFrame(rows).set_index("target").reindex(columns=columns)
    agreement.index.name = "target"
    neighbours = pd.concat(frames, ignore_index=True)
    return neighbours, agreement


# ---------------------------------------------------------------------------------------------- public API


def _prepare(data: Any, model: HESpotEx | str, genes: Any, signature: Any, embedding_key: str, device: str | None):
    from hespotex.tl._predict import _check_embedding
    from hespotex.tl.model._resolve import as_model

    model = as_model(model)  # a model, a saved folder or "hf-hub:owner/name"
    if hasattr(model, "members"):
        msg = "`explain` takes one HESpotEx; for an ensemble, explain a member (`model.members[i]`)."
        raise NotImplementedError(msg)
    if not isinstance(model, HESpotEx):
        model = HESpotEx.load(model)
    model._check_trained()
    table = get_table(data)
    names, weights = _resolve_score(model, genes, signature)
    record = table.uns.get(EMBED_RECORD_KEY, {}).get(embedding_key)
    if record is not None:
        _check_embedding(model, record)
    scorer = _Scorer(model, table, embedding_key, names, weights, resolve_device(device))
    return model, table, names, weights, scorer


def patch_saliency(
    data: Any,
    model: HESpotEx | str,
    *,
    spots: Any,
    genes: str | Sequence[str] | None = None,
    signature: Sequence[str] | Mapping[str, float] | None = None,
    n_steps: int = 32,
    baseline: str = "white",
    internal_batch_size: int | None = 16,
    embedding_key: str = EMBEDDING_KEY,
    device: str | None = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel saliency of a gene score at some spots: the patch each spot was embedded from and where it matters.

    Integrated gradients (captum) of the score (weighted mean predicted log expression of
    ``genes`` / ``signature``) with respect to the patch's pixels, through the frozen encoder, the
    model's embedding standardisation and the network, the neighbours' embeddings held at their
    stored values. See :func:`explain` for the full explanation; this is its pixel part.

    Parameters
    ----------
    data
        A SpatialData sample with its H&E image and embeddings (``obsm[embedding_key]``, e.g. after
        :func:`hespotex.tl.predict`).
    model
        A trained :class:`HESpotEx` or the folder of a saved one.
    spots
        ``obs_names`` (or integer positions) of the spots.
    genes, signature
        The score: one gene or a list (mean), or a list / dict gene -> weight (weighted mean, weights
        normalised to ``sum |w| = 1``). Pass exactly one.
    n_steps
        Integration steps.
    baseline
        ``"white"`` (glass, default), ``"black"`` or ``"blur"`` (the patch blurred with a Gaussian of
        1/16 of its side).
    internal_batch_size
        Integration steps per forward pass (bounds memory; ``None``: all at once).
    embedding_key
        ``obsm`` key of the slide's image embeddings.
    device
        Torch device.

    Returns
    -------
    ``(patches, saliency)``: uint8 ``(n_spots, h, w, 3)`` patches at the encoder input size, in the
    order of ``spots``, and float32 ``(n_spots, h, w)`` saliency (absolute attribution summed over
    channels) scaled to [0, 1] per patch. Writes nothing.
    """
    model, table, _, _, scorer = _prepare(data, model, genes, signature, embedding_key, device)
    _check_baseline(baseline)
    _check_steps(n_steps, internal_batch_size)
    positions = _positions(table, spots)
    if not _has_image(data):
        msg = (
            "Pixel saliency needs the H&E image: pass the SpatialData sample with its image element, not the table "
            f"alone (found {type(data).__name__}{' without its image' if hasattr(data, 'images') else ''})."
        )
        raise ValueError(msg)
    enc = _load_model_encoder(model)
    plan = _patch_plan(data, table, model, enc, embedding_key)
    with _frozen(model.module_, enc.model, device=scorer.device):
        res = _pixel_attributions(
            scorer,
            enc,
            plan,
            positions,
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
            baseline=baseline,
            embedding_key=embedding_key,
        )
    return res["patches"], _normalise_per_patch(res["saliency"])


def explain(
    data: Any,
    model: HESpotEx | str,
    *,
    genes: str | Sequence[str] | None = None,
    signature: Sequence[str] | Mapping[str, float] | None = None,
    spots: Any = None,
    n_top: int = 3,
    pixels: bool | None = None,
    neighbours: bool = True,
    n_steps: int = 32,
    internal_batch_size: int | None = 16,
    baseline: str = "white",
    embedding_key: str = EMBEDDING_KEY,
    device: str | None = "cpu",
) -> Explanation:
    """Attribute a predicted gene or gene programme at some spots to the image patch and to neighbouring spots.

    The score is the weighted mean predicted log expression of ``genes`` / ``signature`` at a spot.
    Both attributions are integrated gradients (:class:`captum.attr.IntegratedGradients`):

    - *pixels*: through the frozen image encoder, the model's embedding standardisation and the
      network, on the exact patch the slide's embedding was computed from (same crop geometry,
      resizing and normalisation as :func:`hespotex.pp.embed`), from a ``baseline`` patch; the
      neighbours' embeddings stay at their stored values. Encoder and model weights are frozen.
    - *neighbours*: with respect to the standardised embeddings of every spot within the decoder's
      ``n_hops`` of the target (the target included), from the all-zero baseline (every spot at the
      training mean embedding), summed per source spot; compared with the decoder's attention.

    Parameters
    ----------
    data
        A SpatialData sample with its image and embeddings (pixels and neighbours) or its table
        (AnnData with ``obsm[embedding_key]`` and ``obsm["spatial"]``: neighbours only).
    model
        A trained :class:`HESpotEx` or the folder of a saved one.
    genes, signature
        The score: one gene or a list (mean), or a list / dict gene -> weight (weighted mean, weights
        normalised to ``sum |w| = 1``; negative weights allowed). Pass exactly one.
    spots
        ``obs_names`` (or integer positions) of the spots to explain; default: the ``n_top`` spots with
        the highest score.
    n_top
        Number of spots explained when ``spots`` is not given.
    pixels
        Attribute to pixels; default: when ``data`` has its image. ``True`` without an image is an error.
    neighbours
        Attribute to neighbouring spots.
    n_steps
        Integration steps of integrated gradients.
    internal_batch_size
        Integration steps per forward pass (bounds memory; ``None``: all at once).
    baseline
        Pixel baseline: ``"white"`` (glass, default), ``"black"`` or ``"blur"``.
    embedding_key
        ``obsm`` key of the slide's image embeddings.
    device
        Torch device.

    Returns
    -------
    An :class:`Explanation` (patches, saliency, completeness checks, the tidy neighbour table and
    its agreement with attention, parameters). Writes nothing to ``data``; the model is left as it was.
    """
    _check_baseline(baseline)
    _check_steps(n_steps, internal_batch_size)
    if not isinstance(n_top, (int, np.integer)) or n_top < 1:
        msg = f"Expected `n_top` to be a positive integer, found {n_top!r}."
        raise ValueError(msg)
    has_image = _has_image(data)
    if pixels is None:
        pixels = has_image
        if not has_image:
            logger.info(
                "No H&E image in %s: explaining the neighbours only (pass the SpatialData for pixel saliency).",
                type(data).__name__,
            )
    elif pixels and not has_image:
        msg = (
            "Pixel attribution needs the H&E image: pass the SpatialData sample with its image element, not "
            f"{type(data).__name__}{' without its image' if hasattr(data, 'images') else ''}; or set `pixels=False`."
        )
        raise ValueError(msg)
    if not pixels and not neighbours:
        msg = "Nothing to explain: `pixels` and `neighbours` are both off."
        raise ValueError(msg)
    model, table, names, weights, scorer = _prepare(data, model, genes, signature, embedding_key, device)
    positions = None if spots is None else _positions(table, spots)
    with _frozen(model.module_, device=scorer.device):
        all_scores = scorer.predict_all()
        if positions is None:
            positions = np.argsort(-all_scores, kind="stable")[: min(int(n_top), table.n_obs)]
        result = Explanation(
            spots=[str(s) for s in table.obs_names[positions]],
            genes=names,
            weights=weights,
            score=all_scores[positions],
        )
        if pixels:
            enc = _load_model_encoder(model)
            plan = _patch_plan(data, table, model, enc, embedding_key)
            with _frozen(enc.model, device=scorer.device):
                res = _pixel_attributions(
                    scorer,
                    enc,
                    plan,
                    positions,
                    n_steps=n_steps,
                    internal_batch_size=internal_batch_size,
                    baseline=baseline,
                    embedding_key=embedding_key,
                )
            for k, v in res.items():
                setattr(result, k, v)
        if neighbours:
            result.neighbours, result.agreement = _neighbour_attributions(
                scorer, table, positions, n_steps=n_steps, internal_batch_size=internal_batch_size
            )
    emb = model.embedding
    result.params = {
        "model_id": model.model_id,
        "genes": names,
        "weights": weights.tolist(),
        "spots": result.spots,
        "pixels": bool(pixels),
        "neighbours": bool(neighbours),
        "n_steps": int(n_steps),
        "baseline": baseline,
        "neighbour_baseline": "training mean embedding (standardised zero)",
        "encoder": emb.get("encoder"),
        "encoder_id": emb.get("encoder_id"),
        "patch_um": emb.get("patch_um"),
        "input_size": emb.get("input_size"),
        "embedding_key": embedding_key,
        "n_hops": scorer.hops,
        "decoder_neighbors": int(model.config.decoder_neighbors),
    }
    return result
