"""The user-facing HESpotEx model: setup registry, training state, prediction, safe save/load."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hespotex._settings import resolve_device
from hespotex.models._config import ModelConfig  # re-exported as hx.tl.ModelConfig (no torch import)
from hespotex.pp._genes import gene_hash
from hespotex.tl.model._data import GraphData, embedding_scale, floored_scale
from hespotex.tl.model._forward import forward_blocks
from hespotex.tl.model._lazy import LazyRows, as_rows, column_means, dense, streamed_statistics
from hespotex.tl.model._setup_validation import FORMAT_VERSION, SETUP_FILE, WEIGHTS_FILE, json_default, versions

logger = logging.getLogger("hespotex")

__all__ = ["HESpotEx", "ModelConfig"]


class HESpotEx:
    """HESpotEx: predicts spot expression of ``genes`` from frozen image embeddings and the spot graph.

    Build it with :func:`hespotex.tl.train` (or :meth:`fit`), apply it with
    :func:`hespotex.tl.predict`, keep it with :meth:`save` / :meth:`load`.

    Parameters
    ----------
    genes
        Genes the model predicts, in output order.
    embedding
        How the image embeddings were made (``encoder``, ``encoder_id``, ``patch_um``, ...): the
        record :func:`hespotex.pp.embed` stores in ``uns["hespotex_embed"]``. Data embedded
        differently is refused at prediction.
    config
        A :class:`hespotex.models.ModelConfig` or preset name (``"hespotex"``, ``"paper"``).
    target_sum
        Counts per spot after library scaling (see ``target_norm``).
    target_norm
        How counts become the model's targets (and so what its predictions are):
        ``"library_all"``, ``"library_modelled"`` or ``"log1p_counts"`` (see
        :mod:`hespotex.pp._targets`). Saved with the model (``setup.json``) and stated by every
        prediction.
    gene_selection
        Record of how the genes were chosen (flavor, samples fitted on).
    spot_geometry
        Spot diameter and centre-to-centre spacing of the training data, in µm
        (``{"spot_diameter_um": 55.0, "spacing_um": 100.0}``): what :func:`hespotex.pp.tile` lays
        out on image-only slides.
    embedding_norm
        How a slide's embeddings are standardised at prediction: ``"training"`` (the training spots'
        mean and scale) or ``"slide"`` (the slide's own, see :mod:`hespotex.pp._stain`). Training
        always uses the training statistics. Saved with the model and stated by every prediction.
    stain_augment
        ``None`` when trained on clean embeddings only; else the record of the stain-augmented
        views it was trained on (``n_views``, ``seed``, ``method``, ``ranges``, ``key``; see
        :mod:`hespotex.pp._stain_augment`). Saved with the model; prediction is unchanged (clean
        embeddings).

    Attributes
    ----------
    module_
        The :class:`hespotex.models.HESpotExNet` (after fitting or loading).
    is_trained_, history_, train_samples_, validation_, embedding_mean_, embedding_scale_
        Fitted state: whether trained, per-epoch losses and validation scores, the training
        sample names, the validation split, and the embedding standardisation (training spots only).
    training_data_
        Spots per sample the model was fitted and early-stopped on:
        ``{sample: {"train_spots": n, "validation_spots": m}}`` (saved; shown in the model card).
    """

    def __init__(
        self,
        genes: Sequence[str],
        *,
        embedding: dict[str, Any],
        config: Any = "hespotex",
        target_sum: float = 1e4,
        target_norm: str = "library_all",
        gene_selection: dict[str, Any] | None = None,
        spot_geometry: dict[str, float] | None = None,
        embedding_norm: str = "training",
        stain_augment: dict[str, Any] | None = None,
    ) -> None:
        from hespotex.models._net import resolve_config
        from hespotex.pp._stain import check_embedding_norm
        from hespotex.pp._targets import check_target_norm

        genes = [str(g) for g in genes]
        if not genes or len(set(genes)) != len(genes):
            msg = (
                f"Expected a non-empty list of unique genes, found {len(genes)} genes with "
                f"{len(genes) - len(set(genes))} duplicates."
            )
            raise ValueError(msg)
        self.genes = genes
        self.embedding = dict(embedding)
        self.config = resolve_config(config)
        self.target_sum = float(target_sum)
        self.target_norm = check_target_norm(str(target_norm))
        self.embedding_norm = check_embedding_norm(str(embedding_norm))
        self.stain_augment = dict(stain_augment) if stain_augment else None
        self.gene_selection = dict(gene_selection or {"flavor": "given", "genes": genes})
        self.spot_geometry = dict(spot_geometry or {})
        self.module_ = None
        self.is_trained_ = False
        self.history_: list[dict[str, float]] = []
        self.train_samples_: list[str] = []
        self.validation_: dict[str, Any] = {}
        self.embedding_mean_: np.ndarray | None = None
        self.embedding_scale_: np.ndarray | None = None
        self.train_strategy_: dict[str, Any] | None = None
        self.training_data_: dict[str, dict[str, int]] = {}

    def __repr__(self) -> str:
        state = "trained" if self.is_trained_ else "untrained"
        return (
            f"HESpotEx({len(self.genes)} genes, encoder={self.embedding.get('encoder')!r}, "
            f"patch_um={self.embedding.get('patch_um')}, {state})"
        )

    # ------------------------------------------------------------------ training
    def fit(
        self,
        train: Sequence[GraphData],
        *,
        validation: Sequence[tuple[GraphData, np.ndarray]] = (),
        device: str | None = "auto",
        max_nodes: int = 20_000,
        seed: int | None = None,
        strategy: str = "single",
        n_processes: int = 2,
        backend: str | None = None,
        autoencoder_data: Sequence[GraphData] | None = None,
    ) -> HESpotEx:
        """Train on prepared arrays (see :func:`hespotex.tl.train` for the AnnData/SpatialData front end).

        ``validation`` holds ``(sample, mask)`` pairs: the whole sample is predicted (its images
        exist at inference) and the spots in ``mask`` are scored by mean per-gene Pearson.
        ``strategy="ddp"`` trains data-parallel on ``n_processes`` processes with ``backend``
        (see :func:`hespotex.tl.train`); ``train_strategy_`` records how the model was trained.
        ``autoencoder_data``: the samples the autoencoder pre-trains on instead of ``train`` (``config.ae_samples``
        ``"all"``; expression and graphs only).

        When a sample's ``emb`` is a :class:`~hespotex.tl.model._lazy.LazyRows` reader (embeddings on disk,
        ``hx.tl.train(..., lazy=True)``), training streams: the standardisation statistics are computed chunk
        by chunk, rows are read and standardised one block at a time, and sparse targets are densified per
        block; the trained model equals the in-memory one up to float32 rounding of the statistics.
        """
        from hespotex.models import HESpotExNet
        from hespotex.tl.training._distributed import check_strategy
        from hespotex.tl.training._training import fit_net

        check_strategy(strategy, n_processes, backend)
        seed = self.config.seed if seed is None else seed
        self.training_data_ = training_data(train, validation)
        if any(isinstance(s.emb, LazyRows) for s in train):  # on disk: statistics chunk by chunk, no copy
            mean, std = streamed_statistics([as_rows(s.emb) for s in train])
            self.embedding_mean_ = mean.astype(np.float32)
            self.embedding_scale_ = floored_scale(std)
        else:
            emb = np.concatenate([s.emb for s in train])
            self.embedding_mean_ = emb.mean(axis=0).astype(np.float32)
            self.embedding_scale_ = embedding_scale(emb)
            del emb  # a copy of every training embedding: do not hold it through training
        train = [self._standardised(s) for s in train]
        validation = [(self._standardised(s), m) for s, m in validation]
        self.module_ = HESpotExNet(len(self.genes), len(self.embedding_mean_), self.config.replace(seed=seed))
        self._start_at_training_means(train)
        dev = resolve_device(device)
        if strategy == "ddp":
            from hespotex.tl.training._distributed import fit_distributed

            self.history_, self.train_strategy_ = fit_distributed(
                self,
                train,
                validation,
                device=dev,
                max_nodes=max_nodes,
                seed=seed,
                n_processes=n_processes,
                backend=backend,
                autoencoder_data=autoencoder_data,
            )
            self.module_.to("cpu")
            self.module_.eval()
            self.is_trained_ = True
            return self

        def validate(net) -> float:
            from hespotex.tl.evaluation._metrics import pearson_per_gene

            scores = []
            for s, mask in validation:
                pred = forward_blocks(net, s, dev, max_nodes=max_nodes)["expression"]
                r = pearson_per_gene(dense(s.expr[mask]), pred[mask])
                scores.append(np.nanmean(r) if np.isfinite(r).any() else 0.0)
            return float(np.mean(scores))

        self.history_ = fit_net(
            self.module_, train, validate=validate if validation else None, device=dev, max_nodes=max_nodes, seed=seed,
            autoencoder_data=autoencoder_data,
        )  # fmt: skip
        self.module_.to("cpu")
        self.train_strategy_ = {"strategy": "single", "world_size": 1, "backend": None}
        self.is_trained_ = True
        return self

    def _start_at_training_means(self, train: Sequence[GraphData]) -> None:
        """Set the direct gene head's output bias to the mean training expression, so the first
        epochs learn spatial variation instead of gene averages (early stopping then cannot end
        training while the model still predicts only the means)."""
        import torch

        head = self.module_.direct_head[-1]
        if any(not isinstance(s.expr, np.ndarray) for s in train):  # sparse targets (lazy training)
            mean = column_means([s.expr for s in train])
        else:
            mean = np.concatenate([s.expr for s in train]).mean(axis=0)
        with torch.no_grad():
            head.bias.copy_(torch.from_numpy(mean.astype(np.float32)))

    def _standardised(self, s: GraphData) -> GraphData:
        if isinstance(s.emb, LazyRows):  # standardised as each block is read (the same float32 operations)
            mean, scale = self.embedding_mean_, self.embedding_scale_
            views = None if s.views is None else as_rows(s.views).standardised(mean, scale)
            out = GraphData(s.name, s.emb.standardised(mean, scale), s.coords_um, s.expr, views=views)
            out.edges = s.edges
            return out
        emb = np.subtract(s.emb, self.embedding_mean_, dtype=np.float32)  # one float32 copy, scaled in place
        emb /= self.embedding_scale_
        views = None
        if s.views is not None:  # the views are standardised like the clean embeddings they stand in for
            views = np.subtract(s.views, self.embedding_mean_, dtype=np.float32)
            views /= self.embedding_scale_
        out = GraphData(s.name, emb, s.coords_um, s.expr, views=views)
        out.edges = s.edges
        return out

    # ------------------------------------------------------------------ prediction
    def predict_graph(
        self,
        sample: GraphData,
        *,
        device: str | None = "auto",
        max_nodes: int = 50_000,
        blocks: Sequence[np.ndarray] | None = None,
        on_block: Callable[[int, np.ndarray, dict[str, Any]], None] | None = None,
        smooth: float | None = None,
    ) -> dict[str, Any] | None:
        """Predict ``sample`` (embeddings and µm coordinates): expression, latent and attention arrays.

        ``smooth`` (collected results only): the expression spatially smoothed, each spot keeping that weight
        (:mod:`hespotex.tl.prediction._smoothing`; streaming smooths its expression rows itself).

        Large slides run block by block, each block with a halo of ``n_hops`` neighbour rings, so
        predictions equal a whole-slide pass while memory stays bounded by ``max_nodes``. Embeddings
        are standardised block by block, so ``sample.emb`` may be any reader of rows (``shape``,
        ``len`` and integer-array indexing, e.g. one backed by zarr) instead of an array.

        ``blocks`` (core spot indices, default: compact tiles of about ``max_nodes`` spots) and
        ``on_block`` serve streaming: with ``on_block``, each block's results are handed over as
        ``on_block(i, core, result)`` (``i`` = position in ``blocks``) and not collected, and this
        returns ``None``; ``result`` holds the core rows' ``"latent"`` and ``"features"`` (the graph
        decoder's input to its gene head, ``None`` without a decoder) and ``"attention"``
        ``(targets, sources, weights)`` of the edges into core spots, or ``None``. The gene heads are
        skipped there (the expression is ``direct_head(latent) + decoder.gene_head(features)``, see
        :func:`hespotex.tl.prediction._stream.gene_heads`), so a block never holds spots × genes.
        """
        self._check_trained()
        if sample.emb.shape[1] != len(self.embedding_mean_):
            msg = (
                f"Expected embeddings of width {len(self.embedding_mean_)} (encoder "
                f"{self.embedding.get('encoder')!r}), "
                f"found {sample.emb.shape[1]}. Embed the slide with the model's encoder."
            )
            raise ValueError(msg)
        mean, scale = self.embedding_mean_, self.embedding_scale_
        if self.embedding_norm == "slide":
            from hespotex.pp._stain import slide_statistics

            mean, scale = slide_statistics(sample.emb)

        def standardise(rows: np.ndarray) -> np.ndarray:
            rows = np.subtract(rows, mean, dtype=np.float32)  # the same float32 operations as a whole-slide copy
            rows /= scale
            return rows

        result = forward_blocks(
            self.module_,
            sample,
            resolve_device(device),
            max_nodes=max_nodes,
            blocks=blocks,
            on_block=on_block,
            standardise=standardise,
        )
        if smooth is not None and result is not None:
            from hespotex.tl.prediction._smoothing import check_smooth, smoothing_matrix

            S = smoothing_matrix(sample, check_smooth(smooth))  # on the sample's cached 6-NN graph
            result["expression"] = np.asarray(S @ result["expression"], dtype=np.float32)
        return result

    def _check_trained(self) -> None:
        if not self.is_trained_ or self.module_ is None:
            msg = "This model is not trained yet: call `hx.tl.train(...)` or load one with `hx.tl.HESpotEx.load(path)`."
            raise RuntimeError(msg)

    # ------------------------------------------------------------------ persistence
    def setup_dict(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-safe values (what :meth:`save` writes to ``setup.json``)."""
        return {
            "format_version": FORMAT_VERSION,
            "versions": versions(),
            "genes": self.genes,
            "gene_hash": gene_hash(self.genes),
            "gene_selection": self.gene_selection,
            "spot_geometry": self.spot_geometry,
            "embedding": self.embedding,
            "embedding_dim": None if self.embedding_mean_ is None else len(self.embedding_mean_),
            "config": self.config.to_dict(),
            "target_sum": self.target_sum,
            "target_norm": self.target_norm,
            "embedding_norm": self.embedding_norm,
            "stain_augment": self.stain_augment,
            "train_samples": self.train_samples_,
            "validation": self.validation_,
            "history": self.history_,
            "train_strategy": getattr(self, "train_strategy_", None),
            "training_data": getattr(self, "training_data_", {}),
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model to the folder ``path``: ``model.safetensors`` (weights, embedding
        standardisation), ``setup.json`` (genes, gene selection, normalisation, encoder and patch
        geometry, config, versions, history, training data) and ``README.md``, a Hugging Face model card
        (:func:`hespotex.tl.model_card`) so the folder can be published on the Hub as is. A ``README.md``
        someone edited in the folder being replaced is kept (with a warning), not overwritten.

        The folder is written beside its destination (under a name unique to the call) and renamed
        into place, so an interruption never leaves a half-written model; it is created with the
        user's umask and carries the marker ``.hespotex.json``. An existing folder is replaced only
        with ``overwrite=True``, and only when hespotex wrote it (its marker, or nothing but a model's
        two files): a file or any other folder is refused, overwrite or not, naming what it holds.
        """
        from safetensors.torch import save_file

        from hespotex import _ownership
        from hespotex.tl.model._card import write_card

        self._check_trained()
        path = Path(path)
        with _ownership.replacing_dir(
            path, "model", what="hespotex model folder", overwrite=overwrite, legacy=(WEIGHTS_FILE, SETUP_FILE)
        ) as tmp:
            import torch

            tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
            tensors["setup.embedding_mean"] = torch.from_numpy(self.embedding_mean_)
            tensors["setup.embedding_scale"] = torch.from_numpy(self.embedding_scale_)
            save_file(
                tensors, tmp / WEIGHTS_FILE, metadata={"format": "hespotex", "format_version": str(FORMAT_VERSION)}
            )
            os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~_ownership.umask())  # safetensors writes 0600: the user's umask
            (tmp / SETUP_FILE).write_text(json.dumps(self.setup_dict(), indent=1, default=json_default))
            write_card(self, tmp, previous=path if path.is_dir() else None)  # README.md; a user-edited one is kept
        logger.info("Saved %r to %s.", self, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> HESpotEx:
        """Load a model saved with :meth:`save` (weights through safetensors: no pickle is run).

        Checked before anything is allocated (:mod:`hespotex.tl.model._setup_validation`): every field of
        ``setup.json`` (types, required fields, bounds), its ``gene_hash`` against the gene names, the
        tensor shapes in the safetensors header against the network the setup describes. The weights
        are then read fully into memory (replacing or truncating the file later does not affect the
        loaded model) and refused when any is NaN or infinite or the embedding scale is not positive.
        """
        from hespotex.tl.model._setup_validation import as_array, load_checked, materialise

        path = Path(path)
        missing = [f for f in (WEIGHTS_FILE, SETUP_FILE) if not (path / f).is_file()]
        if missing and (path / "ensemble.json").is_file():
            msg = (
                f"{str(path)!r} holds an ensemble of models (ensemble.json), not one model; load it with "
                "`hx.tl.load_model(path)` (either kind) or `hx.tl.HESpotExEnsemble.load(path)`."
            )
            raise FileNotFoundError(msg)
        if missing:
            msg = (
                f"{str(path)!r} is not a complete hespotex model folder: missing {missing}. Save it again with "
                "`model.save(path)`."
            )
            raise FileNotFoundError(msg)
        setup, tensors, net = load_checked(path, WEIGHTS_FILE, SETUP_FILE)  # net: checked, on the meta device
        model = cls(
            setup["genes"],
            embedding=setup["embedding"],
            config=setup["config"],
            target_sum=setup["target_sum"],
            target_norm=setup.get(
                "target_norm", "library_all"
            ),  # models saved before the setting: library over all genes
            gene_selection=setup.get("gene_selection"),
            spot_geometry=setup.get("spot_geometry"),
            embedding_norm=setup.get("embedding_norm", "training"),  # models saved before the setting
            stain_augment=setup.get("stain_augment"),
        )
        model.embedding_mean_ = as_array(tensors.pop("setup.embedding_mean"))
        model.embedding_scale_ = as_array(tensors.pop("setup.embedding_scale"))
        net = materialise(net, setup)  # the network built once: for the header check, then given memory
        state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
        del tensors
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            msg = (
                f"The weights in {str(path)!r} do not fit the model its setup describes ({str(err)[:300]}); the "
                "folder is corrupt or partial."
            )
            raise ValueError(msg) from err
        net.eval()
        model.module_ = net
        model.is_trained_ = True
        model.history_ = setup.get("history", [])
        model.train_samples_ = setup.get("train_samples", [])
        model.validation_ = setup.get("validation", {})
        model.train_strategy_ = setup.get("train_strategy")
        model.training_data_ = setup.get("training_data", {})  # models saved before the record: {}
        return model

    @property
    def model_id(self) -> str:
        """A short fingerprint of the weights and setup (not of how training ran); predictions record it in ``uns``."""
        import hashlib

        from hespotex.models._config import LEGACY_FIELDS

        self._check_trained()
        setup = {
            k: v
            for k, v in self.setup_dict().items()
            if k not in ("history", "versions", "train_strategy", "training_data")
        }
        # a field at the value models had before it existed leaves the fingerprint as it was: old predictions match
        setup["config"] = {k: v for k, v in setup["config"].items() if LEGACY_FIELDS.get(k, object()) != v}
        h = hashlib.sha256(json.dumps(setup, sort_keys=True, default=json_default).encode())
        for k, v in sorted(self.module_.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def n_parameters(self) -> int:
        """Number of parameters of the network."""
        self._check_trained()
        return sum(p.numel() for p in self.module_.parameters())


def training_data(
    train: Sequence[GraphData], validation: Sequence[tuple[GraphData, np.ndarray]]
) -> dict[str, dict[str, int]]:
    """``{sample: {"train_spots": n, "validation_spots": m}}`` of the parts :meth:`HESpotEx.fit` is given."""
    out: dict[str, dict[str, int]] = {}
    for s in train:
        out.setdefault(str(s.name), {"train_spots": 0, "validation_spots": 0})["train_spots"] += int(s.n)
    for s, mask in validation:
        row = out.setdefault(str(s.name), {"train_spots": 0, "validation_spots": 0})
        row["validation_spots"] += int(np.count_nonzero(mask))
    return out
