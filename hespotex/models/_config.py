"""Model configuration (:class:`ModelConfig`) and the named presets (:data:`PRESETS`).

Two presets:

``"paper"`` — the published HESpotEx, read from the authors' code (``wwYinYin/HESpotEx``:
``model/expression_embedding.py``, ``model/exp_module.py``, ``model/models.py``,
``model/image_modules.py``, ``common/dataset.py``, ``train.py``):

============================  =====================================================================
paper                         this package
============================  =====================================================================
kNN graph k=8 + self loops    ``ae_neighbors=8`` (``Cal_Spatial_Net(k_cutoff=8)``, ``self_loop=True``)
STAGATE dims genes→512→64     ``ae_hidden_dim=512``, ``latent_dim=64``; sigmoid attention as STAGATE
AE: Adam lr 1e-3, wd 1e-4,    ``ae_lr``, ``ae_weight_decay``, ``ae_epochs=500``, ``ae_grad_clip=5``;
500 epochs, clip 5            the latent is then a fixed target (``detach_latent=True``)
latent_head 512→1024→64       :class:`~hespotex.models.ImageProjection` (Linear, ReLU, LayerNorm,
                              Linear), ``projection_hidden_dim=1024``, no dropout
calcADJ k=4                   ``decoder_neighbors=4``
4 × ImageDecoder              ``decoder_conv="sage"``, ``n_hops=4``, ``decoder_stacked=False``,
                              ``decoder_l2_normalize=True`` (see below)
LSTM jumping knowledge        ``jk_mode="lstm"`` (torch-geometric's JK, *before* the gene head)
gene_head 64→1024→genes       direct head, ``head_hidden_dim=1024``
loss latent + MSE             ``alignment_weight=1``, ``mse_weight=1``, ``gene_pearson_weight=0``
AdamW lr 1e-3, wd 1e-3        ``lr``, ``weight_decay``; ``epochs=50`` (``train.main`` default)
============================  =====================================================================

Where the paper preset knowingly departs from the authors' code:

- *Decoder layer.* The paper calls it a GCN decoder; the code's ``ImageDecoder`` is a
  GraphSAGE-mean layer (``W·[x ‖ mean of neighbours]``, no bias, ReLU, L2 normalisation), so the
  preset uses ``SAGEConv`` (``decoder_conv="gcn"`` gives a true ``GCNConv``). The code also
  subtracts an identity from an adjacency that has no self loops, so its "neighbour mean" carries a
  −1/3 weight on the spot itself; we use the plain neighbour mean.
- *Hops.* The code applies the four layers side by side to ``ẑ`` (one-hop receptive field), then
  combines them; ``decoder_stacked=False`` reproduces that, ``True`` stacks them into real hops.
- *Jumping knowledge.* The code runs a 2-layer ``nn.LSTM(64, n_genes)`` over the four layer outputs
  and averages its outputs: about 359 M parameters at 5,457 genes. Here torch-geometric's
  ``JumpingKnowledge("lstm")`` combines latent-sized features and a gene head follows it.
- *Nuclei scaling.* The code multiplies predictions by a Cellpose nuclei-count factor; omitted.
- *Selection.* The code picks the epoch with the best test-slide Pearson; ``patience`` applies to a
  validation split held apart from the test slides (the ``tl`` layer does the split).

``"hespotex"`` — this package's defaults (the dataclass defaults). Differences and why:

- ``decoder_conv="gatv2"`` with 4 heads: every predicted slide gets per-edge attention weights
  (``obsp["hespotex_attention"]``) at no extra cost; GATv2's dynamic attention can weight
  neighbours by content, which the fixed SAGE/GCN averages cannot.
- ``decoder_stacked=True`` + ``decoder_residual=True``: four real hops (the receptive field the
  paper describes) with residual connections so deeper propagation does not wash ``ẑ`` out.
- ``decoder_neighbors=6``: Visium spots sit on a hexagonal lattice with six equidistant neighbours;
  k=4 keeps an arbitrary, direction-biased four of them (on the square legacy-ST grid, 6 adds two
  diagonal spots).
- ``jk_mode="cat"``: keeps every hop's features, deterministic and cheap (no LSTM).
- ``head_hidden_dim=1024`` (the paper's width; 512 until 2026-12-03): on the shift benchmark the
  8-member default with 1,024-wide gene heads beats the one with 512 by 0.005-0.008 on the top-50
  genes of clean, rescaled and re-stained sections (0.002 thinned), the same within 0.002 on all
  genes, and spreads less over seeds (``benchmarks/results/shift_members.md``); narrower layers
  lose (projection and heads 256: -0.006 on the top-50), and 2,048-wide heads lose 0.003 on all
  genes and spread more over seeds.
- ``ae_samples="all"`` (since 2026-12-03, session 16; the paper's is ``"training"``): the autoencoder, which reads
  expression only, pre-trains on every sample given to :func:`hespotex.tl.train`, the ones held out for early
  stopping too, so an ensemble pre-trains one autoencoder instead of one per held-out sample. On the shift benchmark
  (3 seeds) the 8-member default scores the same as with an autoencoder per held-out sample (-0.0007 to +0.0012 mean
  over truths, every condition and gene set) and trains in 0.67 times the time side by side from an empty cache
  (``benchmarks/results/shift_defaults.md``, ``shared_autoencoder_time.md``). The image stream still never trains on
  the held-out samples, so early stopping still scores images it has not seen.
- Dropout 0.1 in projection, decoder and heads and ``weight_decay=1e-2`` (AdamW's default):
  regularisation for training sets of a few thousand spots and millions of head parameters.
- ``gene_pearson_weight=0.5``: MSE is dominated by highly expressed genes; the scale-free
  gene-wise Pearson term targets the metric the benchmarks report.
- ``grad_clip=5`` and ``patience=10`` (validation-based early stopping).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DECODER_CONVS = ("gcn", "sage", "gat", "gatv2")
JK_MODES = ("cat", "max", "lstm")
AE_ATTENTIONS = ("sigmoid", "leaky_relu")
AE_SAMPLES = ("training", "all")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, loss weights and training hyper-parameters of :class:`~hespotex.models.HESpotExNet`.

    Frozen: derive variants with :meth:`replace` or :meth:`preset`. The defaults are the
    ``"hespotex"`` preset; see the module docstring for how ``"paper"`` maps to the publication.

    Attributes
    ----------
    ae_neighbors
        k of the kNN spatial graph of the autoencoder (built by the ``tl`` layer). Paper: 8.
    decoder_neighbors
        k of the kNN spatial graph of the graph decoder (built by the ``tl`` layer; it exists at
        inference because it comes from spot coordinates). Paper: 4.
    ae_hidden_dim, latent_dim
        Autoencoder widths: genes → ``ae_hidden_dim`` → ``latent_dim``. Paper: 512, 64.
    ae_attention
        Attention non-linearity of the autoencoder: ``"sigmoid"`` (STAGATE, the paper) or
        ``"leaky_relu"`` (the original GAT).
    projection_hidden_dim, projection_dropout
        Image projection MLP: embedding → hidden → ``latent_dim``. Paper: 1024, no dropout.
    decoder_conv
        Graph decoder layer: ``"gcn"``, ``"sage"`` (the authors' code), ``"gat"`` or ``"gatv2"``.
        Only the attention layers return attention weights.
    n_hops
        Number of graph layers of the decoder. Paper: 4.
    decoder_heads
        Attention heads (``"gat"``/``"gatv2"``); ``latent_dim`` must be divisible by it.
    decoder_stacked
        ``True``: layer *l* reads layer *l − 1* (n real hops). ``False``: every layer reads ``ẑ``
        (the authors' code).
    decoder_residual
        Add each layer's input to its output.
    decoder_l2_normalize
        L2-normalise each layer's output per spot (the authors' ``ImageDecoder``).
    decoder_dropout
        Dropout on each layer's output.
    jk_mode
        Jumping-knowledge aggregation of the layer outputs: ``"cat"``, ``"max"`` or ``"lstm"``.
    head_hidden_dim, head_dropout
        Width and dropout of the two gene heads (direct head on ``ẑ``; graph head after JK).
    use_autoencoder
        ``False``: the "no autoencoder" ablation (no reconstruction, no alignment; the image
        stream learns from the expression loss only).
    use_graph_decoder
        ``False``: the "no graph decoder" ablation (expression from the direct head only).
    align
        ``False``: the "no latent alignment" ablation (the autoencoder is still trained by
        reconstruction but does not guide the image stream).
    detach_latent
        Alignment pulls ``ẑ`` towards a fixed ``z`` (no gradient into the autoencoder), as in the
        authors' two-stage training. ``False`` lets alignment also move ``z``.
    reconstruction_weight, alignment_weight, mse_weight, gene_pearson_weight
        Loss weights: autoencoder MSE, ``1 − Pearson(z, ẑ)`` per spot, expression MSE,
        ``1 − Pearson`` per gene across spots.
    lr, weight_decay, epochs, grad_clip, patience
        AdamW for the image stream (projection, decoder, heads) and the joint stage; ``grad_clip``
        is a max gradient norm (``None``: off); ``patience``: epochs without validation improvement
        before stopping (``None``: run all ``epochs``).
    ae_lr, ae_weight_decay, ae_epochs, ae_grad_clip
        Autoencoder pre-training (Adam in the paper); ``ae_epochs=0`` skips pre-training.
    seed
        Seed of the parameter initialisation (and of training, in the ``tl`` layer).
    ae_seed
        Seed of the autoencoder's initialisation and pre-training; ``None`` (default): ``seed``. An ensemble's
        members (:func:`hespotex.tl.train`, ``ensemble``) get one shared seed with ``ae_samples="all"``, so they share
        one pre-trained autoencoder; with ``"training"`` the members holding out the same sample share the first
        one's. They differ in the image stream.
    ae_samples
        The expression the autoencoder pre-trains on (read by the tl layer): ``"all"`` (default), every sample given
        to :func:`hespotex.tl.train`, the ones held out for early stopping too (their expression only: the image
        stream never trains on them, and early stopping still scores images it never saw); every member of an
        ensemble then shares one autoencoder. ``"training"``: the training spots only (the paper; the default until
        2026-12-03, and what models saved without this field were trained with).
    """

    # graphs (built by the tl layer)
    ae_neighbors: int = 8
    decoder_neighbors: int = 6
    # expression stream
    ae_hidden_dim: int = 512
    latent_dim: int = 64
    ae_attention: str = "sigmoid"
    # image stream
    projection_hidden_dim: int = 1024
    projection_dropout: float = 0.1
    # graph decoder
    decoder_conv: str = "gatv2"
    n_hops: int = 4
    decoder_heads: int = 4
    decoder_stacked: bool = True
    decoder_residual: bool = True
    decoder_l2_normalize: bool = False
    decoder_dropout: float = 0.1
    jk_mode: str = "cat"
    head_hidden_dim: int = 1024
    head_dropout: float = 0.1
    # ablations
    use_autoencoder: bool = True
    use_graph_decoder: bool = True
    align: bool = True
    detach_latent: bool = True
    # loss weights
    reconstruction_weight: float = 1.0
    alignment_weight: float = 1.0
    mse_weight: float = 1.0
    gene_pearson_weight: float = 0.5
    # optimisation (read by the tl layer)
    lr: float = 1e-3
    weight_decay: float = 1e-2
    epochs: int = 50
    grad_clip: float | None = 5.0
    patience: int | None = 10
    ae_lr: float = 1e-3
    ae_weight_decay: float = 1e-4
    ae_epochs: int = 500
    ae_grad_clip: float | None = 5.0
    seed: int = 0
    ae_seed: int | None = None
    ae_samples: str = "all"

    def __post_init__(self) -> None:
        if self.ae_seed is not None and (isinstance(self.ae_seed, bool) or not isinstance(self.ae_seed, int)):
            msg = f"Expected `ae_seed` to be an integer or None, found {self.ae_seed!r}."
            raise ValueError(msg)
        for name in (
            "ae_neighbors",
            "decoder_neighbors",
            "ae_hidden_dim",
            "latent_dim",
            "projection_hidden_dim",
            "n_hops",
            "decoder_heads",
            "head_hidden_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"Expected `{name}` to be a positive integer, found {value!r}."
                raise ValueError(msg)
        for name, allowed in (
            ("decoder_conv", DECODER_CONVS),
            ("jk_mode", JK_MODES),
            ("ae_attention", AE_ATTENTIONS),
            ("ae_samples", AE_SAMPLES),
        ):
            if getattr(self, name) not in allowed:
                msg = f"Expected `{name}` to be one of {allowed}, found {getattr(self, name)!r}."
                raise ValueError(msg)
        for name in ("projection_dropout", "decoder_dropout", "head_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                msg = f"Expected `{name}` in [0, 1), found {value!r}."
                raise ValueError(msg)
        for name in ("reconstruction_weight", "alignment_weight", "mse_weight", "gene_pearson_weight"):
            if getattr(self, name) < 0:
                msg = f"Expected a non-negative `{name}`, found {getattr(self, name)!r}."
                raise ValueError(msg)
        if self.decoder_conv in ("gat", "gatv2") and self.latent_dim % self.decoder_heads:
            msg = (
                f"`latent_dim` ({self.latent_dim}) must be divisible by `decoder_heads` "
                f"({self.decoder_heads}) for the {self.decoder_conv!r} decoder: heads are concatenated. "
                "Change one of them."
            )
            raise ValueError(msg)

    @property
    def decoder_has_attention(self) -> bool:
        """Whether the graph decoder returns attention weights (``"gat"`` / ``"gatv2"``)."""
        return self.use_graph_decoder and self.decoder_conv in ("gat", "gatv2")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild a config from :meth:`to_dict` output; missing fields take the defaults.

        Unknown keys are refused (they would mean the config was written by another version). A saved model's
        config lacking a field of :data:`LEGACY_FIELDS` is read with that value, as it was trained (the model
        loaders fill it in; a dict given here takes today's defaults).
        """
        _check_keys(data)
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset ``name`` (``"paper"`` or ``"hespotex"``) with ``overrides`` applied."""
        if name not in PRESETS:
            msg = f"Unknown preset {name!r}; expected one of {sorted(PRESETS)}."
            raise KeyError(msg)
        return PRESETS[name].replace(**overrides)


LEGACY_FIELDS: dict[str, Any] = {"ae_samples": "training"}
"""Fields whose default changed after saved configs could lack them: the value such configs were trained with."""


def _check_keys(data: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        msg = f"Unknown ModelConfig field(s) {unknown}; known fields are {sorted(known)}."
        raise KeyError(msg)


PRESETS: dict[str, ModelConfig] = {
    "hespotex": ModelConfig(),
    "paper": ModelConfig(
        ae_neighbors=8,
        decoder_neighbors=4,
        ae_hidden_dim=512,
        latent_dim=64,
        ae_attention="sigmoid",
        projection_hidden_dim=1024,
        projection_dropout=0.0,
        decoder_conv="sage",
        n_hops=4,
        decoder_heads=1,
        decoder_stacked=False,
        decoder_residual=False,
        decoder_l2_normalize=True,
        decoder_dropout=0.0,
        jk_mode="lstm",
        head_hidden_dim=1024,
        head_dropout=0.0,
        detach_latent=True,
        reconstruction_weight=1.0,
        alignment_weight=1.0,
        mse_weight=1.0,
        gene_pearson_weight=0.0,
        lr=1e-3,
        weight_decay=1e-3,
        epochs=50,
        grad_clip=None,
        patience=None,
        ae_lr=1e-3,
        ae_weight_decay=1e-4,
        ae_epochs=500,
        ae_grad_clip=5.0,
        seed=0,
        ae_samples="training",
    ),
}
"""Named configurations: ``"paper"`` (the published model) and ``"hespotex"`` (this package's defaults)."""
