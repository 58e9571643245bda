"""Leave-one-section-out benchmark on her2st: HESpotEx (paper preset and own defaults) vs baselines.

Five HER2+ sections (C2-C6), two encoders (EfficientNet-Lite0 random init, and ImageNet weights),
methods hespotex:paper, hespotex, ridge, mlp, retrieval, each baseline raw and spatially smoothed.
Per fold the model is trained on a 5,457-gene panel (the 785-gene panel of genes_785.txt topped up
with the training fold's most variable genes) and scored on the held-out section: mean Pearson
over the top-50 highly variable genes (ranked on the training fold), over the 785-gene panel and
over all 5,457 genes. Truth: log1p(counts per 10,000), library over all genes.

    python benchmarks/her2st_cv.py [--data PATH] [--genes 5457] [--workers 2] [--out benchmarks/results]

Folds run in parallel on a dask LocalCluster (``--workers`` processes, one torch thread each: on
2 cores this beats one process with two threads, whose scatter operations contend). Each task is one
fold with every encoder and method, so the fold's autoencoder pre-training is shared by all of them.
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
from hespotex.tl.evaluation._cross_validate import cross_validate, summarize_cv

ENCODERS = {"random": ("efficientnet_lite0", "X_random"), "imagenet": ("efficientnet_lite0.imagenet", "X_imagenet")}


def run_fold(
    fold: str,
    data: str | None,
    encoders: list[str],
    methods: list,
    genes: int,
    out: str,
    tune: bool = True,
    target_norm: str = "library_all",
) -> pd.DataFrame:
    """One held-out section, every encoder and method (runs inside a dask worker).

    The fold's table is saved to ``out/folds/<fold>.csv.gz`` as soon as it is done, so a rerun
    skips finished folds and a failing fold does not lose the others.
    """
    done = Path(out) / "folds" / f"{fold}.csv.gz"
    if done.is_file():
        return pd.read_csv(done)
    hx.settings.progress = False
    hx.settings.num_threads = 1
    sections = hx.datasets.her2st(data)
    panel = hx.datasets.her2st_genes(data)
    tables = []
    for enc in encoders:
        name, key = ENCODERS[enc]
        for sdata in sections.values():
            hx.pp.embed(sdata, encoder=name, key_added=key)  # cache hits: embedded once up front
        table = cross_validate(
            sections,
            folds=[fold],
            methods=methods,
            n_top_genes=genes,
            include_genes=panel,
            panels={"785": panel},
            use_rep=key,
            seed=0,
            tune_baselines=tune,
            target_norm=target_norm,
            ensemble=False,  # one model per fold, as this table has always measured (ensembles: benchmarks/shift.py)
        )
        table.insert(0, "encoder", enc)
        tables.append(table)
    result = pd.concat(tables, ignore_index=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(done, index=False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="her2st folder (default: HESPOTEX_DATA or ../shared/data)")
    parser.add_argument("--genes", type=int, default=5457)
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    parser.add_argument("--methods", nargs="+", default=["hespotex:paper", "hespotex", "ridge", "mlp", "retrieval"])
    parser.add_argument(
        "--ablations", action="store_true", help="also run hespotex without graph decoder / alignment / autoencoder"
    )
    parser.add_argument("--workers", type=int, default=2, help="dask worker processes (one fold each at a time)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="baselines at their fixed defaults instead of α / k tuned on the training sections",
    )
    parser.add_argument("--target-norm", default="library_all", help="targets of every method (hespotex.pp._targets)")
    args = parser.parse_args()
    hx.settings.progress = False
    load_start = tuple(round(v, 1) for v in os.getloadavg())
    t_start = time.perf_counter()
    sections = hx.datasets.her2st(args.data)
    t_embed = time.perf_counter()
    for sdata in sections.values():
        for enc in args.encoders:
            name, key = ENCODERS[enc]
            hx.pp.embed(sdata, encoder=name, key_added=key)
    t_embed = time.perf_counter() - t_embed
    methods: list = list(args.methods)
    if args.ablations:
        own = ModelConfig.preset("hespotex")
        methods += [
            ("hespotex-no-graph-decoder", own.replace(use_graph_decoder=False)),
            ("hespotex-no-alignment", own.replace(align=False)),
            ("hespotex-no-autoencoder", own.replace(use_autoencoder=False)),
        ]
    from dask.distributed import Client, LocalCluster

    t_cv = time.perf_counter()
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        futures = client.map(
            run_fold,
            sorted(sections),
            data=args.data,
            encoders=args.encoders,
            methods=methods,
            genes=args.genes,
            out=args.out,
            tune=not args.no_tune,
            target_norm=args.target_norm,
            pure=False,
        )
        tables = client.gather(futures)
    t_cv = time.perf_counter() - t_cv
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
    lines = [
        "# her2st leave-one-section-out (C2-C6)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{__import__('torch').get_num_threads()}; "
        f"whole run {wall / 60:.1f} min wall, of which embeddings {t_embed / 60:.1f} min and cross-validation "
        f"{t_cv / 60:.1f} min "
        f"({args.workers} dask worker processes, 1 torch thread each). Load average at start: {load_start}.  ",
        f"Genes per fold: {args.genes} (785-gene panel + top seurat_v3 genes of the training fold). "
        "Truth: log1p(counts per 10,000), library over all genes. Top-50 HVG ranked on the training fold. "
        "Early stopping (hespotex, mlp) on one whole training section held out; never the test section.",
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
    ]
    (out / "her2st_cv.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
