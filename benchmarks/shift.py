"""Shift benchmark: how hespotex and tuned baselines transfer to sections that differ like new patients do.

Leave-one-section-out on her2st C2-C6 with the 785-gene panel as the modelled genes. The held-out
section is scored as it is (``clean``) and under three emulated shifts:

- ``thinned``: its counts binomially thinned to about 650 counts per spot (the depth of a section of
  another her2st patient); the truth is computed from the thinned counts, the image is unchanged;
- ``restained``: its H&E image perturbed in HED colour space (per-channel gain and shift,
  :func:`skimage.color.rgb2hed` / :func:`~skimage.color.hed2rgb`), slightly blurred (Gaussian,
  radius 1.5 px) and JPEG-recompressed (quality 40), then re-embedded;
- ``rescaled``: its µm/px given 10 % too large, so patches are cut 10 % too small (re-embedded).

Every method is scored under three truths: log1p CP10k with the library over all genes
(``lib_all``), with the library over the scored (modelled) genes (``lib_scored``), and
HEST-Benchmark's log1p of raw counts (``log1p_raw``); mean per-gene Pearson over the top-50 HVG
(ranked on the training sections) and over all modelled genes; mean over folds, and over seeds
with the spread (max - min of the seed means).

Methods: hespotex single models and their ensembles (one member per held-out validation section),
and ridge / retrieval baselines with α and k tuned by leave-one-training-section-out on the training
sections, fitted to the same targets as the model, raw and spatially smoothed (6 nearest spots).

    python benchmarks/shift.py embed            # embeddings per (section, condition, patch size), cached
    python benchmarks/shift.py run --grid select --seeds 0
    python benchmarks/shift.py run --grid final --seeds 0 1 2
    python benchmarks/shift.py report
    python benchmarks/shift.py embed --stain-views --patch 100   # 4 stain-augmented views per clean section
    python benchmarks/shift.py run --setting "{..., 'stain_augment': True}" --what hespotex --seeds 0
    python benchmarks/shift.py stain-report   # -> benchmarks/results/shift_stainaug.md (its own file)

Work files (embeddings, per-task rows) go to ``--work`` (default /tmp/hespotex_shift); each task
writes its rows when it finishes, so a rerun skips finished tasks. ``embed --encoder NAME`` (default: the library's
default encoder) writes the encoder's name to ``work/encoder.txt`` and refuses a folder embedded with another one;
every later stage reads it there (a folder without the file holds ``efficientnet_lite0.imagenet`` embeddings, the
default encoder until session 17; its rows are in ``benchmarks/results/shift_rows``, the multi-layer default's in
``benchmarks/results/shift_rows_multilayer``).
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hespotex.pp._encoder_base import DEFAULT_ENCODER

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HEAD_ENCODER = "efficientnet_lite0.imagenet"  # what a work folder without encoder.txt was embedded with
CONDITIONS = ("clean", "thinned", "restained", "rescaled")
IMAGE_CONDITION = {"clean": "clean", "thinned": "clean", "restained": "restained", "rescaled": "rescaled"}
TRUTHS = ("lib_all", "lib_scored", "log1p_raw")
THIN_TARGET = 650.0
SMOOTH_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # weights the spot keeps, --grid smooth_weights (a diagnostic)
RESCALE = 1.10
# ModelConfig overrides a run can name (``config`` in a setting; methods ``...+<name>``): widths of the ensembles'
# members (benchmarks/shift_members.py); head1024 is the default since 2026-12-03 (its rows keep the name)
CONFIGS = {  # every field that differs between the library defaults of the runs' sessions is pinned
    "narrow": {"projection_hidden_dim": 256, "head_hidden_dim": 256, "ae_samples": "training"},
    "head1024": {"head_hidden_dim": 1024, "ae_samples": "training"},  # the default in session 15
    "head2048": {"head_hidden_dim": 2048, "ae_samples": "training"},
    "aeall": {"head_hidden_dim": 1024, "ae_samples": "all"},  # the default since session 16 (2026-12-03)
}


def default_config_name() -> str | None:
    """The name in :data:`CONFIGS` of the library's own member config (``aeall`` since session 16): hespotex runs at
    the default take it, so their rows never share names (or files) with the rows of earlier defaults (the 512-wide
    ones carry no name)."""
    from hespotex.models import ModelConfig

    default = ModelConfig.preset("hespotex")
    return next((name for name, over in CONFIGS.items() if default.replace(**over) == default), None)


def smooth_label(weight: float) -> str:
    """Method suffix of a prediction smoothed with the spot at ``weight``: ``+smooth50`` for 0.5."""
    return f"+smooth{round(100 * weight)}"


# ----------------------------------------------------------------------------- data and conditions
def restain_image(rgb: np.ndarray, seed: int) -> np.ndarray:
    """HED gain/shift per channel (seeded), Gaussian blur, JPEG quality 40; uint8 in, uint8 out."""
    from PIL import Image, ImageFilter
    from skimage.color import hed2rgb, rgb2hed

    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.75, 1.25, size=3)
    shift = rng.uniform(-0.03, 0.03, size=3)
    out = np.empty_like(rgb)
    for start in range(0, rgb.shape[0], 1024):  # strips: a float64 copy of the whole slide is 2 GB
        hed = rgb2hed(rgb[start : start + 1024])
        hed = hed * gain + shift
        out[start : start + 1024] = np.clip(hed2rgb(hed) * 255 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius=1.5))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def load_section(sid: str, condition: str, data: str | None, work: Path):
    """The section as a sample, with the condition's image and µm/px (counts untouched here)."""
    import hespotex as hx
    from hespotex.datasets._her2st import her2st_path
    from hespotex.io import read_st

    cond = IMAGE_CONDITION[condition]
    root = her2st_path(data)
    image = root / "images" / f"{sid}.jpg"
    if cond == "restained":
        image = work / "images" / f"{sid}_restained.png"
        if not image.is_file():
            from PIL import Image

            image.parent.mkdir(parents=True, exist_ok=True)
            rgb = np.asarray(Image.open(root / "images" / f"{sid}.jpg").convert("RGB"))
            Image.fromarray(restain_image(rgb, seed=int(sid[1:]))).save(image, compress_level=1)
    sdata = read_st(
        root / "counts" / f"{sid}.tsv.gz", root / "spots" / f"{sid}_selection.tsv", image, sample_id=sid, join="inner"
    )
    if cond == "rescaled":
        info = sdata.tables["table"].uns["hespotex_sample"]
        info["microns_per_pixel"] = float(info["microns_per_pixel"]) * RESCALE
    del hx
    return sdata


def work_encoder(work: str | Path) -> str:
    """The encoder a work folder's embeddings come from (``work/encoder.txt``; :data:`HEAD_ENCODER` without it)."""
    marker = Path(work) / "encoder.txt"
    return marker.read_text().strip() if marker.is_file() else HEAD_ENCODER


def claim_work(work: str | Path, encoder: str) -> None:
    """Record ``encoder`` as the work folder's, or refuse a folder that holds another encoder's embeddings."""
    work = Path(work)
    found = work_encoder(work)
    if (work / "encoder.txt").is_file() or (work / "emb").is_dir():
        if found != encoder:
            msg = f"{work} holds embeddings of {found!r}, not {encoder!r}: pass another --work for this encoder."
            raise ValueError(msg)
        return
    work.mkdir(parents=True, exist_ok=True)
    (work / "encoder.txt").write_text(encoder + "\n")


def embedding_path(work: Path, sid: str, condition: str, patch_um: float, tta: bool) -> Path:
    return work / "emb" / f"{sid}_{IMAGE_CONDITION[condition]}_{patch_um:g}{'_tta' if tta else ''}.npy"


def embed_one(sid: str, condition: str, patch_um: float, tta: bool, data: str | None, work: str) -> str:
    """Embed one (section, image condition, patch size) once; the array goes to ``work/emb``."""
    import hespotex as hx

    hx.settings.progress = False
    hx.settings.num_threads = 1
    work = Path(work)
    path = embedding_path(work, sid, condition, patch_um, tta)
    if path.is_file():
        return str(path)
    import dask

    t0 = time.perf_counter()
    sdata = load_section(sid, condition, data, work)
    with dask.config.set(
        scheduler="synchronous"
    ):  # inside a dask worker: do not send image reads to the (busy) cluster
        hx.pp.embed(sdata, encoder=work_encoder(work), patch_um=patch_um, tta=tta, key_added="X", cache=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, sdata.tables["table"].obsm["X"])
    os.replace(tmp, path)
    (path.with_suffix(".seconds")).write_text(f"{time.perf_counter() - t0:.1f}")
    return str(path)


STAIN_VIEWS = 4


def views_tag(scale_augment: float = 0.0, dihedral: bool = False) -> str:
    """What the views' file names and rows say about their options: ``_zoom<A>``, ``_dihedral``."""
    return (f"_zoom{scale_augment:g}" if scale_augment else "") + ("_dihedral" if dihedral else "")


def views_path(
    work: Path, sid: str, patch_um: float, tta: bool = False, scale_augment: float = 0.0, dihedral: bool = False
) -> Path:
    tag = views_tag(scale_augment, dihedral)
    return work / "emb" / f"{sid}_clean_{patch_um:g}_stainviews{STAIN_VIEWS}{tag}{'_tta' if tta else ''}.npy"


def embed_views(
    sid: str,
    patch_um: float,
    data: str | None,
    work: str,
    tta: bool = False,
    scale_augment: float = 0.0,
    dihedral: bool = False,
) -> str:
    """Embed the clean section with ``hx.pp.embed(..., stain_augment=STAIN_VIEWS, tta=tta, scale_augment=...,
    dihedral_augment=dihedral)`` (with ``tta`` every view is the mean over its 8 dihedral turns, as the library
    computes them); the views go to ``work/emb``."""
    import dask

    import hespotex as hx
    from hespotex.pp._stain_augment import views_key

    hx.settings.progress = False
    hx.settings.num_threads = 1
    work = Path(work)
    path = views_path(work, sid, patch_um, tta, scale_augment, dihedral)
    if path.is_file():
        return str(path)
    t0 = time.perf_counter()
    sdata = load_section(sid, "clean", data, work)
    with dask.config.set(scheduler="synchronous"):
        hx.pp.embed(
            sdata,
            encoder=work_encoder(work),
            patch_um=patch_um,
            stain_augment=STAIN_VIEWS,
            scale_augment=scale_augment,
            dihedral_augment=dihedral,
            tta=tta,
            key_added="X",
            cache=False,
        )
    table = sdata.tables["table"]
    clean = np.load(embedding_path(work, sid, "clean", patch_um, tta))
    if not np.allclose(clean, table.obsm["X"], atol=1e-4):  # the clean embedding must not change with the option
        msg = f"{sid}: the clean embedding computed with stain_augment differs from the cached one."
        raise RuntimeError(msg)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, table.obsm[views_key("X")])
    os.replace(tmp, path)
    (path.with_suffix(".seconds")).write_text(f"{time.perf_counter() - t0:.1f}")
    return str(path)


def run_parallel(fn, tasks: list[dict], workers: int) -> list:
    from dask.distributed import Client

    from hespotex._cluster import local_cluster

    with (
        local_cluster(workers) as cluster,
        Client(cluster) as client,
    ):
        futures = [client.submit(fn, **t, pure=False) for t in tasks]
        return client.gather(futures)


def cmd_embed(args) -> None:
    from hespotex.datasets._her2st import her2st_sections

    sections = her2st_sections(args.data)
    claim_work(args.work, args.encoder)
    tasks = [
        {"sid": s, "condition": c, "patch_um": p, "tta": t, "data": args.data, "work": args.work}
        for p in args.patch for t in args.tta for c in ("clean", "restained", "rescaled") for s in sections
    ]  # fmt: skip
    t0 = time.perf_counter()
    if args.stain_views:
        tasks = [
            {"sid": s, "patch_um": p, "tta": t, "data": args.data, "work": args.work, "scale_augment": zoom,
             "dihedral": args.dihedral}
            for p in args.patch for t in args.tta for s in sections for zoom in [args.scale_augment]
        ]  # fmt: skip
        run_parallel(embed_views, tasks, args.workers)
    else:
        run_parallel(embed_one, tasks, args.workers)
    print(f"{len(tasks)} embeddings in {(time.perf_counter() - t0) / 60:.1f} min")


# ----------------------------------------------------------------------------- training and scoring
_TABLES: dict = {}


def tables(data: str | None) -> dict:
    """Every section's table (counts, spots, µm/px), read once per process."""
    if not _TABLES:
        from hespotex.datasets._her2st import her2st_path, her2st_sections
        from hespotex.io import read_st

        root = her2st_path(data)
        for sid in her2st_sections(data):
            sdata = read_st(
                root / "counts" / f"{sid}.tsv.gz",
                root / "spots" / f"{sid}_selection.tsv",
                None,
                sample_id=sid,
                join="inner",
            )
            _TABLES[sid] = sdata.tables["table"]
    return _TABLES


def panel_genes(data: str | None) -> list[str]:
    import hespotex as hx
    from hespotex.pp._genes import shared_genes

    present = set(shared_genes(list(tables(data).values())))
    return [g for g in hx.datasets.her2st_genes(data) if g in present]


def thinned_counts(table, fold: str):
    """Binomial thinning of the section's counts to about THIN_TARGET counts per spot (fixed seed per section)."""
    import scipy.sparse as sp

    counts = sp.csr_matrix(table.X, dtype=np.int64)
    p = min(1.0, THIN_TARGET / float(np.median(np.asarray(counts.sum(axis=1)).ravel())))
    rng = np.random.default_rng(1000 + int(fold[1:]))
    out = counts.copy()
    out.data = rng.binomial(out.data, p)
    out.eliminate_zeros()
    return out


def truths(counts, idx: np.ndarray) -> dict[str, np.ndarray]:
    from hespotex.pp._targets import normalize_counts

    return {
        "lib_all": normalize_counts(counts, idx, target_norm="library_all"),
        "lib_scored": normalize_counts(counts, idx, target_norm="library_modelled"),
        "log1p_raw": normalize_counts(counts, idx, target_norm="log1p_counts"),
    }


def slide_standardised(emb: np.ndarray, model) -> np.ndarray:
    """Per-slide standardisation: the slide's own mean and (floored) scale replace the training ones."""
    from hespotex.tl.model._data import embedding_scale

    return ((emb - emb.mean(axis=0)) / embedding_scale(emb) * model.embedding_scale_ + model.embedding_mean_).astype(
        np.float32
    )


def score_rows(pred: np.ndarray, truth: dict[str, np.ndarray], hvg: np.ndarray, **labels) -> list[dict]:
    from hespotex.tl.evaluation._metrics import pearson_per_gene

    rows = []
    for name, y in truth.items():
        r = pearson_per_gene(y, pred)
        r = np.where(np.isfinite(r), r, np.nan)
        rows.append({**labels, "truth": name, "genes": "top50_hvg", "pearson": float(np.nanmean(r[hvg]))})
        rows.append({**labels, "truth": name, "genes": "all_modelled", "pearson": float(np.nanmean(r))})
    return rows


def spread_vs_error(stack: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """How what the members' predictions ``stack`` (members x spots x genes) say of themselves ranks the errors of
    their mean on one slide, as Spearman correlations:

    - ``spread_spearman``: the spread (members' standard deviation) vs the absolute error over all spots x genes;
    - ``spread_spearman_within_gene``: the same per gene (over spots), mean over genes (which spots of a gene to
      trust);
    - over genes, a per-gene score vs the gene's Pearson with the truth (which genes to trust):
      ``..._gene_pearson`` its mean spread, ``..._gene_relative`` that over the standard deviation of its
      predicted mean across spots, ``..._gene_agreement`` the members' agreement
      (:func:`hespotex.tl.model._ensemble.member_agreement`), and ``..._gene_predicted_sd`` the standard
      deviation of its predicted mean across spots (a reference that needs no ensemble).
    """
    from scipy.stats import rankdata, spearmanr

    from hespotex.tl.evaluation._correlation import pearson_per_gene
    from hespotex.tl.model._ensemble import member_agreement

    pred, spread = stack.mean(axis=0), stack.std(axis=0)
    err = np.abs(pred - target)
    out = {"spread_spearman": float(spearmanr(spread.ravel(), err.ravel()).statistic)}
    out["spread_spearman_within_gene"] = float(
        np.nanmean(pearson_per_gene(rankdata(err, axis=0), rankdata(spread, axis=0)))
    )
    gene_r = pearson_per_gene(target, pred)
    sd = pred.std(axis=0)
    ok = np.isfinite(gene_r) & (sd > 0)
    per_gene = {
        "spread_spearman_gene_pearson": spread.mean(axis=0),
        "spread_spearman_gene_relative": spread.mean(axis=0) / np.where(ok, sd, 1.0),
        "spread_spearman_gene_agreement": member_agreement(stack),
        "spread_spearman_gene_predicted_sd": sd,
    }
    for name, score in per_gene.items():
        keep = ok & np.isfinite(score)
        out[name] = float(spearmanr(score[keep], gene_r[keep]).statistic)
    return out


def training_tables(
    work: Path,
    names: list[str],
    data: str | None,
    patch_um: float,
    *,
    tta: bool = False,
    stain_augment: bool = False,
    scale_augment: float = 0.0,
    dihedral: bool = False,
) -> dict:
    """Copies of the training sections' tables with their cached clean-image embeddings in ``obsm['X']`` (and, with
    ``stain_augment``, the stain-augmented views in ``obsm['X_stain_views']``), recorded as ``hx.pp.embed`` records
    them."""
    from hespotex.pp._embed import EMBED_KEY
    from hespotex.pp._stain_augment import stain_record

    all_tables = tables(data)
    out = {}
    for n in names:
        t = all_tables[n].copy()
        t.obsm["X"] = np.load(embedding_path(work, n, "clean", patch_um, tta))
        record = {"encoder": work_encoder(work), "encoder_id": work_encoder(work), "patch_um": patch_um}
        if tta:
            record["tta"] = "dihedral8"
        if stain_augment:
            t.obsm["X_stain_views"] = np.load(views_path(work, n, patch_um, tta, scale_augment, dihedral))
            record["stain_augment"] = stain_record(STAIN_VIEWS, 0, scale_augment, dihedral)
        t.uns[EMBED_KEY] = {"X": record}
        out[n] = t
    return out


def spot_um(test, condition: str) -> np.ndarray:
    """Spot centres of a held-out section in µm as a method sees them under ``condition`` (``rescaled``: with the
    µm/px given ``RESCALE`` off)."""
    mpp = float(test.uns["hespotex_sample"]["microns_per_pixel"]) * (RESCALE if condition == "rescaled" else 1.0)
    return np.asarray(test.obsm["spatial"], dtype=np.float64)[:, :2] * mpp


def run_task(
    fold: str,
    seed: int,
    target_norm: str,
    patch_um: float,
    tta: bool,
    what: str,
    data: str | None,
    work: str,
    stain_augment: bool = False,
    tta_predict: bool = False,
    distinct_seeds: bool = False,
    smooth_predict: bool = False,
    ae_epochs: int | None = None,
    rounds: int = 1,
    smooth_tuned: bool = False,
    shared_ae: bool = False,
    smooth_grid: bool = False,
    config: str | None = None,
    refit: bool = False,
    scale_augment: float = 0.0,
    dihedral: bool = False,
) -> str:
    """One held-out section, one seed and setting: hespotex members (``what="hespotex"``) or tuned baselines.

    ``tta_predict`` (with ``tta=False``): the members train on plain embeddings as usual but predict the held-out
    section from its TTA embeddings (methods ``...+ttapredict``; TTA at prediction time only). ``distinct_seeds``:
    each member trains with its own seed, ``member_seed`` as ``hx.tl.train``'s ensembles do (methods
    ``...+distinct``), instead of all with ``seed``. ``smooth_predict``: the ensemble's prediction is also scored
    spatially smoothed over the 6 nearest spots as the baselines' ``+smooth`` (methods ``...+smooth``: mean of the
    spot and its neighbours; ``...+smooth50``: the spot keeps weight 0.5). ``ae_epochs``: the members' autoencoder
    pre-training epochs instead of the default's (methods ``...+ae<epochs>``). ``rounds`` (with ``distinct_seeds``):
    that many members per held-out section, round ``r`` > 0 seeded ``member_seed(1_000_000 * r + seed, ...)``; the
    ensemble of all of them is scored as ``...+x<rounds>`` beside the first round's (the default's) members.
    ``shared_ae`` (with ``rounds``): the later rounds' members pre-train no autoencoder of their own but take the one
    of the first round's member holding out the same section (same training samples; ``ModelConfig.ae_seed``, as
    ``hx.tl.train(..., ensemble=rounds)`` does); methods ``...+x<rounds>shared``.
    ``smooth_grid`` (with ``rounds`` and ``smooth_predict``): the ensemble of every round also scored with the spot
    at the weights of :data:`SMOOTH_GRID` (methods ``...+smooth<percent>``): a diagnostic of how much the
    smoothing weight moves the scores, chosen on the held-out sections themselves, not a way to pick a default.
    ``smooth_tuned`` (baselines only): only the smoothed baselines, their smoothing weight chosen with α / k by the
    same leave-one-training-section-out (:data:`~hespotex.tl.training._tune.DEFAULT_SMOOTH_WEIGHTS`; methods
    ``...+smoothcv``). ``config`` (hespotex only): the members' :class:`~hespotex.models.ModelConfig` with the
    overrides :data:`CONFIGS` names (methods ``...+<config>``). With ``rounds`` > 2 the ensembles of the first 2, 3,
    ... rounds are scored too (``...+x2shared`` etc.), so one run gives every ensemble size. ``refit`` (hespotex,
    with ``distinct_seeds`` and ``smooth_predict``): after the first round, one more model per member trained on every
    training section (none held out) for the member's best epoch count, all of them on one autoencoder; scored
    smoothed with the spot at 0.5 as the first round's members with them (``...+refit``), alone (``...+refitonly``)
    and with every round's members (``...+x<rounds>shared+refit``). ``scale_augment`` (with ``stain_augment``): train
    on the views embedded with ``embed --stain-views --scale-augment A`` (their field of view also scaled; methods
    ``...+zoom<A>``); ``dihedral`` likewise, views of ``embed --stain-views --dihedral`` (methods ``...+dihedral``)."""
    import hespotex as hx
    from hespotex.models import ModelConfig
    from hespotex.pp._graph import knn_graph
    from hespotex.pp._targets import normalize_counts, raw_counts
    from hespotex.tl.evaluation._baselines import smooth
    from hespotex.tl.evaluation._evaluate import rank_genes
    from hespotex.tl.model._data import GraphData, graph_data
    from hespotex.tl.model._ensemble import member_seed
    from hespotex.tl.training._train import split_validation
    from hespotex.tl.training._tune import tune_baseline

    work = Path(work)
    if what != "baselines" and config is None:
        config = default_config_name()
    seed_part = f"_s{seed}" if what != "baselines" else ""
    sa = ("_stainaug" if stain_augment else "") + ("_ttapredict" if tta_predict else "")
    sa += ("_distinct" if distinct_seeds else "") + ("_smoothpredict" if smooth_predict else "")
    sa += f"_ae{ae_epochs}" if ae_epochs is not None else ""
    sa += f"_rounds{rounds}" if rounds > 1 else ""
    sa += "_smoothtuned" if smooth_tuned else ""
    sa += "_sharedae" if shared_ae else ""
    sa += "_smoothgrid" if smooth_grid else ""
    sa += f"_cfg{config}" if config is not None else ""
    sa += "_refit" if refit else ""
    sa += views_tag(scale_augment, dihedral)
    if (scale_augment or dihedral) and not (stain_augment and what != "baselines"):
        raise ValueError(
            "scale_augment / dihedral pick hespotex's stain views: they need stain_augment (not baselines)."
        )
    if config is not None and (what == "baselines" or config not in CONFIGS):
        raise ValueError(f"config names hespotex member overrides, one of {sorted(CONFIGS)}; found {config!r}.")
    if smooth_grid and not (rounds > 1 and smooth_predict):
        raise ValueError("smooth_grid scores every round's ensemble smoothed: it needs rounds > 1 and smooth_predict.")
    if refit and not (what == "hespotex" and distinct_seeds and smooth_predict):
        raise ValueError("refit adds models to hespotex's ensemble: it needs distinct_seeds and smooth_predict.")
    if shared_ae and rounds < 2:
        raise ValueError("shared_ae shares the first round's autoencoders with later rounds: it needs rounds > 1.")
    if smooth_tuned and what != "baselines":
        raise ValueError("smooth_tuned is a setting of the baselines (--what baselines).")
    if rounds > 1 and not distinct_seeds:
        raise ValueError("rounds > 1 needs distinct_seeds (members of one section would otherwise be identical).")
    ae_label = f"+ae{ae_epochs}" if ae_epochs is not None else ""
    ae_label += f"+{config}" if config is not None else ""
    ae_label += views_tag(scale_augment, dihedral).replace("_", "+")
    if tta_predict and (tta or what == "baselines"):
        raise ValueError("tta_predict is for hespotex trained on plain embeddings (tta=False).")
    if distinct_seeds and tta_predict:
        raise ValueError("distinct_seeds and tta_predict are separate runs: set one of them.")
    done = work / "rows" / f"{what}_{fold}{seed_part}_{target_norm}_{patch_um:g}{'_tta' if tta else ''}{sa}.csv.gz"
    if done.is_file():
        return str(done)
    hx.settings.progress = False
    hx.settings.num_threads = 1
    t0 = time.perf_counter()
    all_tables = tables(data)
    genes = panel_genes(data)
    train_names = [n for n in all_tables if n != fold]
    train = training_tables(
        work, train_names, data, patch_um, tta=tta, stain_augment=stain_augment, scale_augment=scale_augment,
        dihedral=dihedral,
    )  # fmt: skip
    hvg_names = set(rank_genes(train, genes, k=50)["hvg"])
    hvg = np.array([g in hvg_names for g in genes])
    test = all_tables[fold]
    idx = test.var_names.get_indexer(genes)
    conditions = {}
    for cond in CONDITIONS:
        test_tta = tta or tta_predict
        if not embedding_path(work, fold, cond, patch_um, test_tta).is_file():
            continue  # that image condition was not embedded at this patch size (see the report)
        counts = thinned_counts(test, fold) if cond == "thinned" else raw_counts(test)
        xy = spot_um(test, cond)
        emb = np.load(embedding_path(work, fold, cond, patch_um, test_tta))
        target = normalize_counts(counts, idx, target_norm=target_norm)
        conditions[cond] = (emb, xy, truths(counts, idx), target)
    labels = {
        "fold": fold,
        "target_norm": target_norm,
        "patch_um": patch_um,
        "tta": tta,
        "stain_augment": stain_augment,
    }
    rows = []
    if what in ("hespotex", "single"):
        single = split_validation(train_names, "auto", seed=seed)[0][0]
        held_out = train_names if what == "hespotex" else [single]
        overrides = {**({} if ae_epochs is None else {"ae_epochs": ae_epochs}), **CONFIGS.get(config, {})}
        model_config = ModelConfig.preset("hespotex", **overrides)

        def member(held: str, member_seed_base: int, ae_seed: int | None = None):
            own = member_seed(member_seed_base, [n for n in train_names if n != held])  # as hx.tl.train's ensembles do
            if model_config.ae_samples == "all":  # one autoencoder on every training section, shared by all members
                ae_seed = member_seed(seed, train_names)
            return hx.tl.train(
                train, genes=genes, validation=[held], seed=own if distinct_seeds else seed, target_norm=target_norm,
                use_rep="X", device="cpu", stain_augment=stain_augment, config=model_config.replace(ae_seed=ae_seed),
            )  # fmt: skip

        if shared_ae:  # later rounds on the first round's autoencoders, as hx.tl.train(..., ensemble=rounds)
            members = {held: member(held, seed) for held in held_out}
            first = {h: member_seed(seed, [n for n in train_names if n != h]) for h in held_out}
            extra = [member(h, 1_000_000 * r + seed, first[h]) for r in range(1, rounds) for h in held_out]
        else:
            extra = [member(h, 1_000_000 * r + seed) for r in range(1, rounds) for h in held_out]  # more per section
            members = {held: member(held, seed) for held in held_out}
        refits = []
        if refit:  # one more model per member, on every training section for the member's best epoch count
            shared = member_seed(2_000_000 + seed, train_names)  # the refits train on the same samples: one AE
            for h, m in members.items():
                scores = [r.get("validation", -np.inf) for r in m.history_]
                own = member_seed(2_000_000 + seed, [n for n in train_names if n != h])
                refits.append(
                    hx.tl.train(
                        train, genes=genes, validation=None, seed=own, target_norm=target_norm, use_rep="X",
                        device="cpu", stain_augment=stain_augment,
                        config=model_config.replace(epochs=int(np.argmax(scores)) + 1, ae_seed=shared),
                    )
                )  # fmt: skip
        fit_s = time.perf_counter() - t0
        for cond, (emb, xy, truth, target) in conditions.items():
            graph = knn_graph(xy, 6)[0] if smooth_predict else None  # the 6-NN smoothing of this section, once
            variants = (("+ttapredict", None),) if tta_predict else (("", None), ("+slidestd", slide_standardised))
            if distinct_seeds:
                variants = (("+distinct" + ae_label, None),)
            elif ae_label:
                variants = ((ae_label, None),)
            for std_label, transform in variants:
                preds = {
                    h: m.predict_graph(
                        GraphData(fold, emb if transform is None else transform(emb, m), xy), device="cpu"
                    )["expression"]
                    for h, m in members.items()
                }
                stack = np.stack(list(preds.values()))
                ens = stack.mean(axis=0)
                lab = {**labels, "seed": seed, "condition": cond, "fit_seconds": fit_s, "members": len(members)}
                rows += score_rows(preds[single], truth, hvg, method="hespotex" + std_label, **lab)
                if len(members) == 1:
                    continue
                rows += score_rows(ens, truth, hvg, method="hespotex-ens" + std_label, **lab)
                if smooth_predict:
                    for suffix, weight in (("+smooth", None), ("+smooth50", 0.5)):
                        smoothed = smooth(ens, graph, self_weight=weight)
                        rows += score_rows(smoothed, truth, hvg, method="hespotex-ens" + std_label + suffix, **lab)
                more = [m.predict_graph(GraphData(fold, emb, xy), device="cpu")["expression"] for m in extra]
                for r in range(2, rounds + 1):  # the first r rounds' members together (extra is round-major)
                    big = np.mean([*stack, *more[: (r - 1) * len(stack)]], axis=0)
                    tag = std_label + f"+x{r}" + ("shared" if shared_ae else "")
                    lab_all = {**lab, "members": r * len(stack)}
                    rows += score_rows(big, truth, hvg, method="hespotex-ens" + tag, **lab_all)
                    if smooth_predict:
                        for weight in SMOOTH_GRID if smooth_grid else (0.5,):
                            smoothed = smooth(big, graph, self_weight=weight)
                            method = "hespotex-ens" + tag + smooth_label(weight)
                            rows += score_rows(smoothed, truth, hvg, method=method, **lab_all)
                if refits:  # the members with their refits (and the later rounds' members too)
                    again = [m.predict_graph(GraphData(fold, emb, xy), device="cpu")["expression"] for m in refits]
                    for tag, parts in (
                        ("+refit", [*stack, *again]),
                        ("+refitonly", again),
                        (f"+x{rounds}shared+refit" if shared_ae else f"+x{rounds}+refit", [*stack, *more, *again]),
                    ):
                        if tag.startswith("+x1"):
                            continue
                        lab_r = {**lab, "members": len(parts)}
                        smoothed = smooth(np.mean(parts, axis=0), graph, self_weight=0.5)
                        rows += score_rows(
                            smoothed, truth, hvg, method="hespotex-ens" + std_label + tag + smooth_label(0.5), **lab_r
                        )
                if std_label != "+slidestd":  # spread vs error: Spearman per slide, own targets
                    for measure, rho in spread_vs_error(stack, target).items():
                        rows.append(
                            {
                                **lab,
                                "method": "hespotex-ens" + std_label,
                                "truth": target_norm,
                                "genes": measure,
                                "pearson": float(rho),
                            }
                        )
    else:
        if "thinned" in conditions and not smooth_tuned:  # the thinning ceiling: clean truth scored against thinned
            clean_truth = truths(raw_counts(test), idx)
            for name, y in conditions["thinned"][2].items():
                rows += score_rows(
                    clean_truth[name], {name: y}, hvg, method="ceiling", seed=-1, condition="thinned",
                    fit_seconds=0.0, chosen="clean truth", **labels,
                )  # fmt: skip
        fit = {n: graph_data(train[n], n, genes=genes, embedding_key="X", target_norm=target_norm) for n in train_names}
        inner = {n: (d.emb, d.expr, d.coords_um) for n, d in fit.items()}
        for name in ("ridge", "retrieval"):
            if smooth_tuned:  # α / k and the smoothing weight chosen together on the training sections
                model = tune_baseline(name, inner, smoothed=True, seed=0)
                weight = model.tuning_["smooth_weight"]
                for cond, (emb, xy, truth, _) in conditions.items():
                    pred = smooth(model.predict(emb), knn_graph(xy, 6)[0], self_weight=weight)
                    rows += score_rows(
                        pred, truth, hvg, method=name + "+smoothcv", seed=-1, condition=cond,
                        fit_seconds=time.perf_counter() - t0,
                        chosen=f"{model.tuning_['param']}={model.tuning_['value']:g}, "
                        f"smooth={'mean' if weight is None else weight}", **labels,
                    )  # fmt: skip
                continue
            for smoothed in (False, True):  # the spot and its neighbours alike while tuning (the rows' first runs)
                model = tune_baseline(name, inner, smoothed=smoothed, seed=0, smooth_weights=(None,))
                # smoothed: as tuned (the spot and its 6 neighbours alike) and, with smooth_predict, the spot at 0.5
                weights = {"+smooth": None, **({"+smooth50": 0.5} if smooth_predict else {})} if smoothed else {"": 1.0}
                for cond, (emb, xy, truth, _) in conditions.items():
                    raw = model.predict(emb)
                    graph = knn_graph(xy, 6)[0] if smoothed else None
                    for suffix, weight in weights.items():
                        pred = raw if graph is None else smooth(raw, graph, self_weight=weight)
                        rows += score_rows(
                            pred, truth, hvg, method=name + suffix, seed=-1, condition=cond,
                            fit_seconds=time.perf_counter() - t0,
                            chosen=f"{model.tuning_['param']}={model.tuning_['value']:g}", **labels,
                        )  # fmt: skip
    if refit:  # the rest equals the rows of the run without refits, under names older runs (512-wide heads) hold
        rows = [r for r in rows if "refit" in r["method"]]
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp.gz")
    pd.DataFrame(rows).to_csv(tmp, index=False, compression="gzip")
    os.replace(tmp, done)
    return str(done)


# the library default until 2026-12-02 (two scales in the context200 work folder, stain views, one member per
# held-out section with its own seed), its ensemble also scored smoothed
_DEFAULT_SMOOTHED = {
    "target_norm": "library_modelled", "patch_um": 100.0, "tta": False, "stain_augment": True,
    "distinct_seeds": True, "smooth_predict": True,
}  # fmt: skip

GRIDS = {
    # option selection (fewer seeds): targets x patch scale, without / with TTA
    "select": [
        {"target_norm": t, "patch_um": p, "tta": False}
        for t in ("library_all", "library_modelled")
        for p in (100.0, 200.0)
    ],
    "tta": [{"target_norm": "library_modelled", "patch_um": 100.0, "tta": True}],
    "log1p": [{"target_norm": "log1p_counts", "patch_um": 100.0, "tta": False}],
    # the baselines' predictions also smoothed with the spot at weight 0.5 (run with and without --work .../context200)
    "smooth_baselines": [{"target_norm": "library_modelled", "patch_um": 100.0, "tta": False, "smooth_predict": True}],
    # the default's prediction smoothed, and its autoencoder pre-trained for fewer epochs (with --work .../context200)
    "smooth_ae": [_DEFAULT_SMOOTHED, {**_DEFAULT_SMOOTHED, "ae_epochs": 200}],
    # two members per held-out section (8 here), with and without smoothing (with --work .../context200)
    "rounds2": [{**_DEFAULT_SMOOTHED, "rounds": 2}],
    # the same, the second round's members taking the first round's autoencoders: hx.tl.train's default since
    # 2026-12-02, ensemble=2 (with --work .../context200)
    "rounds2_shared": [{**_DEFAULT_SMOOTHED, "rounds": 2, "shared_ae": True}],
    "smooth": [_DEFAULT_SMOOTHED],
    # the default (rounds2_shared) with its prediction smoothed at several weights of the spot: how much the weight
    # moves the scores (chosen on the held-out sections: a diagnostic, not a selection; with --work .../context200)
    "smooth_weights": [{**_DEFAULT_SMOOTHED, "rounds": 2, "shared_ae": True, "smooth_grid": True}],
    # the smoothed baselines with their smoothing weight tuned too (run with and without --work .../context200)
    "smooth_tuned_baselines": [
        {"target_norm": "library_modelled", "patch_um": 100.0, "tta": False, "smooth_tuned": True}
    ],
}


def cmd_run(args) -> None:
    from hespotex.datasets._her2st import her2st_sections

    folds = [f for f in her2st_sections(args.data) if args.folds is None or f in args.folds]
    tasks = []
    for setting in GRIDS[args.grid] if args.setting is None else [ast.literal_eval(args.setting)]:
        if not setting.get("stain_augment") and args.what != "baselines":  # baselines do not depend on hespotex
            tasks += [{"fold": f, "seed": 0, "what": "baselines", **setting} for f in folds]
        tasks += [{"fold": f, "seed": s, "what": args.what, **setting} for s in args.seeds for f in folds]
    for t in tasks:
        t.update(data=args.data, work=args.work)
    t0 = time.perf_counter()
    run_parallel(run_task, tasks, args.workers)
    print(f"{len(tasks)} tasks in {(time.perf_counter() - t0) / 60:.1f} min")


def load_rows(work: Path) -> pd.DataFrame:
    files = sorted((work / "rows").glob("*.csv.gz"))
    if not files:
        msg = f"No finished tasks under {work / 'rows'}; run `python benchmarks/shift.py run` first."
        raise FileNotFoundError(msg)
    rows = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    if "stain_augment" not in rows:
        rows["stain_augment"] = False
    rows["stain_augment"] = rows["stain_augment"].eq(True)  # rows from before the option (NaN): none
    aug = rows["stain_augment"] & rows["method"].str.startswith("hespotex")
    rows.loc[aug, "method"] = (
        rows.loc[aug, "method"]
        .str.replace("hespotex-ens", "hespotex-ens+stainaug")
        .where(
            rows.loc[aug, "method"].str.startswith("hespotex-ens"),
            rows.loc[aug, "method"].str.replace("hespotex", "hespotex+stainaug", n=1),
        )
    )  # shown beside the same setting's other variants
    return rows


def seed_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean over folds per seed, then mean over seeds with the spread (max - min of the seed means); a seed that
    lacks some of the folds the other seeds have (a run still under way or stopped) is left out."""
    keys = ["target_norm", "patch_um", "tta", "stain_augment", "method", "condition", "truth", "genes"]
    rows = rows.drop_duplicates([*keys, "fold", "seed"])  # a single model scored by its single and ensemble tasks
    per_seed = rows.groupby([*keys, "seed"], dropna=False)["pearson"].agg(["mean", "count"]).reset_index()
    per_seed = per_seed[per_seed["count"] == per_seed.groupby(keys, dropna=False)["count"].transform("max")]
    out = per_seed.groupby(keys, dropna=False).agg(
        pearson=("mean", "mean"),
        spread=("mean", lambda v: float(v.max() - v.min())),
        seeds=("mean", "size"),
        folds=("count", "min"),
    )
    return out.reset_index()


def setting_name(row) -> str:
    return f"{row['target_norm']}, {row['patch_um']:g} µm{', TTA' if row['tta'] else ''}"


def cmd_report(args) -> None:
    work = Path(args.work)
    rows = load_rows(work)
    summ = seed_summary(rows[~rows["genes"].str.startswith("spread_spearman")])
    n_folds = rows["fold"].nunique()
    partial = summ[summ["folds"] < n_folds][["target_norm", "patch_um", "condition"]].drop_duplicates()
    summ = summ[
        summ["folds"] == n_folds
    ]  # only what every fold has (e.g. not the restained 200 µm patches of one section)
    summ["setting"] = summ.apply(setting_name, axis=1)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        "# Shift benchmark: her2st C2-C6, held-out section as is and under emulated patient shifts",
        "",
        "Commands that made these tables (2-core machine shared with other jobs; 2 dask worker processes, 1 "
        "torch thread each):  ",
        "`python benchmarks/shift.py embed` (clean, restained, rescaled at 100 µm; clean at 200 µm);  ",
        "`python benchmarks/shift.py run --grid select --what single --seeds 0` (option selection, single "
        "models, 13.6 min);  ",
        "`python benchmarks/shift.py run --setting \"{'target_norm': 'library_modelled', 'patch_um': 100.0, "
        "'tta': False}\" "
        "--what hespotex --seeds 0 1 2` (4-member ensembles, 3 seeds, 26.1 min);  ",
        "the same setting with `'stain_augment': True` (after `shift.py embed --stain-views --patch 100`): "
        "`--what hespotex --seeds 0`, `--what hespotex --seeds 1 2 --workers 1` (stain-augmented ensembles: the "
        "default of `hx.tl.train`), `--what single --seeds 1` and `--seeds 2` (stain-augmented single models);  ",
        f"`{cmd}`.  ",
        "Modelled genes: the 785-gene panel (those present in every section). Encoder: ImageNet "
        "EfficientNet-Lite0 (offline weights), "
        "frozen. Leave-one-section-out over C2-C6 (5 folds). Shifts of the held-out section: `thinned` "
        "(binomial thinning to ~650 "
        "counts per spot; truth from the thinned counts), `restained` (HED gain/shift, Gaussian blur 1.5 px, "
        "JPEG q40, re-embedded), "
        "`rescaled` (µm/px 10 % too large, re-embedded). Truths: `lib_all` log1p CP10k library over all genes, "
        "`lib_scored` library "
        "over the modelled genes, `log1p_raw` log1p(raw counts) (HEST-Benchmark). Scores: mean per-gene "
        "Pearson over the top-50 HVG "
        "(ranked on the training sections) and over all modelled genes, mean over the 5 folds; `±` is the "
        "spread (max - min) of the "
        "seed means. hespotex = one model (validation section chosen by the seed, as `hx.tl.train` does); "
        "hespotex-ens = the mean of "
        "4 members, one per held-out validation section; `+slidestd` = embeddings standardised per slide at "
        "prediction time. "
        "Baselines (ridge: standardise, PCA 256, ridge; retrieval: k nearest training spots, cosine) with α / "
        "k chosen by "
        "leave-one-training-section-out on the training sections, fitted to the same targets as hespotex, raw "
        "and smoothed "
        "(6 nearest spots); they are deterministic (no seed spread). `+stainaug` = trained on the clean embedding "
        "and 4 stain-augmented views per spot. Companion reports: `shift_defaults.md` (the default against the "
        "strongest tuned baseline, seed spreads), `shift_stain.md` (stain augmentation, Macenko), "
        "`shift_context.md` (two-scale embeddings).",
        "",
    ]
    # 1. option selection: every setting, mean over the three truths, per condition and gene set
    sel = (
        summ.groupby(["setting", "method", "condition", "genes"])["pearson"].mean().unstack(["condition"]).reset_index()
    )
    sel = sel[["setting", "method", "genes", *[c for c in CONDITIONS if c in sel]]]
    if len(partial):
        lines += ["Left out of the tables (not embedded for every section, to fit the compute): "
                  + ", ".join(f"{r.condition} at {r.patch_um:g} µm ({r.target_norm})"
                              for r in partial.itertuples()) + ".", ""]  # fmt: skip
    lines += ["## Every setting and method (mean over the three truths; seed 0 and any further seeds averaged)", "",
              sel.sort_values(["genes", "setting", "method"]).round(4).to_markdown(index=False), ""]  # fmt: skip
    # 2. per setting: hespotex variants vs the strongest tuned baseline, per condition x truth x gene set
    base = summ[summ["method"].str.startswith(("ridge", "retrieval"))]
    best = base.loc[base.groupby(["setting", "condition", "truth", "genes"])["pearson"].idxmax()]
    for setting in args.final or []:
        part = summ[(summ["setting"] == setting) & summ["method"].str.startswith("hespotex")]
        b = best[best["setting"] == setting].set_index(["condition", "truth", "genes"])
        table = []
        for (cond, truth, genes), grp in part.groupby(["condition", "truth", "genes"], sort=False):
            row = {"condition": cond, "truth": truth, "genes": genes}
            for _, r in grp.iterrows():
                row[r["method"]] = f"{r['pearson']:.4f} ± {r['spread']:.4f} ({r['seeds']})"
            if (cond, truth, genes) in b.index:
                br = b.loc[(cond, truth, genes)]
                row["best baseline"] = f"{br['pearson']:.4f} {br['method']}"
                for m in sorted(grp["method"].unique()):
                    own = grp.loc[grp["method"] == m, "pearson"]
                    row[f"margin {m}"] = round(float(own.iloc[0]) - float(br["pearson"]), 4)
            table.append(row)
        lines += [f"## {setting}: hespotex vs the strongest tuned baseline (mean ± seed spread (seeds))", "",
                  pd.DataFrame(table).to_markdown(index=False), ""]  # fmt: skip
    # 3. uncertainty: does the ensemble's spread rank the errors?
    sp = rows[rows["genes"] == "spread_spearman"].copy()
    if len(sp):
        sp["setting"] = sp.apply(setting_name, axis=1)
        t = sp.groupby(["setting", "condition"])["pearson"].agg(["mean", "min", "max"]).reset_index()
        lines += ["## Ensemble spread vs absolute error (Spearman over spots x genes, per slide; mean / min / max over "
            "folds and seeds)", "",
                  t.round(3).to_markdown(index=False), ""]  # fmt: skip
    chosen = (
        rows[rows["method"].str.startswith(("ridge", "retrieval"))]
        .groupby(["target_norm", "patch_um", "method"])["chosen"]
        .agg(lambda v: ", ".join(sorted(set(v))))
    )
    lines += [
        "## Tuned baseline hyper-parameters (chosen per fold)",
        "",
        chosen.reset_index().to_markdown(index=False),
        "",
    ]
    fit = (
        rows[rows["method"] == "hespotex"].groupby(["target_norm", "patch_um", "tta", "members"])["fit_seconds"].mean()
    )
    lines += [
        "## Time per hespotex fold task (training of 1 or 4 members, 1 torch thread), seconds",
        "",
        fit.round(1).reset_index().to_markdown(index=False),
        "",
    ]
    write_keeping_conclusion("\n".join(lines), args.out)


CONCLUSION = "## Conclusion"


def write_keeping_conclusion(text: str, out: str) -> None:
    """Write a generated report to ``out`` (the whole file), keeping the hand-written section that starts with
    ``## Conclusion`` at the end of the file it replaces, if any (it is marked as written from the earlier tables)."""
    from _common import write_report

    path = Path(out)
    old = path.read_text() if path.is_file() else ""
    if CONCLUSION in old and CONCLUSION not in text:
        text = text.rstrip("\n") + "\n\n" + old[old.index(CONCLUSION) :].rstrip("\n")
    write_report(text, out)


def cmd_stain_report(args) -> None:
    """Write the report comparing training with stain-augmented views to the same setting without, to its own file
    (``--out``, by default ``benchmarks/results/shift_stainaug.md``; never appended to another report). The full
    stain report (with Macenko) is ``benchmarks/shift_stain.py report``."""
    work = Path(args.work)
    rows = load_rows(work)
    rows = rows[(rows["target_norm"] == "library_modelled") & (rows["patch_um"] == 100.0) & ~rows["tta"].astype(bool)]
    rows = rows[~rows["genes"].str.startswith("spread_spearman")]
    aug = rows[rows["stain_augment"]]
    aug_seeds = sorted(aug["seed"].unique())
    hes = rows[rows["method"].str.startswith("hespotex") & rows["seed"].isin(aug_seeds)]
    # single models and ensembles each on the seeds their stain-augmented variant has
    ens_seeds = aug.loc[aug["method"].str.startswith("hespotex-ens"), "seed"].unique()
    is_ens = hes["method"].str.startswith("hespotex-ens")
    hes = hes[~is_ens | hes["seed"].isin(ens_seeds)]
    base = rows[rows["method"].str.startswith(("ridge", "retrieval"))]
    folds = sorted(rows.loc[rows["stain_augment"], "fold"].unique())
    hes, base = hes[hes["fold"].isin(folds)], base[base["fold"].isin(folds)]
    keys = ["condition", "truth", "genes"]
    h = hes.groupby([*keys, "method"])["pearson"].mean().unstack("method")
    b = base.groupby([*keys, "method"])["pearson"].mean().unstack("method")
    h["best baseline"] = b.max(axis=1)
    order = ["hespotex", "hespotex+stainaug", "hespotex+slidestd", "hespotex+stainaug+slidestd",
             "hespotex-ens", "hespotex-ens+stainaug", "hespotex-ens+slidestd", "hespotex-ens+stainaug+slidestd",
             "best baseline"]  # fmt: skip
    h = h[[c for c in order if c in h]]
    summary = h.groupby(["condition", "genes"]).mean()  # mean over the three truths
    for m in ("hespotex", "hespotex-ens"):
        for std in ("", "+slidestd"):
            a, c = f"{m}+stainaug{std}", f"{m}{std}"
            if a in summary and c in summary:
                summary[f"gain {m}{std}"] = summary[a] - summary[c]
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        "# Shift benchmark: stain augmentation of training patches (library_modelled, 100 µm)",
        "",
        "Commands: `python benchmarks/shift.py embed --stain-views --patch 100` (4 stain-augmented views of "
            "every clean section with "
        "`hx.pp.embed(..., stain_augment=4)`, 17.8 min);  ",
        "`python benchmarks/shift.py run --setting \"{'target_norm': 'library_modelled', 'patch_um': 100.0, "
            "'tta': False, "
        "'stain_augment': True}\" --what hespotex --seeds 0` (4-member ensembles trained with "
            "`hx.tl.train(..., stain_augment=True)`);  ",
        f"`{cmd}`.  ",
        f"Setting library_modelled, 100 µm. Seeds {', '.join(map(str, aug_seeds))} for single models, "
        f"{', '.join(map(str, sorted(ens_seeds)))} for ensembles; folds {', '.join(folds)}; every method here "
            "restricted to these "
        "seeds and folds (so the plain hespotex figures are those of the same seeds, not the 3-seed means above). "
        "`+stainaug`: trained with one embedding per spot and epoch drawn among the clean one and 4 views "
            "re-stained in HED space "
        "(gain 0.7-1.3, shift ±0.04 per stain, brightness ±0.08, contrast 0.85-1.15); prediction on clean "
            "embeddings. The "
        "`restained` condition is the held-out section's own image re-stained by a different perturbation (HED "
            "gain 0.75-1.25, "
        "shift ±0.03, blur, JPEG q40).",
        "",
        "## Mean over the three truths", "",
        summary.round(4).reset_index().to_markdown(index=False), "",
        "## Per truth", "",
        h.round(4).reset_index().to_markdown(index=False), "",
    ]  # fmt: skip
    write_keeping_conclusion("\n".join(lines), args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["embed", "run", "report", "stain-report"])
    parser.add_argument("--data", default=None)
    parser.add_argument("--work", default="/tmp/hespotex_shift")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, help="embed: the image encoder (recorded in --work)")
    parser.add_argument("--patch", type=float, nargs="+", default=[100.0, 200.0])
    parser.add_argument("--tta", type=int, nargs="+", default=[0])
    parser.add_argument("--grid", default="select")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--folds", nargs="+", default=None, help="run: only these held-out sections (default: all)")
    parser.add_argument(
        "--what",
        default="hespotex",
        choices=["hespotex", "single", "baselines"],
        help="run: 4-member ensembles, single models, or the tuned baselines alone",
    )
    parser.add_argument("--final", nargs="*", default=None, help="report: settings shown in full against the baselines")
    parser.add_argument("--setting", default=None, help="one setting as a dict literal instead of --grid")
    parser.add_argument(
        "--out", default=None, help="report: shift.md; stain-report: shift_stainaug.md (under benchmarks/results)"
    )
    parser.add_argument(
        "--scale-augment",
        type=float,
        default=0.0,
        help="embed --stain-views: the views' field of view also scaled by up to this much (hx.pp.embed's option)",
    )
    parser.add_argument(
        "--dihedral",
        action="store_true",
        help="embed --stain-views: each view also turned by a random flip / quarter turn (hx.pp.embed's option)",
    )
    parser.add_argument(
        "--stain-views",
        action="store_true",
        help=f"embed: the {STAIN_VIEWS} stain-augmented views of the clean sections",
    )
    args = parser.parse_args()
    args.tta = [bool(t) for t in args.tta]
    if args.out is None:
        args.out = f"benchmarks/results/{'shift_stainaug' if args.stage == 'stain-report' else 'shift'}.md"
    {"embed": cmd_embed, "run": cmd_run, "report": cmd_report, "stain-report": cmd_stain_report}[args.stage](args)


if __name__ == "__main__":
    main()
