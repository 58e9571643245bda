"""Integrated-gradient attributions of a spot's score (see :mod:`hespotex.tl.explanation._explain`): to the pixels
of its patch (and of its context patch, for two-scale embeddings) through the frozen encoder, and to the embeddings
of the neighbouring spots through the decoder."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hespotex._sample import SAMPLE_KEY
from hespotex._settings import settings
from hespotex.tl.model._data import graph_data, induced_edges, k_hop_halo
from hespotex.tl.model._model import HESpotEx

if TYPE_CHECKING:
    import torch
    from anndata import AnnData

    from hespotex.pp._encoders import Encoder
    from hespotex.pp._patches import PatchPlan

logger = logging.getLogger("hespotex")


@contextlib.contextmanager
def frozen_modules(*modules: torch.nn.Module, device: Any = None) -> Iterator[None]:
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


@dataclass
class Neighbourhood:
    """What a target spot's score reads: ``nodes`` (slide positions, the target first, then the spots its smoothing
    reads, then the rest), their induced decoder ``edges`` (positions in ``nodes``), ``hop`` (decoder-graph distance
    to the target; -1 when only the smoothing reaches it) and ``mix`` (the smoothing weights of ``nodes[:len(mix)]``,
    summing to 1; ``[1.0]`` unsmoothed)."""

    nodes: np.ndarray
    edges: np.ndarray
    hop: np.ndarray
    mix: np.ndarray


class Scorer:
    """The score at a target spot as a differentiable function of its neighbourhood's standardised embeddings.

    The score is what :func:`hespotex.tl.predict` gives with ``smooth``: the network's score at the target, or with a
    weight ``w`` the smoothing of the network's scores, ``w`` at the target and ``1 - w`` shared by its 6 nearest spots
    (:mod:`hespotex.tl.prediction._smoothing`): linear in the network's outputs over the target's neighbourhood, so
    the integrated gradients stay complete for it."""

    def __init__(
        self,
        model: HESpotEx,
        table: AnnData,
        embedding_key: str,
        genes: list[str],
        weights: np.ndarray,
        device,
        smooth: float | None = None,
    ) -> None:
        import torch

        from hespotex.tl.prediction._smoothing import smoothing_matrix

        self.model = model
        self.net = model.module_
        self.device = device
        sample = graph_data(
            table, str(table.uns.get(SAMPLE_KEY, {}).get("sample_id", "slide")), genes=None, embedding_key=embedding_key
        )
        if sample.emb.shape[1] != len(model.embedding_mean_):
            msg = (
                f"Expected embeddings of width {len(model.embedding_mean_)} (encoder "
                f"{model.embedding.get('encoder')!r}) in "
                f"obsm[{embedding_key!r}], found {sample.emb.shape[1]}. Predict the slide with this model first."
            )
            raise ValueError(msg)
        self.sample = sample
        # the statistics predict_graph standardises this slide with: the slide's own with embedding_norm="slide"
        mean, scale = model.embedding_mean_, model.embedding_scale_
        if isinstance(model, HESpotEx) and model.embedding_norm == "slide":
            from hespotex.pp._stain import slide_statistics

            mean, scale = slide_statistics(sample.emb)
        self.std = np.subtract(sample.emb, mean, dtype=np.float32)  # the same float32 operations as predict_graph
        self.std /= scale
        self.use_graph = self.net.decoder is not None
        cfg = self.net.config
        self.edges = sample.graph(cfg.decoder_neighbors) if self.use_graph else np.zeros((2, 0), dtype=np.int64)
        self.hops = cfg.n_hops if self.use_graph else 0
        self.gene_idx = torch.as_tensor(pd.Index(model.genes).get_indexer(genes), device=device)
        self.weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
        self.mean = torch.as_tensor(mean, device=device)
        self.scale = torch.as_tensor(scale, device=device)
        self.smooth = smooth
        self.smoothing = None if smooth is None else smoothing_matrix(sample, smooth)  # hx.tl.predict's operator

    def predict_all(self) -> np.ndarray:
        """The score at every spot from a whole-slide prediction (``(n_spots,)``), smoothed as ``hx.tl.predict``
        smooths it."""
        out = self.model.predict_graph(self.sample, device=str(self.device), smooth=self.smooth)
        idx = self.gene_idx.cpu().numpy()
        return out["expression"][:, idx].astype(np.float64) @ self.weights.cpu().numpy().astype(np.float64)

    def neighbourhood(self, t: int) -> Neighbourhood:
        """The spots ``t``'s score reads (``t`` first, then the spots its smoothing mixes in), every spot that
        reaches one of them in ``n_hops`` of the decoder graph, their induced edges and hop distances to ``t``."""
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import shortest_path

        core, mix = np.array([t], dtype=np.int64), np.ones(1)
        if self.smoothing is not None:
            row = self.smoothing[t]
            others = row.indices != t
            core = np.concatenate([core, row.indices[others].astype(np.int64)])
            mix = np.concatenate([[row[0, t]], row.data[others]])
        nodes = k_hop_halo(self.edges, core, self.sample.n, self.hops) if self.use_graph else core
        sub = induced_edges(self.edges, nodes, self.sample.n)
        adj = csr_matrix((np.ones(sub.shape[1]), (sub[0], sub[1])), shape=(len(nodes), len(nodes)))
        hop = shortest_path(adj, directed=False, unweighted=True, indices=0)
        return Neighbourhood(nodes, sub, np.where(np.isfinite(hop), hop, -1).astype(np.int64), mix)

    def scores(self, emb: torch.Tensor, where: Neighbourhood) -> torch.Tensor:
        """Scores ``(B,)`` at the target (node 0) of ``B`` copies of ``where`` with embeddings ``emb`` ``(B, m, F)``:
        the network's scores at the nodes the smoothing reads, mixed by its weights."""
        import torch

        b, m, f = emb.shape
        edges = None
        if self.use_graph:
            sub = torch.as_tensor(where.edges, device=emb.device)
            offsets = (torch.arange(b, device=emb.device) * m).repeat_interleave(sub.shape[1])
            edges = sub.repeat(1, b) + offsets
        out = self.net(emb.reshape(b * m, f), edges)["expression"].reshape(b, m, -1)
        k = len(where.mix)
        per_node = out[:, :k, self.gene_idx] @ self.weights  # (B, k)
        if k == 1:
            return per_node[:, 0]
        return per_node @ torch.as_tensor(where.mix, dtype=per_node.dtype, device=emb.device)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.scale


def normalise_per_patch(saliency: np.ndarray) -> np.ndarray:
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


def patch_features(
    enc: Encoder, *images: torch.Tensor, tta: bool = False, stain_norm: tuple[dict, dict] | None = None
) -> torch.Tensor:
    """The embedding :func:`hespotex.pp.embed` stores for resized ``[0, 1]`` patches ``images`` (the spot patch and,
    two-scale, the context patch; each ``(B, 3, S, S)``): each patch stain-normalised (``stain_norm`` = (slide stain,
    reference), :func:`hespotex.pp._stain_norm.normalize_patches`), normalised for the encoder and encoded (with
    ``tta``: the mean over its 8 dihedral views, :func:`hespotex.pp._encode.dihedral_mean`), the features
    concatenated ``[spot, context]``. The same torch operations as the embed path, differentiable in ``images``."""
    import torch

    from hespotex.pp._encode import dihedral_mean
    from hespotex.pp._stain_norm import normalize_patches

    feats = []
    for x in images:
        if stain_norm is not None:
            x = normalize_patches(x, *stain_norm)
        x = enc.normalize(x)
        feats.append(dihedral_mean(enc.model, x) if tta else enc.model(x))
    return torch.cat(feats, dim=1)


def pixel_attributions(
    scorer: Scorer,
    enc: Encoder,
    plan: PatchPlan,
    positions: np.ndarray,
    *,
    n_steps: int,
    internal_batch_size: int | None,
    baseline: str,
    embedding_key: str,
    context: PatchPlan | None = None,
    tta: bool = False,
    stain_norm: tuple[dict, dict] | None = None,
) -> dict[str, np.ndarray]:
    """Integrated gradients of the score at each target of ``positions`` with respect to the pixels of its patch.

    The target's features are recomputed from its patch(es) as :func:`hespotex.pp.embed` computed them
    (:func:`patch_features`: with ``stain_norm`` = (slide stain, reference) mapped to the reference stain, with ``tta``
    the mean over the 8 dihedral views), all inside the differentiated forward pass, so the attributions are w.r.t.
    the patch as scanned, in its own pixel frame.

    With ``context`` (the context plan of two-scale embeddings, :func:`hespotex.pp._context.context_plan`) the
    target's embedding is ``[encoder(spot patch), encoder(context patch)]`` as :func:`hespotex.pp.embed` concatenates
    it, and both patches are attributed in one integration (each from its own baseline patch): the signed
    attributions of the two patches together sum to ``score(input) - score(baseline)`` up to the convergence delta.
    Returns the :class:`~hespotex.tl.explanation._explain.Explanation` fields ``patches``, ``saliency``,
    ``pixel_attribution_sum`` (both patches), ``pixel_score``, ``pixel_baseline_score``, ``pixel_delta`` and, with
    ``context``, ``context_patches``, ``context_saliency`` and ``context_attribution_sum``.
    """
    import torch
    from captum.attr import IntegratedGradients
    from tqdm.auto import tqdm

    from hespotex.pp._patches import resize_batch

    dev = scorer.device
    n = len(positions)
    size = enc.input_size
    plans = [plan] if context is None else [plan, context]
    patches = [np.empty((n, size, size, 3), dtype=np.uint8) for _ in plans]
    saliency = [np.empty((n, size, size), dtype=np.float32) for _ in plans]
    sums = [np.empty(n) for _ in plans]
    out = {"pixel_score": np.empty(n), "pixel_baseline_score": np.empty(n), "pixel_delta": np.empty(n)}
    worst = 0.0
    for i, t in enumerate(tqdm(positions, desc="pixel attributions", unit="spot", disable=not settings.progress)):
        t = int(t)
        # (1, 3, S, S) in [0, 1] per patch, read and resized as hx.pp.embed does (the same plans, resize_batch)
        xs = tuple(resize_batch(p.read(np.array([t])), size).to(dev) for p in plans)
        for k, x in enumerate(xs):
            patches[k][i] = x[0].mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        where = scorer.neighbourhood(t)
        rest = torch.from_numpy(scorer.std[where.nodes[1:]]).to(dev)

        def features(*images: torch.Tensor) -> torch.Tensor:
            return patch_features(enc, *images, tta=tta, stain_norm=stain_norm)

        def forward(*images: torch.Tensor, rest=rest, where=where) -> torch.Tensor:
            z = scorer.standardise(features(*images))
            emb = torch.cat([z[:, None, :], rest.expand(len(z), *rest.shape)], dim=1)
            return scorer.scores(emb, where)

        bases = tuple(_baseline_patch(x, baseline) for x in xs)
        with torch.no_grad():
            feats = features(*xs)[0].cpu().numpy()
            stored = scorer.sample.emb[t]
            worst = max(worst, float(np.abs(feats - stored).max() / max(np.abs(stored).max(), 1e-6)))
            f_x, f_b = forward(*xs).item(), forward(*bases).item()
        ig = IntegratedGradients(forward)
        attrs, delta = ig.attribute(
            xs,
            baselines=bases,
            n_steps=int(n_steps),
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        for k, attr in enumerate(attrs):
            attr = attr[0].detach().float().cpu().numpy()
            saliency[k][i] = np.abs(attr).sum(axis=0)
            sums[k][i] = float(attr.astype(np.float64).sum())
        out["pixel_score"][i], out["pixel_baseline_score"][i] = f_x, f_b
        out["pixel_delta"][i] = float(delta.reshape(-1)[0])
    out.update(patches=patches[0], saliency=saliency[0], pixel_attribution_sum=np.sum(sums, axis=0))
    if context is not None:
        out.update(context_patches=patches[1], context_saliency=saliency[1], context_attribution_sum=sums[1])
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


def neighbour_attributions(
    scorer: Scorer, table: AnnData, positions: np.ndarray, *, n_steps: int, internal_batch_size: int | None
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
        where = scorer.neighbourhood(t)
        nodes, hop = where.nodes, where.hop
        emb = torch.from_numpy(scorer.std[nodes]).to(dev)[None]  # (1, m, F)
        sub_t = torch.from_numpy(where.edges).to(dev)
        ig = IntegratedGradients(lambda e, where=where: scorer.scores(e, where))
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
