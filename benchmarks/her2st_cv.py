"""Leave-one-section-out benchmark on her2st: HESpotEx at the library defaults vs tuned baselines.

Five HER2+ sections (C2-C6). By default: the library's default encoder (ImageNet EfficientNet-Lite0, its head's
features after the means of 4 inner stages: ``efficientnet_lite0.imagenet.multilayer``) at the default scales
(two-scale embeddings as ``hx.tl.train`` makes them: the spot diameter and a context patch twice as wide;
``--context-um none`` for the spot patch alone) with 4 stain-augmented views per spot cached alongside,
the 785-gene panel (genes_785.txt), and ``hx.tl.cross_validate`` at its defaults: every hespotex fold trains the default
ensemble (one member per training section held out for early stopping, 4 members here) with stain
augmentation and ``target_norm="library_modelled"``; baselines (ridge, mlp, retrieval) have α / k tuned
by leave-one-training-section-out, raw and smoothed. ``hespotex-single`` is the same model with
``ensemble=False`` (one member, the seeded validation section), for the single-vs-ensemble comparison.
Each fold is scored on the held-out section: mean Pearson over the top-50 highly variable genes
(ranked on the training fold), over the 785-gene panel and over all modelled genes.

    python benchmarks/her2st_cv.py [--data PATH] [--genes 785] [--workers 2] [--out benchmarks/results]

Off by default (slow; each behind a flag): ``--encoders multilayer imagenet random`` (the head's features alone,
the default until 2026-12-03, and the random-init encoder),
``--methods hespotex:paper ...`` (the paper preset), ``--genes 5457`` (the panel topped up with the
training fold's most variable genes, as this table measured until the ensemble default: at 5,457 genes
the autoencoder pre-training alone of the 20 ensemble members is about 40 core-minutes),
``--no-single`` drops the single-model arm.

Folds run in parallel on a dask LocalCluster (``--workers`` processes, one torch thread each: on
2 cores this beats one process with two threads, whose scatter operations contend), started by
``hespotex._cluster.local_cluster`` so that the workers run without the nanny's ``MALLOC_TRIM_THRESHOLD_``
(1.40 times faster side by side: ``results/her2st_cv.md``). Each task is one
fold with every encoder and method; the single-model arm of each fold is a task of its own, queued after
the five folds, so the short single models fill the core the fifth fold leaves idle.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.pp._stain_augment import DEFAULT_DIHEDRAL_AUGMENT, DEFAULT_SCALE_AUGMENT
from hespotex.tl.evaluation._cross_validate import cross_validate, summarize_cv

ENCODERS = {
    "random": ("efficientnet_lite0", "X_random"),
    "imagenet": ("efficientnet_lite0.imagenet", "X_imagenet"),  # the head alone: the default until 2026-12-03
    "multilayer": ("efficientnet_lite0.imagenet.multilayer", "X_multilayer"),  # the library's default encoder
}


def run_fold(
    fold: str,
    data: str | None,
    encoders: list[str],
    methods: list,
    genes: int,
    out: str,
    tune: bool = True,
    target_norm: str = "library_modelled",
    stain_views: int = 4,
    scale_augment: float = DEFAULT_SCALE_AUGMENT,
    dihedral: bool = DEFAULT_DIHEDRAL_AUGMENT,
    context_um: float | str | None = "auto",
    part: str = "methods",
    ensemble: int | str = "auto",
) -> pd.DataFrame:
    """One held-out section, every encoder and method (runs inside a dask worker).

    ``part``: ``"methods"`` (every method of ``methods``) or ``"single"`` (the single-model arm
    ``hespotex-single`` alone: its own task, so the short single models fill the cores the
    five long ensemble folds leave idle). The table is saved to ``out/folds/<fold>.csv.gz``
    (``<fold>_single.csv.gz``) as soon as it is done, so a rerun skips finished tasks and a
    failing one does not lose the others.
    """
    done = Path(out) / "folds" / (f"{fold}.csv.gz" if part == "methods" else f"{fold}_{part}.csv.gz")
    if done.is_file():
        return pd.read_csv(done)
    hx.settings.progress = False
    hx.settings.num_threads = 1
    sections = hx.datasets.her2st(data)
    panel = hx.datasets.her2st_genes(data)
    tables = []
    import dask

    for enc in encoders:
        name, key = ENCODERS[enc]
        with dask.config.set(scheduler="synchronous"):  # in a dask worker: image reads stay here, not on the cluster
            for sdata in sections.values():
                hx.pp.embed(  # cache hits (made up front)
                    sdata,
                    encoder=name,
                    key_added=key,
                    stain_augment=stain_views,
                    context_um=context_um,
                    scale_augment=scale_augment if stain_views else 0.0,
                    dihedral_augment=bool(dihedral and stain_views),
                )
        common = {
            "folds": [fold], "n_top_genes": genes, "include_genes": panel, "panels": {"785": panel}, "use_rep": key,
            "seed": 0, "target_norm": target_norm,
        }  # fmt: skip
        if part == "methods":
            table = cross_validate(
                sections,
                methods=methods,
                tune_baselines=tune,
                ensemble=ensemble,
                **common,
            )  # the library defaults: ensemble="auto" (4 training sections: an ensemble), stain augmentation (views)
            table.insert(0, "encoder", enc)
            tables.append(table)
        else:  # "single"
            one = cross_validate(sections, methods=["hespotex"], ensemble=False, **common)
            one["method"] = "hespotex-single"
            one.insert(0, "encoder", enc)
            tables.append(one)
    result = pd.concat(tables, ignore_index=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(done, index=False)
    return result


def run_part(fold: str, part: str, **kwargs) -> pd.DataFrame:
    """:func:`run_fold` of one ``part`` (for ``client.map`` over folds and parts)."""
    return run_fold(fold, part=part, **kwargs)


def previous_run(path: Path, summary: pd.DataFrame) -> list[str]:
    """The section comparing with the table this benchmark made before the ensemble default (single model per fold,
    5,457 genes, library over all genes, 200 µm patches, no stain augmentation; ``path``, committed)."""
    if not path.is_file():
        return []
    old = pd.read_csv(path)
    old = old[(old["encoder"] == "imagenet") & old["method"].isin(["hespotex", "ridge+smooth", "retrieval+smooth"])]
    first = summary["encoder"].iloc[0]  # the first of --encoders (the library's default encoder by default)
    new = summary[(summary["encoder"] == first) & summary["method"].isin(["hespotex", "hespotex-single"])]
    cols = ["fold", "method", "pearson_hvg", "pearson_785", "fit_seconds"]
    return [
        "## Before: one model per fold (the previous run of this table)",
        "",
        "`python benchmarks/her2st_cv.py` before the ensemble default: one model per fold (`ensemble=False`), 5,457 "
        "genes, truth and targets `library_all`, 200 µm patches, no stain augmentation, 25.6 min wall with the "
        "random encoder and the paper preset. ImageNet encoder, from `her2st_cv_summary_single_5457.csv`:",
        "",
        old[cols].round(4).to_markdown(index=False),
        "",
        "This run, per fold: ensemble (`hespotex`) vs single model (`hespotex-single`), same genes, targets and "
        "embeddings:",
        "",
        new[cols].round(4).to_markdown(index=False),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="her2st folder (default: HESPOTEX_DATA or ../shared/data)")
    parser.add_argument("--genes", type=int, default=785, help="785: the panel; more: topped up per training fold")
    parser.add_argument("--encoders", nargs="+", default=["multilayer"], help=f"among {list(ENCODERS)}")
    parser.add_argument(
        "--methods", nargs="+", default=["hespotex", "ridge", "mlp", "retrieval"], help="also: hespotex:paper"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the tables from the folds already in --out/folds, run nothing"
    )
    parser.add_argument("--no-single", action="store_true", help="skip the single-model arm (hespotex-single)")
    parser.add_argument(
        "--stain-views", type=int, default=4, help="stain-augmented views per spot (0: train on clean embeddings)"
    )
    parser.add_argument(
        "--scale-augment",
        type=float,
        default=DEFAULT_SCALE_AUGMENT,
        help="the views' field of view also scaled by up to this fraction (hx.tl.train's default)",
    )
    parser.add_argument(
        "--dihedral",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_DIHEDRAL_AUGMENT,
        help="each view also flipped / turned (hx.tl.train's default)",
    )
    parser.add_argument(
        "--context-um",
        default="auto",
        type=lambda v: None if v == "none" else v if v == "auto" else float(v),
        help="context patch (µm) of the two-scale embeddings: auto (the library default, twice the spot patch), "
        "none (single scale) or a side",
    )
    parser.add_argument(
        "--ablations", action="store_true", help="also run hespotex without graph decoder / alignment / autoencoder"
    )
    parser.add_argument(
        "--ensemble",
        default="auto",
        type=lambda v: v if v == "auto" else int(v),
        help="hespotex's ensemble (hx.tl.train's `ensemble`): auto (the library default, 2 members per held-out "
        "training section) or K members per held-out section",
    )
    parser.add_argument("--workers", type=int, default=2, help="dask worker processes (one fold each at a time)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="baselines at their fixed defaults instead of α / k tuned on the training sections",
    )
    parser.add_argument(
        "--target-norm", default="library_modelled", help="targets of every method (hespotex.pp._targets)"
    )
    args = parser.parse_args()
    hx.settings.progress = False
    load_start = tuple(round(v, 1) for v in os.getloadavg())
    t_start = time.perf_counter()
    sections = hx.datasets.her2st(args.data)
    methods: list = list(args.methods)
    if args.ablations:
        own = ModelConfig.preset("hespotex")
        methods += [
            ("hespotex-no-graph-decoder", own.replace(use_graph_decoder=False)),
            ("hespotex-no-alignment", own.replace(align=False)),
            ("hespotex-no-autoencoder", own.replace(use_autoencoder=False)),
        ]
    if args.report_only:  # the folds finished so far (a run stopped early, or still running)
        tables = [pd.read_csv(f) for f in sorted((Path(args.out) / "folds").glob("*.csv.gz"))]
        t_embed = t_cv = float("nan")
    else:
        t_embed = time.perf_counter()
        for sdata in sections.values():
            for enc in args.encoders:
                name, key = ENCODERS[enc]
                hx.pp.embed(
                    sdata,
                    encoder=name,
                    key_added=key,
                    stain_augment=args.stain_views,
                    context_um=args.context_um,
                    scale_augment=args.scale_augment if args.stain_views else 0.0,
                    dihedral_augment=bool(args.dihedral and args.stain_views),
                )
        t_embed = time.perf_counter() - t_embed
        from dask.distributed import Client

        from hespotex._cluster import local_cluster

        t_cv = time.perf_counter()
        with (
            local_cluster(args.workers) as cluster,
            Client(cluster) as client,
        ):
            # the five long folds first, then the short single-model tasks (dask runs them in this order)
            parts = ["methods"] + (["single"] if not args.no_single and "hespotex" in methods else [])
            tasks = [(fold, part) for part in parts for fold in sorted(sections)]
            futures = client.map(
                run_part,
                [fold for fold, _ in tasks],
                [part for _, part in tasks],
                data=args.data,
                encoders=args.encoders,
                methods=methods,
                genes=args.genes,
                out=args.out,
                tune=not args.no_tune,
                target_norm=args.target_norm,
                stain_views=args.stain_views,
                scale_augment=args.scale_augment,
                dihedral=args.dihedral,
                context_um=args.context_um,
                ensemble=args.ensemble,
                pure=False,
            )
            tables = client.gather(futures)
        t_cv = time.perf_counter() - t_cv
    load_end = tuple(round(v, 1) for v in os.getloadavg())
    per_gene = pd.concat(tables, ignore_index=True)
    wall = time.perf_counter() - t_start
    summaries = []
    for enc, part in per_gene.groupby("encoder", sort=False):
        s = summarize_cv(part, panels=("hvg", "785"))
        s.insert(0, "encoder", enc)
        summaries.append(s)
    summary = pd.concat(summaries, ignore_index=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_gene.to_csv(out / "her2st_cv_per_gene.csv.gz", index=False)
    summary.round(5).to_csv(out / "her2st_cv_summary.csv", index=False)  # small, committed: notebooks/ reads it
    mean = summary[summary["fold"] == "mean"].drop(columns="fold")
    cmd = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    n_folds = per_gene["fold"].nunique()
    lines = [
        "# her2st leave-one-section-out (C2-C6)",
        "",
        *(
            [
                f"**Partial: {n_folds} of 5 folds ({', '.join(sorted(per_gene['fold'].unique()))}); the means are "
                "over these folds only.**",
                "",
            ]
            if n_folds < 5
            else []
        ),
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{__import__('torch').get_num_threads()}; "
        + (
            "tables assembled (`--report-only`) from the folds a run had finished (fit seconds per fold below).  "
            if args.report_only
            else f"whole run {wall / 60:.1f} min wall, of which embeddings {t_embed / 60:.1f} min and "
            f"cross-validation {t_cv / 60:.1f} min ({args.workers} dask worker processes, 1 torch thread each). "
            f"Load average (1, 5, 15 min) at start {load_start}, at the end {load_end}.  "
        ),
        f"Genes per fold: {args.genes} "
        + ("(the 785-gene panel). " if args.genes <= 785 else "(785-gene panel + top seurat_v3 genes of the fold). ")
        + f"Targets and truth: `{args.target_norm}` (hespotex.pp._targets). "
        f"Encoder(s): {', '.join(f'{e} (`{ENCODERS[e][0]}`)' for e in args.encoders)}. "
        f"Embeddings: context_um={args.context_um!r} ('auto': two scales, the spot patch and one twice as wide, "
        "as hx.tl.train embeds by default; None: the spot patch alone), the same features for every method. "
        + (
            "hespotex: library defaults (an ensemble of 8: 2 members per held-out training section, all on one "
            "autoencoder pre-trained on the fold's 4 training sections"
            if args.ensemble == "auto"
            else f"hespotex: library defaults but `ensemble={args.ensemble}` ({4 * args.ensemble} members"
        )
        + f", stain augmentation with {args.stain_views} views, fields of view scaled by ±{args.scale_augment:g}"
        + (", flipped / turned" if args.dihedral else "")
        + "); "
        "hespotex-single: `ensemble=False`. Baselines tuned on the training sections "
        f"({'no' if args.no_tune else 'yes'}). Top-50 HVG ranked on the training fold. "
        "Early stopping (hespotex, mlp) on whole training sections held out; never the test section.",
        "",
        "## Mean over the five folds (mean per-gene Pearson)",
        "",
        mean.rename(
            columns={"pearson_hvg": "top50_hvg", "pearson_785": "panel_785", "pearson_all": f"all_{args.genes}"}
        )
        .round(4)
        .to_markdown(index=False),
        "",
        "## Per fold",
        "",
        summary[summary["fold"] != "mean"].round(4).to_markdown(index=False),
        "",
        *previous_run(Path(__file__).parent / "results" / "her2st_cv_summary_single_5457.csv", summary),
    ]
    (out / "her2st_cv.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
