"""Shared building blocks: edge-list checks, sparse attention propagation and MLP heads.

Graphs are always sparse ``edge_index`` tensors of shape ``(2, E)`` in torch-geometric's
``source_to_target`` convention: ``edge_index[0]`` is the source (the neighbour whose message is
sent), ``edge_index[1]`` the target (the spot that aggregates). Attention weights are per edge and
normalised over the incoming edges of each target, so rows of the sparse matrix
``A[target, source] = alpha`` sum to one. Nothing here ever materialises an N × N dense matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_edge_index(edge_index: Tensor, num_nodes: int, *, name: str = "edge_index") -> None:
    """Raise a clear error unless ``edge_index`` is a ``(2, E)`` integer tensor indexing ``num_nodes`` nodes."""
    if not isinstance(edge_index, Tensor):
        msg = f"Expected `{name}` to be a torch.Tensor of shape (2, E), found {type(edge_index).__name__}."
        raise TypeError(msg)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        msg = (
            f"Expected `{name}` of shape (2, E) (row 0 = source, row 1 = target), found shape "
            f"{tuple(edge_index.shape)}. Transpose an (E, 2) edge list with `.t()`."
        )
        raise ValueError(msg)
    if edge_index.dtype not in (torch.int64, torch.int32):
        msg = f"Expected an integer `{name}` (torch.long), found {edge_index.dtype}. Convert it with `.long()`."
        raise TypeError(msg)
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        msg = (
            f"`{name}` indexes nodes {int(edge_index.min())}..{int(edge_index.max())} but the features have "
            f"{num_nodes} rows. Build the graph on the same spots, in the same order, as the features."
        )
        raise ValueError(msg)


def with_self_loops(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Return ``edge_index`` with exactly one self loop per node (existing ones are removed first).

    The self loops are appended after the original edges, so the order of the other edges is kept.
    """
    from torch_geometric.utils import add_self_loops, remove_self_loops

    edge_index = edge_index.long()
    edge_index, _ = remove_self_loops(edge_index)
    edge_index, _ = add_self_loops(edge_index, num_nodes=num_nodes)
    return edge_index


def without_self_loops(edge_index: Tensor) -> Tensor:
    """Return ``edge_index`` without self loops."""
    from torch_geometric.utils import remove_self_loops

    return remove_self_loops(edge_index.long())[0]


def propagate(h: Tensor, edge_index: Tensor, alpha: Tensor) -> Tensor:
    """Weighted neighbour sum ``out[i] = Σ_{(j→i)} alpha_ji · h[j]`` as one sparse × dense product.

    Uses a sparse COO matrix ``A[target, source] = alpha`` (O(E) memory, no ``E × C`` gather of
    features, no N × N dense matrix). Differentiable in both ``h`` and ``alpha``.
    """
    n = h.size(0)
    adjacency = torch.sparse_coo_tensor(edge_index.flip(0), alpha, (n, n), is_coalesced=False)
    return torch.sparse.mm(adjacency, h)


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    dropout: float = 0.0,
) -> nn.Sequential:
    """``Linear → ReLU → LayerNorm → Dropout → Linear``: the head shape used by the authors.

    The authors' ``latent_head`` and ``gene_head`` are ``Linear → ReLU → LayerNorm → Linear``;
    ``dropout > 0`` adds dropout before the output layer (identity at ``dropout=0``).
    """
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.LayerNorm(hidden_dim)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)
