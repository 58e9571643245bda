"""Graph decoder: propagate the image latent ``ẑ`` over the spatial graph and predict genes.

::

    h_0 = ẑ
    h_l = [h_{l-1} or ẑ] (+) Dropout(L2?(act(conv_l(h_{l-1} or ẑ, edges))))     l = 1..n_hops
    y_graph = GeneHead( JumpingKnowledge(h_1, ..., h_n) )

Layer ``l`` reads ``h_{l-1}`` (``stacked=True``: ``n_hops`` real hops) or ``ẑ`` itself
(``stacked=False``: parallel one-hop layers, as in the authors' code); ``(+)`` is the optional
residual. :class:`torch_geometric.nn.JumpingKnowledge` combines the layer outputs (``"cat"``,
``"max"`` or ``"lstm"``) into latent-sized features (``n_hops × latent`` for ``"cat"``), and only then
a gene head ``Linear → ReLU → LayerNorm → Linear`` maps them to genes. The model adds a direct head
on ``ẑ`` (see :class:`~hespotex.models.HESpotExNet`).

Layers (``conv``): ``"gcn"`` (:class:`~torch_geometric.nn.GCNConv`, symmetric normalisation with self
loops), ``"sage"`` (:class:`~torch_geometric.nn.SAGEConv`, ``W_r x_i + W_l mean_{j∈N(i)} x_j``, no bias:
the authors' ``ImageDecoder``), ``"gat"`` / ``"gatv2"`` (:class:`~torch_geometric.nn.GATConv` /
:class:`~torch_geometric.nn.GATv2Conv`, heads concatenated to ``latent_dim``, one self loop per spot).
GCN and SAGE use ReLU (as the authors), GAT/GATv2 use ELU.

Attention (GAT/GATv2 only): ``(edge_index, alpha)`` where ``edge_index`` is the decoder graph with
one self loop per spot appended after the original edges, and ``alpha`` (one value per edge) is the
attention **averaged over heads and over hops**. Every hop's and head's attention sums to 1 over each
target's incoming edges, so the average does too: row ``i`` of the sparse matrix
``A[target, source] = alpha`` says how much each neighbour (and the spot itself) shaped spot ``i``.

Paper mapping: ``ImageDecoder`` ×4 on a k=4 kNN adjacency, each applied to ``ẑ``, ReLU then L2
normalisation, and ``nn.LSTM(64, n_genes, 2)`` over the four outputs as jumping knowledge; here the
JK runs on latent-sized features and the gene head follows it, which keeps the decoder at a few
million parameters instead of ~359 M at 5,457 genes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import check_edge_index, mlp, with_self_loops, without_self_loops

_ATTENTION_CONVS = ("gat", "gatv2")


class GraphDecoder(nn.Module):
    """Graph layers + jumping knowledge + gene head over the decoder's spatial graph.

    Parameters
    ----------
    latent_dim
        Width of ``ẑ`` (and of every layer's output).
    n_genes
        Number of predicted genes.
    conv
        ``"gcn"``, ``"sage"``, ``"gat"`` or ``"gatv2"``.
    n_hops
        Number of graph layers.
    heads
        Attention heads for ``"gat"``/``"gatv2"`` (concatenated; ``latent_dim % heads == 0``).
    stacked
        Layer ``l`` reads layer ``l − 1`` (``True``) or every layer reads ``ẑ`` (``False``).
    residual
        Add each layer's input to its output.
    l2_normalize
        L2-normalise each layer's output per spot.
    dropout
        Dropout on each layer's output.
    jk_mode
        ``"cat"``, ``"max"`` or ``"lstm"`` (torch-geometric's :class:`~torch_geometric.nn.JumpingKnowledge`).
    head_hidden_dim
        Hidden width of the gene head.
    head_dropout
        Dropout inside the gene head.
    """

    def __init__(
        self,
        latent_dim: int,
        n_genes: int,
        *,
        conv: str = "gatv2",
        n_hops: int = 4,
        heads: int = 4,
        stacked: bool = True,
        residual: bool = True,
        l2_normalize: bool = False,
        dropout: float = 0.0,
        jk_mode: str = "cat",
        head_hidden_dim: int = 1024,
        head_dropout: float = 0.0,
    ) -> None:
        from hespotex.models._pyg import quiet_torch_geometric

        quiet_torch_geometric()
        from torch_geometric.nn import GATConv, GATv2Conv, GCNConv, JumpingKnowledge, SAGEConv

        super().__init__()
        if conv not in ("gcn", "sage", *_ATTENTION_CONVS):
            msg = f"Expected `conv` to be 'gcn', 'sage', 'gat' or 'gatv2', found {conv!r}."
            raise ValueError(msg)
        if jk_mode not in ("cat", "max", "lstm"):
            msg = f"Expected `jk_mode` to be 'cat', 'max' or 'lstm', found {jk_mode!r}."
            raise ValueError(msg)
        if conv in _ATTENTION_CONVS and latent_dim % heads:
            msg = f"`latent_dim` ({latent_dim}) must be divisible by `heads` ({heads}) for {conv!r}."
            raise ValueError(msg)
        self.latent_dim = latent_dim
        self.n_genes = n_genes
        self.conv_kind = conv
        self.n_hops = n_hops
        self.stacked = stacked
        self.residual = residual
        self.l2_normalize = l2_normalize
        self.has_attention = conv in _ATTENTION_CONVS

        def make_conv() -> nn.Module:
            if conv == "gcn":
                return GCNConv(latent_dim, latent_dim)
            if conv == "sage":
                return SAGEConv(latent_dim, latent_dim, aggr="mean", bias=False)
            cls = GATConv if conv == "gat" else GATv2Conv
            return cls(latent_dim, latent_dim // heads, heads=heads, concat=True, add_self_loops=False)

        self.convs = nn.ModuleList([make_conv() for _ in range(n_hops)])
        self.activation = nn.ELU() if self.has_attention else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        if jk_mode == "lstm":
            self.jk = JumpingKnowledge("lstm", channels=latent_dim, num_layers=n_hops)
        else:
            self.jk = JumpingKnowledge(jk_mode)
        jk_dim = latent_dim * n_hops if jk_mode == "cat" else latent_dim
        self.gene_head = mlp(jk_dim, head_hidden_dim, n_genes, dropout=head_dropout)

    def prepare_edges(self, edge_index: Tensor, num_nodes: int) -> Tensor:
        """The edge list the layers use: one self loop per spot (GAT, GATv2) or none (GCN adds its own, SAGE)."""
        if self.has_attention:
            return with_self_loops(edge_index, num_nodes)
        return without_self_loops(edge_index)

    def forward(self, z: Tensor, edge_index: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Predict the graph-stream part of the expression.

        Parameters
        ----------
        z
            Image latents ``ẑ`` ``(spots, latent_dim)``.
        edge_index
            Decoder spatial graph ``(2, E)``, row 0 = source (neighbour), row 1 = target.

        Returns
        -------
        ``(spots, n_genes)`` expression contribution and the attention ``(edge_index, alpha)``
        (averaged over heads and hops, see the module docstring), or ``None`` for GCN/SAGE.
        """
        if z.dim() != 2 or z.size(1) != self.latent_dim:
            msg = f"Expected latents of shape (spots, {self.latent_dim}), found {tuple(z.shape)}."
            raise ValueError(msg)
        check_edge_index(edge_index, z.size(0), name="edge_index_dec")
        edges = self.prepare_edges(edge_index, z.size(0))
        hops: list[Tensor] = []
        alphas: list[Tensor] = []
        h = z
        for conv in self.convs:
            inp = h if self.stacked else z
            if self.has_attention:
                out, (_, alpha) = conv(inp, edges, return_attention_weights=True)
                alphas.append(alpha.mean(dim=-1))
            else:
                out = conv(inp, edges)
            out = self.activation(out)
            if self.l2_normalize:
                out = F.normalize(out, p=2.0, dim=-1)
            out = self.dropout(out)
            if self.residual:
                out = out + inp
            hops.append(out)
            h = out
        expression = self.gene_head(self.jk(hops))
        attention = (edges, torch.stack(alphas).mean(dim=0)) if alphas else None
        return expression, attention
