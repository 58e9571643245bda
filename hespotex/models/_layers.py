"""Shared building blocks: edge-list checks, sparse attention propagation and MLP heads.

Graphs are always sparse ``edge_index`` tensors of shape ``(2, E)`` in torch-geometric's
``source_to_target`` convention: ``edge_index[0]`` is the source (the neighbour whose message is
sent), ``edge_index[1]`` the target (the spot that aggregates). Attention weights are per edge and
normalised over the incoming edges of each target, so rows of the sparse matrix
``A[target, source] = alpha`` sum to one. Nothing here ever materialises an N × N dense matrix.
"""

from __future__ import annotations

import warnings

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
    from hespotex.models._pyg import quiet_torch_geometric

    quiet_torch_geometric()
    from torch_geometric.utils import add_self_loops, remove_self_loops

    edge_index = edge_index.long()
    edge_index, _ = remove_self_loops(edge_index)
    edge_index, _ = add_self_loops(edge_index, num_nodes=num_nodes)
    return edge_index


def without_self_loops(edge_index: Tensor) -> Tensor:
    """Return ``edge_index`` without self loops."""
    from hespotex.models._pyg import quiet_torch_geometric

    quiet_torch_geometric()
    from torch_geometric.utils import remove_self_loops

    return remove_self_loops(edge_index.long())[0]


class _Propagate(torch.autograd.Function):
    """``out = A · h`` with ``A[dst, src] = alpha`` sparse; gradients for ``h`` and ``alpha``.

    torch's own backward for the values of a sparse COO matrix is very slow on CPU. Here
    ``∂L/∂alpha_e = ⟨∂L/∂out[dst_e], h[src_e]⟩`` is a sampled dense × dense product
    (``torch.sparse.sampled_addmm``, SDDMM) on the edge pattern: O(E · C) work, O(E) memory.
    """

    @staticmethod
    def forward(ctx, h: Tensor, edge_index: Tensor, alpha: Tensor) -> Tensor:
        n = h.size(0)
        adjacency = torch.sparse_coo_tensor(edge_index.flip(0), alpha, (n, n), check_invariants=False)
        ctx.save_for_backward(h, edge_index, alpha)
        return torch.sparse.mm(adjacency, h)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        h, edge_index, alpha = ctx.saved_tensors
        n = h.size(0)
        grad_h = grad_alpha = None
        if ctx.needs_input_grad[0]:
            adjacency_t = torch.sparse_coo_tensor(edge_index, alpha, (n, n), check_invariants=False)
            grad_h = torch.sparse.mm(adjacency_t, grad_out)
        if ctx.needs_input_grad[2]:
            grad_alpha = _edge_dot(grad_out, h, edge_index)
        return grad_h, None, grad_alpha


def _edge_dot(a: Tensor, b: Tensor, edge_index: Tensor) -> Tensor:
    """``⟨a[dst_e], b[src_e]⟩`` for every edge ``e``, without an ``E × C`` intermediate where possible."""
    src, dst = edge_index
    n, n_edges = a.size(0), src.numel()
    if n_edges == 0:
        return a.new_zeros(0)
    if a.dtype in (torch.float32, torch.float64):
        order = torch.argsort(dst * n + src)
        counts = torch.bincount(dst[order], minlength=n)
        crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state" (torch, once per process)
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
            pattern = torch.sparse_csr_tensor(crow, src[order], a.new_zeros(n_edges), (n, n), check_invariants=False)
        values = torch.sparse.sampled_addmm(pattern, a.contiguous(), b.t(), beta=0.0).values()
        out = torch.empty_like(values)
        out[order] = values
        return out
    chunk = max(1, (1 << 24) // max(1, a.size(1)))  # other dtypes: bounded-memory gather in edge chunks
    return torch.cat([(a[dst[i : i + chunk]] * b[src[i : i + chunk]]).sum(dim=-1) for i in range(0, n_edges, chunk)])


def propagate(h: Tensor, edge_index: Tensor, alpha: Tensor) -> Tensor:
    """Weighted neighbour sum ``out[i] = Σ_{(j→i)} alpha_ji · h[j]`` as one sparse × dense product.

    Uses a sparse COO matrix ``A[target, source] = alpha`` (O(E) memory, no N × N dense matrix, no
    ``E × C`` gather in the forward pass). Differentiable in both ``h`` and ``alpha``.
    """
    return _Propagate.apply(h, edge_index, alpha)


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
