"""Image stream: projection of a frozen image-encoder embedding to the shared latent ``ẑ``.

Paper mapping: the authors' ``latent_head`` (``model/models.py``) is
``Linear(512, 1024) → ReLU → LayerNorm(1024) → Linear(1024, 64)`` on QuiltNet-B-32 embeddings;
:class:`ImageProjection` is the same MLP for any embedding width, with optional dropout before the
output layer (``projection_dropout``; 0 in the paper preset). The encoder itself is frozen and run
once by ``hx.pp`` (cached embeddings), not inside the model.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._layers import mlp


class ImageProjection(nn.Module):
    """MLP from an image embedding to the latent ``ẑ``: ``Linear → ReLU → LayerNorm → Dropout → Linear``.

    Parameters
    ----------
    embedding_dim
        Width of the frozen encoder's embedding (e.g. 1,280 for EfficientNet-Lite0, 512 for QuiltNet).
    latent_dim
        Width of ``ẑ``; must equal the autoencoder latent it is aligned to.
    hidden_dim
        Hidden width (paper: 1,024).
    dropout
        Dropout before the output layer.
    """

    def __init__(self, embedding_dim: int, latent_dim: int, hidden_dim: int = 1024, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.latent_dim = latent_dim
        self.net = mlp(embedding_dim, hidden_dim, latent_dim, dropout=dropout)

    def forward(self, emb: Tensor) -> Tensor:
        """Map embeddings ``(spots, embedding_dim)`` to latents ``(spots, latent_dim)``."""
        if emb.dim() != 2 or emb.size(-1) != self.embedding_dim:
            msg = (
                f"Expected image embeddings of shape (spots, {self.embedding_dim}), found {tuple(emb.shape)}. "
                "Use the embeddings of the encoder the model was built for."
            )
            raise ValueError(msg)
        return self.net(emb)
