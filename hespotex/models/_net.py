"""HESpotExNet: the dual-stream model as one ``nn.Module`` (no AnnData; the ``tl`` layer feeds it tensors).

Training (:meth:`HESpotExNet.loss`) sees, for one graph of spots (a slide or a subgraph of one):

- ``x_expr`` ``(spots, genes)``: normalised expression (target and autoencoder input);
- ``emb`` ``(spots, embedding_dim)``: cached embeddings of the frozen image encoder;
- ``edge_index_ae``: the autoencoder's spatial graph (``ae_neighbors``-NN);
- ``edge_index_dec``: the decoder's spatial graph (``decoder_neighbors``-NN).

::

    z, x̂     = Autoencoder(x_expr, edge_index_ae)                 expression stream (training only)
    ẑ        = ImageProjection(emb)                                image stream
    ŷ        = DirectHead(ẑ) + GraphDecoder(ẑ, edge_index_dec)     expression prediction
    loss     = w_rec·MSE(x̂, x) + w_align·(1 − r_spot(z, ẑ)) + w_mse·MSE(ŷ, x) + w_pcc·(1 − r_gene(ŷ, x))

``r_spot`` is Pearson per spot across latent dimensions (the authors' alignment), ``r_gene`` Pearson
per gene across spots. Inference (:meth:`HESpotExNet.forward`) needs only ``emb`` and the decoder graph.

Paper mapping: the authors train the autoencoder first (per slide, 500 epochs) and then the image
stream against the fixed ``z`` with ``1·latent + 1·MSE`` (``train.py``); ``detach_latent=True`` keeps
``z`` a fixed target here too, and :meth:`HESpotExNet.autoencoder_loss` serves the pre-training stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._autoencoder import GraphAttentionAutoencoder
from ._config import PRESETS, ModelConfig
from ._decoder import GraphDecoder
from ._layers import mlp
from ._losses import pearson_loss
from ._projection import ImageProjection


def parameter_count(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (each shared parameter counted once).

    Parameters
    ----------
    module
        Any ``nn.Module``.
    trainable_only
        Count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def resolve_config(config: ModelConfig | str | dict[str, Any] | None) -> ModelConfig:
    """A :class:`ModelConfig` from a config, a preset name, a dict of fields, or ``None`` (the default preset)."""
    if config is None:
        return PRESETS["hespotex"]
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str):
        return ModelConfig.preset(config)
    if isinstance(config, dict):
        return ModelConfig.from_dict(config)
    msg = f"Expected a ModelConfig, a preset name {sorted(PRESETS)} or a dict, found {type(config).__name__}."
    raise TypeError(msg)


class HESpotExNet(nn.Module):
    """The HESpotEx model: autoencoder (training only), image projection, direct head, graph decoder.

    Parameters
    ----------
    n_genes
        Number of predicted genes.
    embedding_dim
        Width of the frozen image encoder's embedding.
    config
        A :class:`ModelConfig`, a preset name (``"hespotex"``, default, or ``"paper"``) or a
        :meth:`ModelConfig.to_dict` dict. Parameters are initialised from ``config.seed`` (the autoencoder's from
        ``config.ae_seed`` when set) without touching torch's global random state.

    Attributes
    ----------
    autoencoder
        :class:`GraphAttentionAutoencoder`, or ``None`` when ``config.use_autoencoder`` is ``False``.
    projection
        :class:`ImageProjection` from the embedding to ``ẑ``.
    direct_head
        Gene head on ``ẑ`` (``Linear → ReLU → LayerNorm → Linear``).
    decoder
        :class:`GraphDecoder`, or ``None`` when ``config.use_graph_decoder`` is ``False``.
    """

    def __init__(
        self,
        n_genes: int,
        embedding_dim: int,
        config: ModelConfig | str | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        cfg = resolve_config(config)
        self.config = cfg
        self.n_genes = n_genes
        self.embedding_dim = embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.autoencoder = (
                GraphAttentionAutoencoder(
                    n_genes, cfg.ae_hidden_dim, cfg.latent_dim, attention=cfg.ae_attention, add_self_loops=True
                )
                if cfg.use_autoencoder
                else None
            )
            if self.autoencoder is not None and cfg.ae_seed is not None:  # from its own seed; the draws above keep
                with torch.random.fork_rng(devices=[]):  # the image stream's initialisation as without ae_seed
                    torch.manual_seed(cfg.ae_seed)
                    self.autoencoder = GraphAttentionAutoencoder(
                        n_genes, cfg.ae_hidden_dim, cfg.latent_dim, attention=cfg.ae_attention, add_self_loops=True
                    )
            self.projection = ImageProjection(
                embedding_dim, cfg.latent_dim, cfg.projection_hidden_dim, dropout=cfg.projection_dropout
            )
            self.direct_head = mlp(cfg.latent_dim, cfg.head_hidden_dim, n_genes, dropout=cfg.head_dropout)
            self.decoder = (
                GraphDecoder(
                    cfg.latent_dim,
                    n_genes,
                    conv=cfg.decoder_conv,
                    n_hops=cfg.n_hops,
                    heads=cfg.decoder_heads,
                    stacked=cfg.decoder_stacked,
                    residual=cfg.decoder_residual,
                    l2_normalize=cfg.decoder_l2_normalize,
                    dropout=cfg.decoder_dropout,
                    jk_mode=cfg.jk_mode,
                    head_hidden_dim=cfg.head_hidden_dim,
                    head_dropout=cfg.head_dropout,
                )
                if cfg.use_graph_decoder
                else None
            )

    @property
    def aligns(self) -> bool:
        """Whether the loss includes latent alignment (an autoencoder exists and ``config.align``)."""
        return self.autoencoder is not None and self.config.align

    def image_parameters(self) -> list[nn.Parameter]:
        """Parameters of the image stream (projection, direct head, decoder): everything but the autoencoder."""
        ae = {id(p) for p in self.autoencoder.parameters()} if self.autoencoder is not None else set()
        return [p for p in self.parameters() if id(p) not in ae]

    def forward(self, emb: Tensor, edge_index_dec: Tensor | None = None) -> dict[str, Any]:
        """Predict expression from image embeddings (inference needs no expression).

        Parameters
        ----------
        emb
            Image embeddings ``(spots, embedding_dim)``.
        edge_index_dec
            Decoder spatial graph ``(2, E)`` (row 0 = source, row 1 = target); required unless the
            model has no graph decoder.

        Returns
        -------
        A dict with ``"expression"`` ``(spots, n_genes)``, ``"latent"`` (``ẑ``, ``(spots, latent_dim)``)
        and ``"attention"``: ``(edge_index, alpha)`` of the decoder (self loops included, alpha
        averaged over heads and hops, summing to 1 over each target's incoming edges) or ``None``
        when the decoder has no attention (GCN, SAGE) or there is no decoder.
        """
        z_hat = self.projection(emb)
        expression = self.direct_head(z_hat)
        attention = None
        if self.decoder is not None:
            if edge_index_dec is None:
                msg = "This model has a graph decoder: pass `edge_index_dec`, the decoder's spatial graph."
                raise ValueError(msg)
            graph_expression, attention = self.decoder(z_hat, edge_index_dec)
            expression = expression + graph_expression
        return {"expression": expression, "latent": z_hat, "attention": attention}

    def autoencoder_loss(self, x_expr: Tensor, edge_index_ae: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted reconstruction loss of the autoencoder alone (the pre-training stage).

        Returns
        -------
        The loss and ``{"reconstruction": ..., "total": ...}`` (detached).
        """
        if self.autoencoder is None:
            msg = "This model has no autoencoder (`use_autoencoder=False`); there is nothing to pre-train."
            raise ValueError(msg)
        recon, _ = self.autoencoder.loss(x_expr, edge_index_ae)
        total = self.config.reconstruction_weight * recon
        return total, {"reconstruction": recon.detach(), "total": total.detach()}

    def loss(
        self,
        x_expr: Tensor,
        emb: Tensor,
        edge_index_ae: Tensor | None = None,
        edge_index_dec: Tensor | None = None,
        *,
        latent_target: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss on one graph of spots.

        Parameters
        ----------
        x_expr
            Normalised expression ``(spots, n_genes)``: the target, and the autoencoder's input.
        emb
            Image embeddings ``(spots, embedding_dim)`` of the same spots.
        edge_index_ae
            Autoencoder spatial graph; required when the model has an autoencoder.
        edge_index_dec
            Decoder spatial graph; required when the model has a graph decoder.
        latent_target
            The frozen autoencoder's latent ``z`` of these spots, precomputed after pre-training (the
            authors' two-stage training): the autoencoder is then not run, and ``ẑ`` is aligned to it.

        Returns
        -------
        The weighted total (differentiable) and a dict of detached parts: ``"mse"`` always,
        ``"reconstruction"`` with an autoencoder, ``"alignment"`` when aligning,
        ``"gene_pearson"`` when its weight is positive, and ``"total"``. Unweighted values.
        """
        cfg = self.config
        if x_expr.shape != (emb.size(0), self.n_genes):
            msg = (
                f"Expected expression of shape ({emb.size(0)}, {self.n_genes}) to match the embeddings' "
                f"{emb.size(0)} spots and the model's {self.n_genes} genes, found {tuple(x_expr.shape)}."
            )
            raise ValueError(msg)
        out = self(emb, edge_index_dec)
        pred = out["expression"]
        parts: dict[str, Tensor] = {}
        mse = F.mse_loss(pred, x_expr)
        total = cfg.mse_weight * mse
        parts["mse"] = mse
        if latent_target is not None:
            if self.aligns:
                align = pearson_loss(out["latent"], latent_target, dim=-1)
                total = total + cfg.alignment_weight * align
                parts["alignment"] = align
        elif self.autoencoder is not None:
            if edge_index_ae is None:
                msg = "This model has an autoencoder: pass `edge_index_ae`, the autoencoder's spatial graph."
                raise ValueError(msg)
            recon, ae_out = self.autoencoder.loss(x_expr, edge_index_ae)
            total = total + cfg.reconstruction_weight * recon
            parts["reconstruction"] = recon
            if cfg.align:
                z = ae_out["latent"]
                if cfg.detach_latent:
                    z = z.detach()
                align = pearson_loss(out["latent"], z, dim=-1)
                total = total + cfg.alignment_weight * align
                parts["alignment"] = align
        if cfg.gene_pearson_weight > 0:
            gene_pcc = pearson_loss(pred, x_expr, dim=0)
            total = total + cfg.gene_pearson_weight * gene_pcc
            parts["gene_pearson"] = gene_pcc
        parts["total"] = total
        return total, {k: v.detach() for k, v in parts.items()}
