"""The block-wise forward pass of a HESpotEx network over a slide's graph: compact blocks of core spots, each
with a halo of ``n_hops`` neighbour rings so every block's result equals a whole-slide pass, memory bounded by
``max_nodes`` (used by :meth:`~hespotex.tl.HESpotEx.predict_graph`, validation during training and streaming)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hespotex.tl.model._data import GraphData, induced_edges, k_hop_halo, spatial_blocks


def forward_blocks(
    net,
    s: GraphData,
    device,
    *,
    max_nodes: int,
    blocks: Sequence[np.ndarray] | None = None,
    on_block: Callable[[int, np.ndarray, dict[str, Any]], None] | None = None,
    standardise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any] | None:
    """Block-wise forward of ``net`` (see :meth:`HESpotEx.predict_graph`); ``standardise`` maps each block's
    embedding rows (``None``: ``s.emb`` is standardised already)."""
    import scipy.sparse as sp
    import torch

    cfg = net.config
    use_graph = net.decoder is not None
    edges = s.graph(cfg.decoder_neighbors) if use_graph else np.zeros((2, 0), dtype=np.int64)
    collect = on_block is None
    if collect:
        expression = np.empty((s.n, net.n_genes), dtype=np.float32)
        latent = np.empty((s.n, cfg.latent_dim), dtype=np.float32)
    att_rows, att_cols, att_vals = [], [], []
    features: list = []  # the graph decoder's gene-head input, captured for streaming
    hooks = []
    if not collect:
        # Streaming runs the two gene heads later, on rows in table order (from the latent and the
        # captured features): here they see one row each, so no block ever holds spots x genes.
        def one_row(_module, args):
            return (args[0][:1],)

        def capture(_module, args):
            features.append(args[0])
            return (args[0][:1],)

        hooks.append(net.direct_head.register_forward_pre_hook(one_row))
        if use_graph:
            hooks.append(net.decoder.gene_head.register_forward_pre_hook(capture))
    was_training = net.training
    net.eval()
    net.to(device)
    # n_hops rings make each block exact; GCN's symmetric normalisation also needs the degree of
    # the outermost ring's nodes, hence one ring more
    halo = cfg.n_hops + (cfg.decoder_conv == "gcn") if use_graph else 0
    try:
        with torch.inference_mode():
            for i, core in enumerate(spatial_blocks(s.coords_um, max_nodes) if blocks is None else blocks):
                nodes = k_hop_halo(edges, core, s.n, halo) if use_graph else core
                sub = induced_edges(edges, nodes, s.n)
                rows = s.emb[nodes] if standardise is None else standardise(s.emb[nodes])
                x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(device)
                features.clear()
                out = net(x, torch.from_numpy(sub).to(device) if use_graph else None)
                m = len(core)
                attention = None
                if out["attention"] is not None:
                    ei, alpha = out["attention"]
                    ei, alpha = ei.cpu().numpy(), alpha.float().cpu().numpy()
                    keep = ei[1] < m  # edges into core spots
                    attention = (nodes[ei[1][keep]], nodes[ei[0][keep]], alpha[keep])
                if not collect:
                    result = {
                        "latent": out["latent"][:m].float().cpu().numpy(),
                        "features": features[-1][:m].float().cpu().numpy() if features else None,
                        "attention": attention,
                    }
                    on_block(i, core, result)
                    continue
                expression[core] = out["expression"][:m].float().cpu().numpy()
                latent[core] = out["latent"][:m].float().cpu().numpy()
                if attention is not None:
                    att_rows.append(attention[0])
                    att_cols.append(attention[1])
                    att_vals.append(attention[2])
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    if not collect:
        return None
    attention = None
    if att_rows:
        attention = sp.csr_matrix(
            (np.concatenate(att_vals), (np.concatenate(att_rows), np.concatenate(att_cols))), shape=(s.n, s.n)
        )
    return {"expression": expression, "latent": latent, "attention": attention}
