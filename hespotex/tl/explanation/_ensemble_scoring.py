"""An ensemble seen by :func:`hespotex.tl.explain` as one model: its members wrapped in one module that
averages their outputs.

Integrated gradients are linear in the function explained, so attributing the members' mean is the
same as averaging the members' attributions computed with one baseline and one integration path;
wrapping the members in one module does it in a single pass and keeps completeness exact for the
ensemble's prediction: attributions sum to ``mean score(input) - mean score(baseline)`` up to captum's
convergence delta.

Members standardise embeddings with their own training statistics. The wrapper takes embeddings
standardised by the ensemble's statistics (the mean of the members' means and scales; the slide's own
statistics when the models standardise per slide, as they then all do) and maps them affinely into
each member's standardisation, so the neighbour baseline "standardised zero" is the ensemble's mean
training embedding, and every member sees exactly the embeddings it sees when predicting.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex.tl.model._data import GraphData

if TYPE_CHECKING:
    from anndata import AnnData

    from hespotex.tl.model._ensemble import HESpotExEnsemble


def _ensemble_net(members: list[Any], maps: list[tuple[np.ndarray, np.ndarray]], config: Any) -> Any:
    """A torch module averaging ``members`` (HESpotExNet) on embeddings mapped by ``z * a + b`` per member."""
    import torch

    class EnsembleNet(torch.nn.Module):
        """The members' mean expression and decoder attention on embeddings of the ensemble's standardisation."""

        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(members)
            for k, (a, b) in enumerate(maps):
                self.register_buffer(f"scale_{k}", torch.as_tensor(a, dtype=torch.float32))
                self.register_buffer(f"shift_{k}", torch.as_tensor(b, dtype=torch.float32))
            self.config = config
            self.decoder = members[0].decoder

        def forward(self, emb: torch.Tensor, edge_index_dec: torch.Tensor | None = None) -> dict[str, Any]:
            outs = [
                net(emb * getattr(self, f"scale_{k}") + getattr(self, f"shift_{k}"), edge_index_dec)
                for k, net in enumerate(self.members)
            ]
            expression = torch.stack([o["expression"] for o in outs]).mean(dim=0)
            attention = None
            atts = [o["attention"] for o in outs]
            if all(a is not None for a in atts) and all(torch.equal(a[0], atts[0][0]) for a in atts):
                attention = (atts[0][0], torch.stack([a[1] for a in atts]).mean(dim=0))
            return {"expression": expression, "latent": outs[0]["latent"], "attention": attention}

    return EnsembleNet()


class EnsembleScoring:
    """What :class:`~hespotex.tl.explanation._attributions.Scorer` and :func:`~hespotex.tl.explain` read of a
    model, for an ensemble on one slide: ``module_`` (the averaging module), the ensemble's embedding
    statistics, ``genes``, ``embedding``, ``config``, ``model_id`` and ``predict_graph`` (the ensemble's)."""

    def __init__(self, ensemble: HESpotExEnsemble, table: AnnData, embedding_key: str) -> None:
        from hespotex._sample import SAMPLE_KEY
        from hespotex.tl.model._data import graph_data

        members = ensemble.members
        configs = [m.module_.config for m in members]
        if len({c.decoder_neighbors for c in configs}) > 1 or len({m.module_.decoder is None for m in members}) > 1:
            msg = (
                "The ensemble's members use different decoder graphs (decoder_neighbors or no decoder); explain "
                "needs one graph for all members. Explain a member (`model.members[i]`)."
            )
            raise ValueError(msg)
        self.ensemble = ensemble
        self.genes = ensemble.genes
        self.embedding = ensemble.embedding
        self.embedding_norm = ensemble.embedding_norm
        self.model_id = ensemble.model_id
        self.config = ensemble.config
        if ensemble.embedding_norm == "slide":
            from hespotex.pp._stain import slide_statistics

            sample = graph_data(
                table, str(table.uns.get(SAMPLE_KEY, {}).get("sample_id", "slide")), genes=None,
                embedding_key=embedding_key,
            )  # fmt: skip
            mean, scale = slide_statistics(sample.emb)
            stats = [(mean, scale)] * len(members)
        else:
            stats = [(m.embedding_mean_, m.embedding_scale_) for m in members]
            mean = np.mean([s[0] for s in stats], axis=0)
            scale = np.mean([s[1] for s in stats], axis=0)
        self.embedding_mean_ = np.asarray(mean, dtype=np.float32)
        self.embedding_scale_ = np.asarray(scale, dtype=np.float32)
        maps = [(self.embedding_scale_ / s, (self.embedding_mean_ - m) / s) for m, s in stats]
        net_config = replace(configs[0], n_hops=max(c.n_hops for c in configs))  # the widest neighbourhood
        self.module_ = _ensemble_net([m.module_ for m in members], maps, net_config)

    def _check_trained(self) -> None:
        self.ensemble._check_trained()

    def predict_graph(self, sample: GraphData, **kwargs: Any) -> dict[str, Any] | None:
        return self.ensemble.predict_graph(sample, **kwargs)
