"""Test-time augmentation on the shift benchmark: hespotex single models on TTA embeddings vs plain ones.

TTA: each patch embedded in its 8 flips/rotations, averaged (``hx.pp.embed(tta=True)``; a model trained on TTA
embeddings records it and ``hx.tl.predict`` embeds new slides the same way). Same folds, seeds, conditions and
truths as ``benchmarks/shift.py`` (setting ``library_modelled``, 100 µm patches, no stain augmentation), read
from its work folder:

    python benchmarks/shift.py embed --tta 1 --patch 100          # TTA embeddings (work/emb/*_tta.npy)
    python benchmarks/shift.py run --setting "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': True}" \\
        --what single --seeds 0 1 2                               # single models + tuned baselines on them
    python benchmarks/shift_tta.py [--work /tmp/hespotex_shift] [--out benchmarks/results/shift_tta.md]

The plain single models are the ``hespotex`` rows of the ensemble runs of shift.py (the member with the seeded
validation section, as ``ensemble=False`` trains); both arms are restricted to the (fold, seed) pairs they share.
Strongest baseline: the best of ridge / retrieval, raw or smoothed, α and k tuned on the training sections, on
plain embeddings (and, for reference, on TTA embeddings).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shift import load_rows

BASELINES = ("ridge", "ridge+smooth", "retrieval", "retrieval+smooth")


def arms(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list, list]:
    """hespotex single-model rows (plain and TTA) on their shared (fold, seed) pairs, and the baselines' rows."""
    rows = rows[
        (rows["target_norm"] == "library_modelled")
        & (rows["patch_um"] == 100.0)
        & ~rows["stain_augment"]
        & (rows["genes"] != "spread_spearman")
    ].copy()
    rows["tta"] = rows["tta"].astype(bool)
    hes = rows[rows["method"] == "hespotex"]
    pairs = [set(zip(p["fold"], p["seed"], strict=True)) for _, p in hes.groupby("tta")]
    shared = sorted(set.intersection(*pairs)) if len(pairs) == 2 else []
    hes = hes[[(f, s) in set(shared) for f, s in zip(hes["fold"], hes["seed"], strict=True)]]
    folds = sorted({f for f, _ in shared})
    seeds = sorted({s for _, s in shared})
    base = rows[rows["method"].isin(BASELINES) & rows["fold"].isin(folds)]
    return hes, base, folds, seeds


def summary(hes: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Per condition, truth and gene set: mean over folds per seed, then mean and spread (max - min) over seeds."""
    keys = ["condition", "truth", "genes"]
    per_seed = hes.groupby([*keys, "tta", "seed"])["pearson"].mean()
    agg = per_seed.groupby([*keys, "tta"]).agg(["mean", lambda v: float(v.max() - v.min())])
    agg.columns = ["pearson", "spread"]
    agg = agg.unstack("tta")
    out = pd.DataFrame(
        {
            "plain": agg[("pearson", False)],
            "plain_spread": agg[("spread", False)],
            "tta": agg[("pearson", True)],
            "tta_spread": agg[("spread", True)],
        }
    )
    out["gain"] = out["tta"] - out["plain"]
    b = base.groupby([*keys, "tta", "method"])["pearson"].mean().unstack("method").max(axis=1).unstack("tta")
    out["best_baseline"] = b[False]
    if True in b:
        out["best_baseline_tta"] = b[True]
    out["plain_margin"] = out["plain"] - out["best_baseline"]
    out["tta_margin"] = out["tta"] - out["best_baseline"]
    return out.reset_index()


def embed_seconds(work: Path) -> tuple[float, float]:
    """Mean seconds of one section's embedding, plain and TTA (clean images, 100 µm), from shift.py's records."""

    def mean(pattern: str) -> float:
        vals = [float(p.read_text()) for p in (work / "emb").glob(pattern)]
        return float(np.mean(vals)) if vals else float("nan")

    return mean("C?_clean_100.seconds"), mean("C?_clean_100_tta.seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/hespotex_shift")
    parser.add_argument("--out", default="benchmarks/results/shift_tta.md")
    args = parser.parse_args()
    work = Path(args.work)
    hes, base, folds, seeds = arms(load_rows(work))
    if hes.empty:
        msg = f"No fold and seed has both plain and TTA single-model rows under {work / 'rows'}; run shift.py first."
        raise SystemExit(msg)
    table = summary(hes, base)
    over_truths = table.drop(columns="truth").groupby(["condition", "genes"]).mean().reset_index()
    plain_s, tta_s = embed_seconds(work)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        "# Test-time augmentation on the shift benchmark (her2st C2-C6)",
        "",
        "Commands: `python benchmarks/shift.py embed --tta 1 --patch 100`;  ",
        "`python benchmarks/shift.py run --setting \"{'target_norm': 'library_modelled', 'patch_um': 100.0, "
        "'tta': True}\" --what single --seeds 0 1 2`;  ",
        f"`{cmd}`. Load average when the report was written: {tuple(round(v, 1) for v in os.getloadavg())} "
        "(2-core machine shared with other jobs).  ",
        f"Single models (`ensemble=False`, the seeded validation section), folds {', '.join(folds)}, seeds "
        f"{', '.join(map(str, seeds))}: each arm is the mean over folds per seed, then over seeds; `*_spread` is "
        "the max - min of the seed means. `gain` = tta - plain. `best_baseline`: the best of ridge / retrieval, raw "
        "or smoothed, tuned on the training sections, on plain embeddings (`best_baseline_tta`: on TTA ones); "
        "`*_margin` = hespotex - best_baseline. Embedding one section (clean image, 100 µm): "
        f"{plain_s:.0f} s plain, {tta_s:.0f} s with TTA (on the shared machine).",
        "",
        "## Mean over the three truths",
        "",
        over_truths.round(4).to_markdown(index=False),
        "",
        "## Per truth",
        "",
        table.round(4).to_markdown(index=False),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
