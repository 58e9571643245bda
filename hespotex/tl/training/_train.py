"""``hx.tl.train``: from samples (SpatialData or AnnData tables) to a trained :class:`HESpotEx`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from hespotex._compat import renamed_arguments
from hespotex._sample import as_sample_dict, get_table
from hespotex.pp._context import check_train_context_um, default_context_um, same_context, scales_text
from hespotex.pp._embed import EMBED_KEY
from hespotex.pp._encoder_base import DEFAULT_ENCODER
from hespotex.pp._stain_augment import DEFAULT_DIHEDRAL_AUGMENT, DEFAULT_SCALE_AUGMENT
from hespotex.tl.model._data import EMBEDDING_KEY, GraphData, graph_data, spatial_block_mask
from hespotex.tl.model._model import HESpotEx
from hespotex.tl.training._train_inputs import check_tta, lazy_views, resolve_lazy, stain_views

if TYPE_CHECKING:
    from hespotex.tl.model._ensemble import HESpotExEnsemble

logger = logging.getLogger("hespotex")


def ensure_embeddings(
    sample: Any,
    *,
    embedding_key: str = EMBEDDING_KEY,
    encoder: Any = None,
    weights: str | Path | None = None,
    layers: Sequence[str] | None = None,
    patch_um: float | None = None,
    input_size: int | None = None,
    encoder_seed: int = 0,
    tta: bool = False,
    stain_augment: int = 0,
    scale_augment: float = 0.0,
    dihedral_augment: bool = False,
    stain_norm: str | None = None,
    stain_reference: dict[str, Any] | None = None,
    context_um: float | Literal["auto"] | None = None,
) -> dict[str, Any]:
    """Embed ``sample`` when its table has no ``obsm[embedding_key]``; return the embedding record.

    A table that already carries embeddings keeps them; their record (encoder, patch size) is
    returned, or a record marked ``"unknown"`` when they did not come from :func:`hespotex.pp.embed`.
    """
    table = get_table(sample)
    if embedding_key not in table.obsm:
        if not hasattr(sample, "images"):
            msg = (
                f"This AnnData has no image embeddings in obsm[{embedding_key!r}] and no image to compute them. "
                "Pass the SpatialData sample, or run `hx.pp.embed` on it first."
            )
            raise KeyError(msg)
        from hespotex.pp._embed import embed

        embed(
            sample,
            encoder=encoder if encoder is not None else DEFAULT_ENCODER,
            weights=weights,
            layers=layers,
            patch_um=patch_um,
            input_size=input_size,
            seed=encoder_seed,
            key_added=embedding_key,
            tta=tta,
            stain_augment=stain_augment,
            scale_augment=scale_augment if stain_augment else 0.0,
            dihedral_augment=dihedral_augment and bool(stain_augment),
            stain_norm=stain_norm,
            stain_reference=stain_reference,
            context_um=context_um,
        )
    record = table.uns.get(EMBED_KEY, {}).get(embedding_key)
    if record is None:
        logger.warning(
            "obsm[%r] has no record of its encoder; the model cannot check later slides against it.", embedding_key
        )
        return {"encoder": "unknown", "encoder_id": "unknown", "key": embedding_key}
    return {**dict(record), "key": embedding_key}


DEFAULT_STAIN_VIEWS = 4


def same_embedding(a: dict[str, Any], b: dict[str, Any]) -> bool:
    from hespotex.pp._stain_norm import same_stain

    return (
        a.get("encoder_id") == b.get("encoder_id")
        and np.isclose(a.get("patch_um", 0.0), b.get("patch_um", 0.0))
        and a.get("tta") == b.get("tta")
        and same_stain(a.get("stain_norm"), b.get("stain_norm"))
        and same_context(a, b)
    )


def spot_geometry(tables: Sequence[Any]) -> dict[str, float]:
    """Median spot diameter, centre-to-centre spacing (nearest neighbour) and scan resolution of the training tables."""
    from scipy.spatial import cKDTree

    from hespotex._sample import get_sample_info, spot_centres_um

    diameters, spacings, mpps = [], [], []
    for table in tables:
        info = get_sample_info(table)
        diameters.append(info.spot_diameter_um)
        mpps.append(info.microns_per_pixel)
        xy = spot_centres_um(table)
        if len(xy) > 1:
            spacings.append(float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])))
    return {
        "spot_diameter_um": float(np.median(diameters)),
        "spacing_um": float(np.median(spacings)) if spacings else float("nan"),
        "microns_per_pixel": float(np.median(mpps)),
    }


def split_validation(names: list[str], validation: Any, *, seed: int) -> tuple[list[str], float | None]:
    """Whole validation samples and/or a spatial-block fraction, from the ``validation`` argument."""
    if validation is None:
        return [], None
    if isinstance(validation, str) and validation == "auto":
        if len(names) >= 3:
            return [names[int(np.random.default_rng(seed).integers(len(names)))]], None
        return [], 0.2
    if isinstance(validation, float):
        return [], validation
    if isinstance(validation, str):
        validation = [validation]
    held = [str(v) for v in validation]
    unknown = [v for v in held if v not in names]
    if unknown:
        msg = f"Validation samples {unknown} are not among the training samples {names}."
        raise ValueError(msg)
    if len(held) == len(names):
        msg = "Every sample is held out for validation; keep at least one for training."
        raise ValueError(msg)
    return held, None


def resolve_ensemble(ensemble: Any, samples: Any, validation: Any) -> int:
    """Members per held-out sample :func:`train` trains (0: one model). ``"auto"``: an ensemble of
    :data:`~hespotex.tl.model._ensemble.DEFAULT_MEMBERS_PER_SAMPLE` when there are 3 or more samples and
    ``validation="auto"``; ``True`` that many; an integer that many; ``False`` none."""
    from hespotex.tl.model._ensemble import DEFAULT_MEMBERS_PER_SAMPLE

    if isinstance(ensemble, str) and ensemble == "auto":
        auto_validation = isinstance(validation, str) and validation == "auto"
        return DEFAULT_MEMBERS_PER_SAMPLE if auto_validation and len(as_sample_dict(samples)) >= 3 else 0
    if isinstance(ensemble, bool | np.bool_):
        return DEFAULT_MEMBERS_PER_SAMPLE if ensemble else 0
    if isinstance(ensemble, int | np.integer) and ensemble >= 1:
        return int(ensemble)
    msg = (
        "Expected `ensemble` to be 'auto', True, False or the number of members per held-out sample (1 or more); "
        f"found {ensemble!r}."
    )
    raise ValueError(msg)


@renamed_arguments("tl.train")
def train(
    samples: Any,
    *,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 1000,
    flavor: str = "seurat_v3",
    encoder: Any = None,
    weights: str | Path | None = None,
    patch_um: float | None = None,
    config: Any = "hespotex",
    validation: Any = "auto",
    seed: int = 0,
    device: str | None = "auto",
    use_rep: str = EMBEDDING_KEY,
    target_sum: float = 1e4,
    target_norm: str = "library_modelled",
    embedding_norm: str = "training",
    max_nodes: int = 20_000,
    strategy: Literal["single", "ddp"] = "single",
    n_processes: int = 2,
    backend: Literal["gloo", "nccl"] | None = None,
    ensemble: bool | int | Literal["auto"] = "auto",
    stain_augment: bool | None = None,
    stain_norm: str | None = None,
    context_um: float | Literal["auto"] | None = "auto",
    lazy: bool | None = None,
    tta: bool | None = None,
) -> HESpotEx | HESpotExEnsemble:
    """Train HESpotEx on samples with spatial transcriptomics.

    All samples are trained jointly (their spot graphs side by side in each batch). Genes,
    embedding standardisation and early stopping are fitted on these samples only; never pass
    the samples you will test on.

    Parameters
    ----------
    samples
        A SpatialData sample, a list or ``{name: sample}`` mapping of them, or AnnData tables that
        already carry embeddings in ``obsm[use_rep]``. Samples without embeddings are
        embedded with ``encoder`` first (written to their ``obsm``; see :func:`hespotex.pp.embed`).
    genes
        Genes to predict; by default the ``n_top_genes`` chosen by ``flavor`` on these samples
        (see :func:`hespotex.pp.select_genes`).
    n_top_genes, flavor
        Gene selection when ``genes`` is not given.
    encoder, weights, patch_um
        Image encoder and spot patch size for samples not embedded yet (default encoder:
        ``"efficientnet_lite0.imagenet.multilayer"``; default patch: the spot diameter, or a pathology encoder's
        input at its native µm/px; see :func:`hespotex.pp.embed`). The context patch follows it (``context_um``).
    config
        :class:`hespotex.models.ModelConfig`, a preset name (``"hespotex"``, ``"paper"``) or a dict.
    validation
        Early-stopping split, never a test sample: ``"auto"`` holds out one whole sample (seeded)
        when there are 3 or more, else a spatial block of 20 % of each sample; a list of sample
        names; a float fraction for spatial blocks; ``None`` for none (train all epochs).
    seed
        Seed of initialisation, batching and the validation choice. An ensemble's members each train with their
        own seed derived from it and the samples the member trains on (numpy ``SeedSequence``), so they start from
        different weights; the ensemble records this one (``ensemble.seed``, ``ensemble.json``, a prediction's
        ``params["seed"]``).
    device
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``...
    use_rep
        ``obsm`` key of the image embeddings.
    target_sum
        Counts per spot after library scaling (``target_norm`` ``"library_*"``).
    target_norm
        How counts become the targets the model learns and predicts (recorded in the model and in
        every prediction's ``uns``): ``"library_modelled"`` (default), log1p(counts per
        ``target_sum``) with the library over the modelled ``genes`` only, which transfers best to
        shallow sections of new patients (``benchmarks/results/shift.md``); ``"library_all"``, the
        library over all genes of the table; ``"log1p_counts"``, log1p of raw counts (HEST-Benchmark). See
        :mod:`hespotex.pp._targets`.
    embedding_norm
        Standardisation of a new slide's embeddings at prediction: ``"training"`` (the training
        spots' statistics) or ``"slide"`` (the slide's own, from its image only; more robust to stain
        and scanner shifts, see :mod:`hespotex.pp._stain`). Recorded in the model.
    max_nodes
        Spots per training batch (per process with ``strategy="ddp"``); larger samples are cut into
        spatial blocks.
    strategy
        ``"single"``: train in this process. ``"ddp"``: data-parallel training with
        ``torch.distributed`` and ``DistributedDataParallel``: ``n_processes`` worker processes
        are spawned (meeting at ``MASTER_ADDR``/``MASTER_PORT`` when set, else ``127.0.0.1`` and a
        free port); each epoch every process trains on its own disjoint share of the spatial
        blocks, gradients are averaged across processes, validation is split between them and
        early stopping is decided on the combined score. Both stages (autoencoder pre-training
        and the joint stage) run data-parallel. Under ``torchrun`` (``RANK`` and ``WORLD_SIZE``
        set) nothing is spawned: every launched process is one rank and returns the trained model.
        Each process builds its spot graphs from all the samples; on CPU each uses
        ``cpu_count // n_processes`` threads at most (``hx.settings.num_threads`` when set).
        Workers are fresh Python processes (a few seconds to start): in a script, call ``train``
        under ``if __name__ == "__main__":``. A failing worker stops the others and its traceback
        is raised here as a ``RuntimeError``.
    n_processes
        Processes for ``strategy="ddp"`` (one per GPU with nccl); ignored otherwise.
    backend
        ``torch.distributed`` backend: by default ``"nccl"`` on CUDA, ``"gloo"`` on CPU.
    ensemble
        ``"auto"`` (default): an ensemble when there are 3 or more samples and ``validation="auto"``, else
        one model. ``True``: an ensemble (3 or more samples): 2 members per sample held out for early stopping (every
        sample trains all members but those holding it out, and early stopping stays honest), returned as one
        :class:`hespotex.tl.HESpotExEnsemble`: predictions average the members and store their spread as
        ``layers[f"{key_added}_spread"]``; ``validation`` must stay ``"auto"``. An integer ``k``: ``k`` members per
        held-out sample (``1``: one each). ``False``: one model. By default every member takes one autoencoder
        pre-trained on all the samples' expression (``config.ae_samples="all"``, ``config.ae_seed``) and members differ
        in the image stream's samples, initialisation and batches; with ``ae_samples="training"`` each held-out sample's
        members share an autoencoder of their training samples, the first one's. Why the default
        (``benchmarks/results/shift_defaults.md`` and ``shift_smooth.md``, sections of new patients, 3 seeds): one
        member per sample scored about +0.01 mean Pearson over single models, members with their own seeds another
        +0.005, two per sample a further +0.003 (all genes) / +0.004 (top-50) and a seed spread of at most 0.011 (was
        0.014), at 1.15 times the training time of one per sample from an empty cache (the shared autoencoders are
        pre-trained once); in ``benchmarks/her2st_cv.py``, whose folds already share autoencoders, 1.45 times the
        ensembles' fitting and 1.17 times the whole run (``benchmarks/results/her2st_cv.md`` vs
        ``her2st_cv_ensemble1.md``); the 8 members on one autoencoder since then train in 0.67 times the time of 8 on 4
        with the same scores (``shared_autoencoder_time.md``). Prediction runs every member on the same embeddings.
    stain_augment
        Train on stain-augmented views: every training spot, each epoch, is seen through one
        embedding drawn among its clean one and its views ``obsm[f"{use_rep}_stain_views"]``
        (made once by :func:`hespotex.pp.embed` ``(..., stain_augment=4)``; samples embedded here
        get 4 views, each also cut with its field of view scaled by up to ±15 %, ``scale_augment=0.15``, and
        flipped / turned, ``dihedral_augment=True``: +0.0023 and +0.0012 mean Pearson over the 24 cells of the
        shift benchmark, ``shift_zoom.md``). Early stopping scores clean embeddings; prediction is unchanged.
        Recorded as ``model.stain_augment`` (and in ``setup.json``). ``None`` (default): on when every sample is
        embedded here or already carries views, off when some sample was embedded beforehand without
        them. It makes models robust to stain shifts (``benchmarks/results/shift_stain.md``, single
        models, 3 seeds: +0.069 / +0.096 mean Pearson (all modelled / top-50 genes) on re-stained
        sections, +0.006 / +0.003 on clean ones) at the cost of 5 times the encoder work on the training
        slides (once; cached with the embeddings).
    stain_norm
        ``"macenko"``: samples embedded here are stain-normalised (:mod:`hespotex.pp._stain_norm`) to a
        reference fitted on these samples (:func:`hespotex.pp.stain_reference`); samples already
        embedded must have been normalised (they lend their reference). The reference is part of
        ``model.embedding`` (and ``setup.json``); :func:`hespotex.tl.predict` maps every new slide to it.
        ``None``: whatever the embeddings were made with (recorded all the same). Not the default: on
        the shift benchmark it lost 0.026 / 0.031 on re-stained sections (``shift_stain.md``).
    context_um
        Two-scale embeddings (as TRIPLEX; see :func:`hespotex.pp.embed`): samples embedded here get the spot patch
        and a context patch centred on it, both through the same encoder, features concatenated (twice the
        encoder's width). ``"auto"`` (default): a context patch twice the spot patch as resolved (``patch_um``, by
        default the spot diameter: 200 µm around 100 µm ST / Visium spots; ``patch_um=55`` gives 110). Samples that
        already carry ``obsm[use_rep]`` keep their embeddings, single- or two-scale, and are never re-embedded;
        samples embedded here then follow them (:func:`hespotex.pp._context.default_context_um`), so a set
        embedded beforehand at one scale trains at one scale. A number: the context patch side in µm (wider than
        the spot patch). ``None``: single-scale embeddings (the spot patch only). Every sample must end up with
        the same scales. Recorded as ``model.embedding["context_um"]`` (``None``: single scale);
        :func:`hespotex.tl.predict` (in memory, streamed, per cohort slide) embeds new slides at the same scales.
        Cost: two encoder passes per spot (and per stain view, ``stain_augment``; each scale cached on its own)
        and twice the embedding width, at training and at prediction. Why the default: on sections of new
        patients (``benchmarks/results/shift_context.md``: her2st folds C2-C6, single models, 3 seeds) a 200 µm
        context around 100 µm spots scored +0.016 / +0.027 mean Pearson (all modelled / top-50 HVG genes) over
        the spot patch alone, more on re-stained sections (+0.037 / +0.051).
    lazy
        Train from embeddings on disk, streaming: ``obsm[use_rep]`` (and the stain views) may be a zarr
        array or a dask array (``table.obsm[use_rep] = dask.array.from_zarr(path)``, or a table read back
        lazily) and is never read whole. The standardisation statistics are computed chunk by chunk, each
        spatial block's rows are read and standardised when its batch is used, and the targets are kept
        sparse and densified per batch, so memory is bounded by ``max_nodes`` rather than the section
        (a 600,000-bin Visium HD section trains under 4 GB, ``benchmarks/results/visium_hd_train.md``).
        The model equals the in-memory one for the same seed up to float32 rounding of the statistics.
        ``None`` (default): lazy when some training table's ``obsm[use_rep]`` is not an in-memory numpy
        array (zarr, dask, ``numpy.memmap``); ``True`` also streams in-memory embeddings (no standardised
        copy); ``False`` reads lazy embeddings into memory first.
    tta
        Test-time augmentation of the embeddings (see :func:`hespotex.pp.embed`): ``True``: samples embedded
        here are embedded in the 8 flips/rotations of each patch, averaged; samples already embedded must have
        been (``hx.pp.embed(..., tta=True)``). ``False``: plain embeddings, the same check. ``None`` (default):
        samples embedded here get plain embeddings, samples already embedded keep theirs. Recorded as
        ``model.embedding["tta"]`` (``"dihedral8"`` or ``None``, in ``setup.json``): :func:`hespotex.tl.predict`
        embeds new slides the same way and refuses embeddings made otherwise. Costs 8 times the encoder work.

    Returns
    -------
    The trained :class:`HESpotEx`, or :class:`~hespotex.tl.HESpotExEnsemble` (see ``ensemble``), used the same
    way by every function taking a model; ``model.train_strategy_`` records the strategy, world size,
    backend and, for ``"ddp"``, each rank's shard of the first epoch and a fingerprint of its final
    weights (identical on all ranks). Samples gain ``obsm[use_rep]`` (two-scale by default: twice the encoder's
    features) and its record if they lacked it; nothing else in them changes.
    """
    from hespotex.models._net import resolve_config
    from hespotex.pp._genes import select_genes
    from hespotex.pp._stain import check_embedding_norm
    from hespotex.pp._targets import check_target_norm
    from hespotex.tl.training._distributed import check_strategy

    check_strategy(strategy, n_processes, backend)
    check_target_norm(target_norm)
    check_train_context_um(context_um)
    per_sample = resolve_ensemble(ensemble, samples, validation)
    if per_sample:
        from hespotex.tl.model._ensemble import train_ensemble

        if not (isinstance(validation, str) and validation == "auto"):
            msg = (
                f"ensemble={ensemble!r} holds out each sample in turn for early stopping; leave validation='auto' "
                f"(found {validation!r})."
            )
            raise ValueError(msg)
        return train_ensemble(
            samples, fit=train, genes=genes, n_top_genes=n_top_genes, flavor=flavor, encoder=encoder, weights=weights,
            patch_um=patch_um,
            config=config, seed=seed, per_sample=per_sample, device=device, use_rep=use_rep, target_sum=target_sum,
            target_norm=target_norm,
            embedding_norm=embedding_norm, max_nodes=max_nodes, strategy=strategy, n_processes=n_processes,
            backend=backend,
            stain_augment=stain_augment, stain_norm=stain_norm, context_um=context_um, lazy=lazy, tta=tta,
        )  # fmt: skip
    check_embedding_norm(embedding_norm)

    named = as_sample_dict(samples)
    names = list(named)
    if stain_augment is None:
        from hespotex.pp._stain_augment import default_stain_augment

        stain_augment = default_stain_augment(named, use_rep)
    if isinstance(context_um, str) and context_um == "auto":
        context_um = default_context_um(named, use_rep)
    if tta is not None:
        check_tta(named, use_rep, tta)
    reference = None
    if stain_norm is not None:
        from hespotex.pp._stain_norm import training_reference

        reference = training_reference(named, use_rep, stain_norm, patch_um=patch_um)
    records = {
        n: ensure_embeddings(
            s, embedding_key=use_rep, encoder=encoder, weights=weights, patch_um=patch_um,
            stain_augment=DEFAULT_STAIN_VIEWS if stain_augment else 0, scale_augment=DEFAULT_SCALE_AUGMENT,
            dihedral_augment=DEFAULT_DIHEDRAL_AUGMENT, stain_norm=stain_norm, stain_reference=reference,
            context_um=context_um, tta=bool(tta),
        )
        for n, s in named.items()
    }  # fmt: skip
    first = records[names[0]]
    from hespotex.pp._stain_norm import stain_text

    for n, r in records.items():
        if not same_embedding(first, r):
            msg = (
                f"Samples were embedded differently: {names[0]!r} with {first.get('encoder_id')} at "
                f"{scales_text(first)}, "
                f"{n!r} with {r.get('encoder_id')} at {scales_text(r)}"
                + "".join(f" ({stain_text(x.get('stain_norm'))})" for x in (first, r))
                + ". Re-embed them with one encoder, patch size (and context_um) and stain normalisation."
            )
            raise ValueError(msg)
    tables = {n: get_table(s) for n, s in named.items()}
    cfg = resolve_config(config)
    k = max(cfg.ae_neighbors, cfg.decoder_neighbors)
    for n, t in tables.items():  # before gene selection: scanpy's seurat_v3 crashes on tiny samples
        if t.n_obs < k + 1:
            msg = (
                f"Sample {n!r} has {t.n_obs} spots, too few for the {k}-neighbour graphs. Drop it or lower the "
                "config's neighbours."
            )
            raise ValueError(msg)
    held, fraction = split_validation(names, validation, seed=seed)
    fit_names = [n for n in names if n not in held]
    if genes is None:
        genes = select_genes([tables[n] for n in names], n_top_genes=n_top_genes, flavor=flavor, key_added=None)
        selection = {"flavor": flavor, "n_top": n_top_genes, "fitted_on": names}
    else:
        genes = select_genes([tables[n] for n in names], genes=genes, key_added=None)
        selection = {"flavor": "given", "n_top": len(genes), "fitted_on": names}
    lazy = resolve_lazy(lazy, tables, use_rep)
    data = {
        n: graph_data(
            tables[n], n, genes=genes, embedding_key=use_rep, target_sum=target_sum, target_norm=target_norm, lazy=lazy
        )
        for n in names
    }
    stain = stain_views(tables, records, use_rep) if stain_augment else None
    if stain is not None:
        for n, d in data.items():
            views = tables[n].obsm[stain["key"]]
            d.views = lazy_views(tables[n], stain["key"]) if lazy else np.asarray(views, dtype=np.float32)
    train_parts: list[GraphData] = []
    val_parts: list[tuple[GraphData, np.ndarray]] = []
    for n in fit_names:
        if fraction is None:
            train_parts.append(data[n])
        else:
            mask = spatial_block_mask(data[n].coords_um, fraction, seed=seed)
            train_parts.append(data[n].subset(~mask))
            val_parts.append((data[n], mask))
    val_parts += [(data[n], np.ones(data[n].n, dtype=bool)) for n in held]
    model = HESpotEx(
        genes, embedding=first, config=cfg.replace(seed=seed), target_sum=target_sum, target_norm=target_norm,
        gene_selection=selection,
        spot_geometry=spot_geometry(list(tables.values())), embedding_norm=embedding_norm, stain_augment=stain,
    )  # fmt: skip
    model.train_samples_ = fit_names
    model.validation_ = {"samples": held, "block_fraction": fraction, "metric": "mean per-gene Pearson"}
    logger.info(
        "Training HESpotEx on %d spots of %s (%d genes); validation: %s.",
        sum(p.n for p in train_parts), fit_names, len(genes),
        held or (f"{fraction:.0%} spatial block" if fraction else "none"),
    )  # fmt: skip
    return model.fit(
        train_parts, validation=val_parts, device=device, max_nodes=max_nodes, seed=seed,
        strategy=strategy, n_processes=n_processes, backend=backend,
        autoencoder_data=[data[n] for n in names] if cfg.ae_samples == "all" and val_parts else None,
    )  # fmt: skip
