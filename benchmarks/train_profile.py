"""Where one hespotex training spends its time: one her2st fold (test C2), one model, cProfile.

    python benchmarks/train_profile.py [--genes 5457] [--out benchmarks/results/train_profile.md]

Trains on C3-C6 (C3 or the seeded section held out for early stopping, ``ensemble=False``) with the ImageNet
EfficientNet-Lite0 embeddings at the default patch, on the 785-gene panel topped up with the training fold's most
variable genes to ``--genes`` (as ``benchmarks/her2st_cv.py --genes``), one torch thread. Reports the wall time
of the stages (gene checks, autoencoder pre-training, joint stage, validation) and the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--genes", type=int, default=5457)
    parser.add_argument("--out", default="benchmarks/results/train_profile.md")
    args = parser.parse_args()
    import torch

    import hespotex as hx
    from hespotex._sample import get_table
    from hespotex.tl.evaluation._cross_validate import fold_genes

    hx.settings.progress = False
    hx.settings.num_threads = 1
    torch.set_num_threads(1)
    sections = hx.datasets.her2st(args.data)
    panel = hx.datasets.her2st_genes(args.data)
    for s in sections.values():
        hx.pp.embed(s, encoder="efficientnet_lite0.imagenet", key_added="X_imagenet")
    tables = {n: get_table(s) for n, s in sections.items()}
    train_names = [n for n in tables if n != "C2"]
    genes = fold_genes(
        [tables[n] for n in train_names], list(tables.values()), genes=None, n_top_genes=args.genes,
        flavor="seurat_v3", include_genes=panel,
    )  # fmt: skip
    load = tuple(round(v, 1) for v in os.getloadavg())
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    model = hx.tl.train(
        {n: tables[n] for n in train_names}, genes=genes, use_rep="X_imagenet", ensemble=False, seed=0,
        target_norm="library_all", stain_augment=False,
    )  # fmt: skip
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    by_name = {f"{Path(k[0]).name}:{k[2]}": v[3] for k, v in stats.stats.items()}  # cumulative seconds

    def cum(name: str) -> float:
        return max((v for k, v in by_name.items() if k.endswith(":" + name)), default=0.0)

    stages = {
        "whole train()": wall,
        "select_genes (gene checks)": cum("select_genes"),
        "graph_data (targets, graphs)": cum("graph_data"),
        "autoencoder pre-training": cum("pretrain_autoencoder"),
        "fit_net (pre-training + joint stage)": cum("fit_net"),
        "validation (per epoch, in fit_net)": cum("validate"),
        "optimizer steps (Adam/AdamW)": cum("step"),
    }
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    top = "\n".join(line for line in buf.getvalue().splitlines() if line.strip())
    cmd = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    lines = [
        "# One hespotex training on her2st, profiled",
        "",
        f"Command: `{cmd}`; one torch thread; load average at start {load} (2-core machine shared with other "
        f"jobs: the seconds scale with the load, the shares less). {len(genes)} genes, "
        f"{sum(tables[n].n_obs for n in train_names)} training spots ({', '.join(train_names)}), "
        f"{len(model.history_)} joint epochs, validation on {model.validation_['samples']}.",
        "",
        "| stage | seconds | share |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.1f} | {v / wall:.0%} |" for k, v in stages.items()],
        "",
        "Top functions by own time:",
        "",
        "```",
        top,
        "```",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
