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
        & ~rows["genes"].str.startswith("spread_spearman")
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


DEFAULT = "hespotex-ens+stainaug"
ON_DEFAULT = {  # arm -> (method in the rows, tta column)
    "default": (DEFAULT, False),
    "tta": (DEFAULT, True),
    "tta at prediction only": (DEFAULT + "+ttapredict", False),
}


def on_default(ctx_work: Path, spot_rows: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list, list]:
    """TTA on top of the default (two scales + stain augmentation + 4-member ensemble, ``ctx_work`` rows): each arm's
    mean ± seed spread on the (fold, seed) pairs every arm has, its gain over the default per seed (mean, min), and
    margins against the strongest tuned baseline on plain features (spot or spot+context) and on any features
    (TTA ones included)."""
    from shift_defaults import per_seed, seed_stats

    rows = load_rows(ctx_work)
    rows = rows[(rows["target_norm"] == "library_modelled") & ~rows["genes"].str.startswith("spread_spearman")].copy()
    rows["tta"] = rows["tta"].astype(bool)
    arms_ = {a: rows[(rows["method"] == m) & (rows["tta"] == t)] for a, (m, t) in ON_DEFAULT.items()}
    arms_ = {a: r for a, r in arms_.items() if len(r)}
    if len(arms_) < 2:
        return pd.DataFrame(), [], []
    pairs = set.intersection(*(set(zip(r["fold"], r["seed"], strict=True)) for r in arms_.values()))
    folds = sorted({f for f, _ in pairs})
    seeds = sorted(s for s in {s for _, s in pairs} if all((f, s) in pairs for f in folds))
    n_truths = 1 if "truth" in keys else 3
    stats, per = {}, {}
    for a, r in arms_.items():
        r = r[r["fold"].isin(folds) & r["seed"].isin(seeds)]
        ps = per_seed(r, keys, len(folds), n_truths)
        stats[a] = seed_stats(ps, keys).set_index(keys)
        per[a] = ps.set_index([*keys, "seed"])["mean"]
    spot = spot_rows.assign(features="spot")
    ctx = rows.assign(features="spot+context")
    base = pd.concat([spot, ctx])
    base = base[base["method"].isin(BASELINES) & base["fold"].isin(folds)]
    best = base.groupby(["method", "features", "tta", *keys])["pearson"].mean()
    plain_best = best.xs(False, level="tta").groupby(keys).max()
    any_best = best.groupby(keys).max()
    out = {}
    for a in arms_:
        st = stats[a]
        out[a] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(st["mean"], st["spread"], strict=True)]
        if a != "default":
            gain = (per[a] - per["default"]).groupby(keys).agg(["mean", "min"])
            out[f"gain {a}"] = gain["mean"].round(4).to_numpy()
            out[f"gain {a} (worst seed)"] = gain["min"].round(4).to_numpy()
    index = stats["default"].index
    out["strongest baseline (plain features)"] = plain_best.reindex(index).round(4).to_numpy()
    out["strongest baseline (any features)"] = any_best.reindex(index).round(4).to_numpy()
    for a in arms_:
        versus = plain_best if a == "default" else any_best
        out[f"margin {a}"] = (stats[a]["mean"] - versus.reindex(index)).round(4).to_numpy()
    return pd.DataFrame(out, index=index).reset_index(), folds, seeds


def on_default_lines(work: Path, context: float) -> list[str]:
    """The report's section on TTA on top of the default (empty when those runs are missing)."""
    ctx_work = work / f"context{context:g}"
    if not (ctx_work / "rows").is_dir():
        return []
    spot_rows = load_rows(work)
    spot_rows = spot_rows[(spot_rows["target_norm"] == "library_modelled") & (spot_rows["patch_um"] == 100.0)].copy()
    spot_rows["tta"] = spot_rows["tta"].astype(bool)
    mean_t, folds, seeds = on_default(ctx_work, spot_rows, ["condition", "genes"])
    if mean_t.empty:
        return []
    truth_t, _, _ = on_default(ctx_work, spot_rows, ["condition", "truth", "genes"])
    present = [a for a in ON_DEFAULT if a in mean_t.columns]
    missing = [f"`{a}`" for a in ON_DEFAULT if a not in present]
    present = [f"`{a}`" for a in present]
    base = "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': %s, 'stain_augment': True%s}"
    with_tta, predict_only = base % ("True", ""), base % ("False", ", 'tta_predict': True")
    return [
        "## TTA on top of the default (two scales + stain augmentation + 4-member ensemble)",
        "",
        "Run before ensemble members had seeds of their own: `default` here is the ensemble whose members share the "
        "seed (`hespotex-ens+stainaug`, the default until 2026-12-02; `shift_defaults.md` compares the two), and both "
        "TTA arms are that ensemble with TTA.",
        "",
        "Commands: `python benchmarks/shift.py embed --tta 1 --patch 100 200`, `python benchmarks/shift.py embed "
        "--stain-views --tta 1 --patch 100 200`, `python benchmarks/shift_context.py prepare --context "
        f"{context:g} --tta 1`; `python benchmarks/shift.py run --work {ctx_work} --what hespotex --seeds S "
        f'--setting "{with_tta}"` (`tta`: every embedding, training views included, is the mean '
        "over the 8 dihedral turns, as `hx.pp.embed(..., tta=True)` makes them for `hx.tl.train`) and with "
        f'`--setting "{predict_only}"` (`tta at prediction only`: the default\'s '
        "members, trained on plain embeddings, predict from the held-out section's TTA embeddings); the tuned "
        f"baselines on the two-scale TTA features: `python benchmarks/shift.py run --work {ctx_work} --what baselines "
        "--setting \"{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': True}\"`.  ",
        f"Arms with rows: {', '.join(present)}"
        + (f"; not run: {', '.join(missing)}" if missing else "")
        + f". Folds {', '.join(folds)}, seeds {', '.join(map(str, seeds))} (the pairs every arm has). `gain` = arm - "
        "default per seed (mean, and the worst seed). `margin default` is against the strongest tuned baseline on "
        "plain features (as in shift_defaults.md); the TTA arms' margins are against the strongest on any features, "
        "TTA ones included (the baselines gain from TTA features too).",
        "",
        "### Mean over the three truths",
        "",
        mean_t.sort_values(["genes", "condition"]).to_markdown(index=False),
        "",
        "### Per truth",
        "",
        truth_t.sort_values(["genes", "condition", "truth"]).to_markdown(index=False),
        "",
    ]


def write_default_section(work: Path, context: float, out: Path) -> None:
    """Replace (or add) the section on TTA on top of the default in ``out``, keeping what comes before it (the
    single-model tables, whose rows may be gone)."""
    section = on_default_lines(work, context)
    if not section:
        msg = f"No default and TTA rows under {work / f'context{context:g}' / 'rows'}; run shift.py first."
        raise SystemExit(msg)
    old = out.read_text() if out.is_file() else ""
    head = old[: old.index(section[0])] if section[0] in old else old.rstrip("\n") + "\n\n"
    out.write_text(head + "\n".join(section))
    print("\n".join(section))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/hespotex_shift")
    parser.add_argument("--out", default="benchmarks/results/shift_tta.md")
    parser.add_argument("--context", type=float, default=200.0, help="context patch of the two-scale default, µm")
    parser.add_argument(
        "--default-only",
        action="store_true",
        help="rewrite only the section on TTA on top of the default, keeping the single-model tables in --out",
    )
    args = parser.parse_args()
    work = Path(args.work)
    if args.default_only:
        write_default_section(work, args.context, Path(args.out))
        return
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
        *on_default_lines(work, args.context),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
