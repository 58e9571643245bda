"""Expression stream: a STAGATE-style graph attention autoencoder on sparse edge lists.

Architecture (Dong & Zhang 2022, STAGATE; used by HESpotEx in ``model/exp_module.py``)::

    h1 = ELU( A · (x W1) )          encoder layer 1: linear map, then attention aggregation
    z  = h1 W2                      encoder layer 2: linear (the latent, no attention)
    h3 = ELU( A · (z W2ᵀ) )         decoder layer 1: tied weight W2ᵀ, the *same* attention A
    x̂  = h3 W1ᵀ                     decoder layer 2: tied weight W1ᵀ

``A`` is the sparse attention matrix of encoder layer 1 with
``A[i, j] = softmax_{j ∈ N(i)} σ(a_srcᵀ W1ᵀx_j + a_dstᵀ W1ᵀx_i)`` over the incoming edges of target
``i`` (self loop included); σ is a sigmoid as in STAGATE (``ae_attention="leaky_relu"`` gives the
original GAT scoring). The decoder re-uses ``A`` and the transposed encoder weights, so the only
parameters are ``weight1``, ``weight2``, ``att_src`` and ``att_dst``.

Paper mapping: ``STAGATE(hidden_dims=[n_genes, 512, 64])`` on a k=8 kNN graph plus self loops,
trained with ``F.mse_loss(x, x̂)`` (Adam, lr 1e-3, weight decay 1e-4, 500 epochs, gradient
clipping 5); Xavier-normal initialisation with gain 1.414. Unlike the authors' implementation,
which copies transposed weights into separate parameters on every forward, the tied weights here
are one parameter each, and propagation is a sparse × dense product (O(E) memory).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layers import check_edge_index, propagate, with_self_loops


class GraphAttentionAutoencoder(nn.Module):
    """Graph attention autoencoder with tied weights and tied attention.

    Parameters
    ----------
    n_genes
        Number of input (and reconstructed) genes.
    hidden_dim
        Width of the hidden layer (paper: 512).
    latent_dim
        Width of the latent ``z`` (paper: 64).
    attention
        Attention score non-linearity: ``"sigmoid"`` (STAGATE) or ``"leaky_relu"`` (GAT).
    add_self_loops
        Give every spot exactly one self loop before attention (the paper does).
    negative_slope
        Slope of the leaky ReLU for ``attention="leaky_relu"``.
    """

    def __init__(
        self,
        n_genes: int,
        hidden_dim: int = 512,
        latent_dim: int = 64,
        *,
        attention: str = "sigmoid",
        add_self_loops: bool = True,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if attention not in ("sigmoid", "leaky_relu"):
            msg = f"Expected `attention` to be 'sigmoid' or 'leaky_relu', found {attention!r}."
            raise ValueError(msg)
        self.n_genes = n_genes
        self.hidden_dim = hidden_dim
        self.latent_dim = latent_dim
        self.attention_kind = attention
        self.add_self_loops = add_self_loops
        self.negative_slope = negative_slope
        self.weight1 = nn.Parameter(torch.empty(n_genes, hidden_dim))
        self.weight2 = nn.Parameter(torch.empty(hidden_dim, latent_dim))
        self.att_src = nn.Parameter(torch.empty(hidden_dim))
        self.att_dst = nn.Parameter(torch.empty(hidden_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal initialisation with gain √2, as STAGATE."""
        gain = math.sqrt(2.0)
        nn.init.xavier_normal_(self.weight1, gain=gain)
        nn.init.xavier_normal_(self.weight2, gain=gain)
        # attention vectors: STAGATE initialises (1, 1, C) tensors, i.e. std = gain * sqrt(2 / (1 + C))
        std = gain * math.sqrt(2.0 / (1 + self.hidden_dim))
        nn.init.normal_(self.att_src, std=std)
        nn.init.normal_(self.att_dst, std=std)

    def _attention(self, h: Tensor, edge_index: Tensor) -> Tensor:
        from hespotex.models._pyg import quiet_torch_geometric

        quiet_torch_geometric()
        from torch_geometric.utils import softmax

        src, dst = edge_index
        score = (h @ self.att_src)[src] + (h @ self.att_dst)[dst]
        sigmoid = self.attention_kind == "sigmoid"
        score = torch.sigmoid(score) if sigmoid else F.leaky_relu(score, self.negative_slope)
        return softmax(score, dst, num_nodes=h.size(0))

    def encode(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Latent ``z`` of every spot and the attention of encoder layer 1.

        Parameters
        ----------
        x
            Normalised expression ``(spots, n_genes)``.
        edge_index
            Spatial graph ``(2, E)``, row 0 = source (neighbour), row 1 = target.

        Returns
        -------
        ``z`` ``(spots, latent_dim)`` and ``(edge_index, alpha)``: the edges used (with self loops
        when ``add_self_loops``) and per-edge weights summing to 1 over each target's incoming edges.
        """
        if x.dim() != 2 or x.size(1) != self.n_genes:
            msg = f"Expected expression of shape (spots, {self.n_genes}), found {tuple(x.shape)}."
            raise ValueError(msg)
        check_edge_index(edge_index, x.size(0), name="edge_index_ae")
        edge_index = edge_index.long()
        if self.add_self_loops:
            edge_index = with_self_loops(edge_index, x.size(0))
        h = x @ self.weight1
        alpha = self._attention(h, edge_index)
        h1 = F.elu(propagate(h, edge_index, alpha))
        z = h1 @ self.weight2
        return z, (edge_index, alpha)

    def decode(self, z: Tensor, attention: tuple[Tensor, Tensor]) -> Tensor:
        """Reconstruct expression from ``z`` with the tied weights and the encoder's attention."""
        edge_index, alpha = attention
        h3 = F.elu(propagate(z @ self.weight2.t(), edge_index, alpha))
        return h3 @ self.weight1.t()

    def forward(self, x: Tensor, edge_index: Tensor) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
        """Encode and decode.

        Returns
        -------
        A dict with ``"latent"`` (``z``), ``"reconstruction"`` (``x̂``, same shape as ``x``) and
        ``"attention"`` (``(edge_index, alpha)``, see :meth:`encode`).
        """
        z, attention = self.encode(x, edge_index)
        return {"latent": z, "reconstruction": self.decode(z, attention), "attention": attention}

    def loss(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction MSE (the paper's autoencoder objective) and the forward outputs."""
        out = self(x, edge_index)
        return F.mse_loss(out["reconstruction"], x), out
