"""The defaults of ``hx.tl.train`` on the shift benchmark, against the strongest tuned baseline.

These rows (``benchmarks/results/shift_rows``) hold the head-only encoder's features (``efficientnet_lite0.imagenet``,
the default until session 17); ``benchmarks/shift_encoder.py`` compares the default with the multi-layer encoder
(the default since) on its own rows.

Reads the per-task rows of ``benchmarks/shift.py`` (and of ``benchmarks/shift_context.py``'s work folder for the
two-scale candidate); trains nothing. The default is what ``hx.tl.train(sections, genes=panel)`` does since the
stain and ensemble work: targets ``library_modelled``, two scales (the 100 µm spot patch and a 200 µm context), one
member per held-out validation section (4 members here), each with its own seed (``member_seed``) and trained on
the clean embeddings and 4 stain-augmented views per spot (``hespotex-ens+stainaug+distinct`` in the rows; members
sharing the seed, the default until 2026-12-02: ``hespotex-ens+stainaug``), predicted as ``hx.tl.predict`` predicts
by default since session 12 (2026-12-02): smoothed, each spot keeping weight 0.5 of its prediction
(``hespotex-ens+stainaug+distinct+smooth50``, from ``--grid smooth``). The rows it needs (the commands in full are in
the report's header)::

    python benchmarks/shift.py run --what hespotex --seeds 0 1 2 \\
        --setting "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, 'stain_augment': True}"
    python benchmarks/shift.py embed --stain-views --patch 200 --workers 1      # context-scale views
    python benchmarks/shift_context.py prepare --context 200                    # two-scale embeddings and views
    python benchmarks/shift.py run --work /tmp/hespotex_shift/context200 --what hespotex --seeds 0 1 2 \\
        --setting "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, 'stain_augment': True}"
    python benchmarks/shift.py run --work /tmp/hespotex_shift/context200 --what hespotex --seeds 0 1 2 \\
        --setting "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, 'stain_augment': True, \\
        'distinct_seeds': True}"
    python benchmarks/shift.py run --work /tmp/hespotex_shift/context200 --what hespotex --seeds 0 1 2 --grid smooth
    python benchmarks/shift.py run [--work /tmp/hespotex_shift/context200] --what baselines --seeds 0 \
        --grid smooth_baselines        # and --grid smooth_tuned_baselines, each with and without --work
    python benchmarks/shift_defaults.py report          # -> benchmarks/results/shift_defaults.md

Every figure is a mean per-gene Pearson, mean over the 5 folds per seed, then mean over seeds with the spread
(max - min of the seed means); only seeds with every fold count. The strongest tuned baseline of a cell is the best
of ridge / retrieval, raw / 6-NN smoothed (α, k tuned on the training sections; smoothed with the spot and its
neighbours alike, ``+smooth``, with the spot at weight 0.5, ``+smooth50`` (``--grid smooth_baselines``), and with
the spot's weight tuned with α / k, ``+smoothcv`` (``--grid smooth_tuned_baselines``)), chosen per cell after the fact
(which favours the baselines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shift  # noqa: E402

SETTING = {"target_norm": "library_modelled", "patch_um": 100.0}
SHARED = "hespotex-ens+stainaug"  # members sharing the seed (the default until 2026-12-02)
MEMBERS = SHARED + "+distinct"  # members with their own seeds (``member_seed``), their mean as the network gives it
FOUR = MEMBERS + "+smooth50"  # ... smoothed as hx.tl.predict smooths by default since 2026-12-02 (session 12)
EIGHT = MEMBERS + "+x2shared"  # 2 members per held-out section, the second on the first's autoencoder, unsmoothed
EIGHT_512 = EIGHT + "+smooth50"  # ... smoothed: hx.tl.train's default from 2026-12-02 (session 13) to 2026-12-03
WIDE = MEMBERS + "+head1024"  # the members' gene heads 1,024 wide (ModelConfig.head_hidden_dim; 512 before)
WIDE_DEFAULT = WIDE + "+x2shared+smooth50"  # 8 members with 1,024-wide heads, smoothed: the default in session 15
ONE_AE = MEMBERS + "+aeall"  # ... all on one autoencoder pre-trained on every section (ModelConfig.ae_samples="all")
DEFAULT = ONE_AE + "+x2shared+smooth50"  # the default since session 16 (2026-12-03)
VARIANTS = (
    "hespotex", "hespotex+stainaug", "hespotex-ens", SHARED, MEMBERS, FOUR, EIGHT, EIGHT_512, WIDE + "+smooth50",
    WIDE + "+x2shared", WIDE_DEFAULT, ONE_AE + "+x2shared", DEFAULT,
)  # fmt: skip
GOAL = 0.02
KEYS = ["method", "fold", "seed", "condition", "truth", "genes"]


def setting_rows(work: Path) -> pd.DataFrame:
    """The rows of the default's setting (no TTA), one per (method, fold, seed, condition, truth, genes): a single
    model scored in an ensemble task and in a single-model task of the same seed is the same model, counted once."""
    rows = shift.load_rows(work)
    rows = rows[(rows["target_norm"] == SETTING["target_norm"]) & (rows["patch_um"] == SETTING["patch_um"])]
    rows = rows[~rows["tta"].astype(bool) & ~rows["genes"].str.startswith("spread_spearman")]
    return rows.drop_duplicates(KEYS).copy()


def single_model_agreement(work: Path) -> pd.DataFrame:
    """The same single model (seed, validation section) scored by an ensemble task and by a single-model task run at
    another time: max |difference| of its scores per seed (0 when training is reproducible across the code
    versions that made the rows)."""
    rows = shift.load_rows(work)
    rows = rows[(rows["target_norm"] == SETTING["target_norm"]) & (rows["patch_um"] == SETTING["patch_um"])]
    rows = rows[rows["method"].isin(["hespotex", "hespotex+stainaug"]) & ~rows["tta"].astype(bool)]
    key = ["method", "fold", "seed", "condition", "truth", "genes"]
    out = []
    for (method, seed), grp in rows.groupby(["method", "seed"]):
        by_task = grp.groupby(grp["members"].eq(1))  # members 1: a single-model task; 4: an ensemble task
        if by_task.ngroups < 2:
            continue
        a, b = (g.set_index(key)["pearson"] for _, g in by_task)
        d = (a - b).dropna()
        if len(d):
            out.append({"method": method, "seed": int(seed), "scores compared": len(d),
                        "folds": d.index.get_level_values("fold").nunique(),
                        "max abs difference": float(d.abs().max())})  # fmt: skip
    return pd.DataFrame(out)


def per_seed(rows: pd.DataFrame, keys: list[str], n_folds: int, n_truths: int = 1) -> pd.DataFrame:
    """Mean over folds (and truths, when not in keys) per seed; seeds missing a fold are dropped."""
    g = rows.groupby([*keys, "seed"])["pearson"].agg(["mean", "count"]).reset_index()
    return g[g["count"] == n_folds * n_truths]


def seed_stats(ps: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    return (
        ps.groupby(keys)["mean"]
        .agg(mean="mean", spread=lambda v: float(v.max() - v.min()), worst="min", seeds="size")
        .reset_index()
    )


def best_baseline(base: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per cell of ``keys``: the strongest baseline (mean over folds, and over truths when not in keys)."""
    m = base.groupby(["method", *keys])["pearson"].mean().reset_index()
    idx = m.groupby(keys)["pearson"].idxmax()
    return m.loc[idx].rename(columns={"pearson": "baseline", "method": "baseline method"}).set_index(keys)


CELL_SUMMARY = [
    "cells ahead (of 24)", f"cells ≥ {GOAL} on the worst seed", "mean margin", "min margin", "max seed spread",
    "cells with spread ≤ 0.01",
]  # fmt: skip


def cell_summary(cells: pd.DataFrame) -> list:
    """The figures of :data:`CELL_SUMMARY` for ``cells``, the raw table of :func:`versus_baseline` over every
    condition x truth x gene set."""
    return [
        int((cells["margin"] > 0).sum()), int((cells["worst-seed margin"] >= GOAL).sum()),
        round(float(cells["margin"].mean()), 4), round(float(cells["margin"].min()), 4),
        round(float(cells["spread"].max()), 4), int((cells["spread"] <= 0.01).sum()),
    ]  # fmt: skip


def versus_baseline(hes: pd.DataFrame, base: pd.DataFrame, method: str, keys: list[str], folds: list[str]):
    """``method``'s mean ± seed spread per cell beside the strongest tuned baseline, margin and worst-seed margin."""
    part = hes[(hes["method"] == method) & hes["fold"].isin(folds)]
    n_truths = 1 if "truth" in keys else 3
    st = seed_stats(per_seed(part, keys, len(folds), n_truths), keys).set_index(keys)
    b = best_baseline(base[base["fold"].isin(folds)], keys)
    t = st.join(b, how="inner")
    t["margin"] = t["mean"] - t["baseline"]
    t["worst-seed margin"] = t["worst"] - t["baseline"]
    t[f"≥ {GOAL}"] = np.where(t["worst-seed margin"] >= GOAL, "yes", np.where(t["margin"] > 0, "ahead", "no"))
    out = pd.DataFrame(
        {
            method: [
                f"{m:.4f} ± {s:.4f} ({int(n)})" for m, s, n in zip(t["mean"], t["spread"], t["seeds"], strict=True)
            ],
            "strongest tuned baseline": [
                f"{v:.4f} {n}" for v, n in zip(t["baseline"], t["baseline method"], strict=True)
            ],
            "margin": t["margin"].round(4),
            "worst-seed margin": t["worst-seed margin"].round(4),
            f"≥ {GOAL}": t[f"≥ {GOAL}"],
        },
        index=t.index,
    )
    return out.reset_index(), t


def spread_table(hes: pd.DataFrame, folds: list[str]) -> pd.DataFrame:
    """Seed spread before (single model) and after (ensemble, +stain augmentation), on the seeds every variant has:
    per condition x genes (mean over truths), and the largest / median spread over the 24 condition x truth x genes
    cells."""
    hes = hes[hes["fold"].isin(folds)]
    variants = [m for m in VARIANTS if m in set(hes["method"])]
    seeds = None
    for m in variants:
        ps = per_seed(hes[hes["method"] == m], ["condition", "truth", "genes"], len(folds))
        s = set(ps["seed"])
        seeds = s if seeds is None else seeds & s
    seeds = sorted(seeds or [])
    part = hes[hes["seed"].isin(seeds)]
    rows = []
    for m in variants:
        sub = part[part["method"] == m]
        over = seed_stats(per_seed(sub, ["condition", "genes"], len(folds), 3), ["condition", "genes"])
        cell = seed_stats(per_seed(sub, ["condition", "truth", "genes"], len(folds)), ["condition", "truth", "genes"])
        row = {"method": m, "seeds": ", ".join(map(str, seeds))}
        for r in over.itertuples():
            row[f"{r.condition} {r.genes}"] = round(r.spread, 4)
        row["max over cells"] = round(cell["spread"].max(), 4)
        row["median over cells"] = round(cell["spread"].median(), 4)
        rows.append(row)
    return pd.DataFrame(rows)


def shared_folds(hes: pd.DataFrame, method: str = DEFAULT) -> tuple[list[str], list[int]]:
    """The folds on which the most seeds (at least 2) of ``method`` are finished, and those seeds (for a partial
    seed comparison while some seeds lack folds); ``([], [])`` when no two seeds share a fold."""
    part = hes[hes["method"] == method]
    by_seed = {int(s): set(g["fold"]) for s, g in part.groupby("seed")}
    best: tuple[list[str], list[int]] = ([], [])
    for s in by_seed:
        folds = by_seed[s]
        seeds = sorted(t for t, f in by_seed.items() if folds <= f)
        if len(seeds) >= 2 and (len(seeds), len(folds)) > (len(best[1]), len(best[0])):
            best = (sorted(folds), seeds)
    return best


def candidate_table(spot: pd.DataFrame, ctx: pd.DataFrame, keys: list[str], method: str = SHARED):
    """Two-scale vs spot-only ``method`` (stain augmentation + ensemble) on the (fold, seed) pairs both have; margins
    against the strongest tuned baseline on either feature set (spot, spot+context) on those folds."""
    a = spot[spot["method"] == method]
    c = ctx[ctx["method"] == method]
    pairs = set(zip(a["fold"], a["seed"], strict=True)) & set(zip(c["fold"], c["seed"], strict=True))
    if not pairs:
        return None, [], []
    by_seed: dict[int, set] = {}
    for fold, seed in pairs:
        by_seed.setdefault(int(seed), set()).add(fold)
    folds = sorted(max(by_seed.values(), key=len))
    seeds = sorted(s for s, f in by_seed.items() if set(folds) <= f)
    n_truths = 1 if "truth" in keys else 3

    def stats(r):
        r = r[r["fold"].isin(folds) & r["seed"].isin(seeds)]
        ps = per_seed(r, keys, len(folds), n_truths)
        return seed_stats(ps, keys).set_index(keys), ps.set_index([*keys, "seed"])["mean"]

    (sa, pa), (sc, pc) = stats(a), stats(c)
    base = pd.concat([spot, ctx])
    base = base[base["method"].str.startswith(("ridge", "retrieval")) & base["fold"].isin(folds)]
    best = base.groupby(["method", "features", *keys])["pearson"].mean().groupby(keys).max()
    gain = (pc - pa).groupby(keys).agg(["mean", "min", "max"])
    t = pd.DataFrame(
        {
            "spot patch only": [f"{m:.4f} ± {s:.4f}" for m, s in zip(sa["mean"], sa["spread"], strict=True)],
            "two-scale+stainaug+ens": [f"{m:.4f} ± {s:.4f}" for m, s in zip(sc["mean"], sc["spread"], strict=True)],
            "gain": gain["mean"].round(4),
            "gain min over seeds": gain["min"].round(4),
            "strongest tuned baseline (either features)": best.reindex(sa.index).round(4),
            "margin spot only": (sa["mean"] - best.reindex(sa.index)).round(4),
            "margin two-scale": (sc["mean"] - best.reindex(sc.index)).round(4),
        },
        index=sa.index,
    )
    return t.reset_index(), folds, seeds


def seed_choice_table(hes: pd.DataFrame, folds: list[str], keys: list[str]) -> pd.DataFrame:
    """Members with their own seeds (the default) vs members sharing the seed, on the seeds both have every fold of:
    each one's mean ± seed spread, and the gain per seed (mean, min, max)."""
    n_truths = 1 if "truth" in keys else 3
    part = hes[hes["fold"].isin(folds)]
    ps = {m: per_seed(part[part["method"] == m], keys, len(folds), n_truths) for m in (SHARED, MEMBERS)}
    seeds = sorted(set(ps[SHARED]["seed"]) & set(ps[MEMBERS]["seed"]))
    if not seeds:
        return pd.DataFrame()
    st = {m: seed_stats(p[p["seed"].isin(seeds)], keys).set_index(keys) for m, p in ps.items()}
    per = {m: p[p["seed"].isin(seeds)].set_index([*keys, "seed"])["mean"] for m, p in ps.items()}
    gain = (per[MEMBERS] - per[SHARED]).groupby(keys).agg(["mean", "min", "max"])
    out = pd.DataFrame(
        {
            "shared seed": [
                f"{m:.4f} ± {s:.4f}" for m, s in zip(st[SHARED]["mean"], st[SHARED]["spread"], strict=True)
            ],
            "own seeds (default)": [
                f"{m:.4f} ± {s:.4f}" for m, s in zip(st[MEMBERS]["mean"], st[MEMBERS]["spread"], strict=True)
            ],
            "gain": gain["mean"].round(4),
            "gain min over seeds": gain["min"].round(4),
            "gain max over seeds": gain["max"].round(4),
        },
        index=st[SHARED].index,
    )
    return out.reset_index()


def thinning_table(rows: pd.DataFrame, hes: pd.DataFrame, base: pd.DataFrame, folds: list[str]) -> pd.DataFrame:
    """Under thinning the image (so every prediction) is the clean one and only the truth is noisier: per truth and
    gene set, the ceiling (the clean truth itself scored against the thinned truth), the default's and the strongest
    baseline's thinned / clean ratio, and the clean margin a thinned margin of ``GOAL`` would need at that ratio."""
    ceil = rows[(rows["method"] == "ceiling") & rows["fold"].isin(folds)]
    if ceil.empty:
        return pd.DataFrame()
    keys = ["truth", "genes"]
    ceiling = ceil.groupby(keys)["pearson"].mean()
    d = hes[(hes["method"] == DEFAULT) & hes["fold"].isin(folds)].groupby(["condition", *keys])["pearson"].mean()
    b = base[base["fold"].isin(folds)].groupby(["method", "condition", *keys])["pearson"].mean()
    best = {c: b.xs(c, level="condition").groupby(keys).max() for c in ("clean", "thinned")}
    ratio = d.xs("thinned", level="condition") / d.xs("clean", level="condition")
    out = pd.DataFrame(
        {
            "ceiling (clean truth vs thinned truth)": ceiling.round(4),
            "default clean": d.xs("clean", level="condition").round(4),
            "default thinned": d.xs("thinned", level="condition").round(4),
            "thinned / clean (default)": ratio.round(3),
            "thinned / clean (strongest baseline)": (best["thinned"] / best["clean"]).round(3),
            "margin clean": (d.xs("clean", level="condition") - best["clean"]).round(4),
            "margin thinned": (d.xs("thinned", level="condition") - best["thinned"]).round(4),
            f"clean margin a thinned {GOAL} needs": (GOAL / ratio).round(4),
        }
    )
    return out.reset_index().sort_values(["genes", "truth"])


MEASURES = {
    "spread_spearman": "spots x genes",
    "spread_spearman_within_gene": "within gene",
    "spread_spearman_gene_pearson": "gene: spread",
    "spread_spearman_gene_relative": "gene: spread / predicted sd",
    "spread_spearman_gene_agreement": "gene: member agreement",
    "spread_spearman_gene_predicted_sd": "gene: predicted sd (reference)",
}


def spread_ranks_errors(work: Path) -> pd.DataFrame:
    """Does the default's ensemble spread (the ``hespotex_spread`` layer; measured on its unsmoothed members) rank
    its errors? Per held-out slide (the model's own targets), :func:`shift.spread_vs_error`'s Spearman measures
    (``MEASURES``); mean [min, max] over folds and seeds, per condition; the number of slides per measure."""
    rows = shift.load_rows(work)
    rows = rows[rows["genes"].isin(list(MEASURES)) & (rows["method"] == MEMBERS) & ~rows["tta"].astype(bool)]
    rows = rows[(rows["target_norm"] == SETTING["target_norm"]) & (rows["patch_um"] == SETTING["patch_um"])]
    if rows.empty:
        return pd.DataFrame()
    rows = rows.drop_duplicates(["condition", "genes", "fold", "seed"])  # the same model rescored by a later task
    g = rows.groupby(["condition", "genes"])["pearson"].agg(["mean", "min", "max", "size"])
    cell = g.apply(lambda r: f"{r['mean']:.3f} [{r['min']:.3f}, {r['max']:.3f}] ({int(r['size'])})", axis=1)
    t = cell.unstack("genes").reindex(columns=[m for m in MEASURES if m in set(rows["genes"])])
    return t.rename(columns=MEASURES).reset_index()


def labelled_baselines(rows: pd.DataFrame, features: str) -> pd.DataFrame:
    """The tuned baselines' rows, their method named with the features they were fitted on."""
    base = rows[rows["method"].str.startswith(("ridge", "retrieval")) & ~rows["stain_augment"]].copy()
    base["method"] = base["method"] + f" ({features})"
    return base


def cmd_report(args) -> None:
    from hespotex.datasets._her2st import her2st_sections

    work = Path(args.work)
    folds = list(her2st_sections(args.data))
    ctx_work = work / f"context{args.context:g}"
    spot_rows = setting_rows(work)
    rows = setting_rows(ctx_work) if args.default == "two-scale" else spot_rows
    hes = rows[rows["method"].isin(VARIANTS)]
    base = labelled_baselines(spot_rows, "spot")
    if (ctx_work / "rows").is_dir():  # the baselines on the two-scale features too: the strongest of either counts
        base = pd.concat([base, labelled_baselines(setting_rows(ctx_work), "spot+context")])
    main_t, raw = versus_baseline(hes, base, DEFAULT, ["condition", "truth", "genes"], folds)
    main_t = main_t.sort_values(["genes", "condition", "truth"])
    mean_t, _ = versus_baseline(hes, base, DEFAULT, ["condition", "genes"], folds)
    mean_t = mean_t.sort_values(["genes", "condition"])
    seeds = sorted(
        per_seed(hes[hes["method"] == DEFAULT], ["condition", "truth", "genes"], len(folds))["seed"].unique()
    )
    others = []
    for m in [v for v in VARIANTS[:-1] if v in set(hes["method"])]:
        t, _ = versus_baseline(hes, base, m, ["condition", "genes"], folds)
        others.append(t.assign(method=m).rename(columns={m: "mean ± spread (seeds)"}))
    others_t = pd.concat(others)[["method", "condition", "genes", "mean ± spread (seeds)", "margin",
                                  "worst-seed margin"]].sort_values(["genes", "condition", "method"])  # fmt: skip
    agree = single_model_agreement(work)
    sub_folds, sub_seeds = shared_folds(hes)
    if sub_folds == folds or len(sub_seeds) <= len(seeds):
        sub_folds = []  # every fold has these seeds: the tables above already use them
    fit = rows[rows["method"] == DEFAULT].drop_duplicates(["fold", "seed"])
    fit = fit.groupby("seed")["fit_seconds"].agg(["mean", "min", "max", "size"])
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    n_cells = len(raw)
    scales = (
        "two-scale embeddings (the 100 µm spot patch, the spot diameter, and a 200 µm context patch through the "
        "same encoder, concatenated; `context_um='auto'`)"
        if args.default == "two-scale"
        else "100 µm patches (the spot diameter)"
    )
    lines = [
        "# The defaults of `hx.tl.train` on the shift benchmark vs the strongest tuned baseline",
        "",
        "Commands (2-core machine, 2 dask workers of 1 torch thread each; the work folders rebuilt from scratch "
        "in one session):  ",
        "`python benchmarks/shift.py embed --encoder efficientnet_lite0.imagenet --workers 2` (the head's features, "
        "the default encoder until session 17; `shift_encoder.md` has the default since), `python "
        "benchmarks/shift.py embed --stain-views --patch 100 200 --workers 2`, `python benchmarks/shift_context.py "
        "prepare --context 200` (embeddings, stain views and their two-scale concatenations);  ",
        "`python benchmarks/shift.py run --what baselines --seeds 0 --setting \"{'target_norm': 'library_modelled', "
        "'patch_um': 100.0, 'tta': False}\"` and the same with `--work /tmp/hespotex_shift/context200` (tuned "
        "baselines on either feature set, and the thinning ceiling), and the same two with `--grid smooth_baselines` "
        "(their smoothed predictions also with the spot at weight 0.5, `+smooth50`: 2026-12-02, session 11) and "
        "with `--grid smooth_tuned_baselines` (the weight the spot keeps tuned with α / k on the training sections, "
        "`+smoothcv`: 2026-12-02, session 12);  ",
        "`python benchmarks/shift.py run --what hespotex --seeds S --setting \"{'target_norm': 'library_modelled', "
        "'patch_um': 100.0, 'tta': False, 'stain_augment': True}\"` for S = 0, 1, 2, with and without `--work "
        "/tmp/hespotex_shift/context200` (4-member ensembles whose members share the seed, and their single model, "
        "single- and two-scale), and with `--work /tmp/hespotex_shift/context200 --seeds 0 1 2 --setting "
        "\"{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, 'stain_augment': True, "
        "'distinct_seeds': True}\"` (each member its own seed), and with `--work /tmp/hespotex_shift/context200 "
        "--seeds 0 1 2 --grid smooth` (the same members, their prediction also smoothed) and with `--work "
        "/tmp/hespotex_shift/context200 --seeds 0 1 2 --grid rounds2_shared` (a second member per held-out section "
        "on the first's autoencoder) and with `--work /tmp/hespotex_shift/context200 --seeds 0 1 2 --setting "
        "\"{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, 'stain_augment': True, "
        "'distinct_seeds': True, 'smooth_predict': True, 'rounds': 4, 'shared_ae': True, 'config': 'head1024'}\"` "
        "(the same with the gene heads 1,024 wide, `+head1024`, up to 4 members per section: the default in "
        "session 15 was its first 2 per section; `shift_members.md`) and with `--work /tmp/hespotex_shift/context200 "
        "--seeds 0 1 2 --setting \"{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, "
        "'stain_augment': True, 'distinct_seeds': True, 'smooth_predict': True, 'rounds': 2, 'shared_ae': True, "
        "'config': 'aeall'}\"` (the same 8 members on one autoencoder pre-trained on every training section, "
        "`+aeall`: the default since session 16);  ",
        f"`{cmd}`. The per-task rows these tables read are kept in `benchmarks/results/shift_rows` (the work "
        "folders' `rows/` and `context200/rows/`, copied there after the runs): `python benchmarks/shift_defaults.py "
        "report --work benchmarks/results/shift_rows` rebuilds this file without training anything.",
        "",
        f"The default = `hx.tl.train(sections, genes=panel)` as it stands: targets `library_modelled`, {scales}, "
        "EfficientNet-Lite0 (ImageNet, frozen), an ensemble of 8 members, 2 per held-out validation section, "
        "each with its own seed derived from the one given (`member_seed`), all on one autoencoder pre-trained on "
        "the expression of every training section, the held-out ones too (`ModelConfig.ae_samples='all'`), their "
        "gene heads 1,024 wide (`ModelConfig.head_hidden_dim`; `hespotex-ens+stainaug+distinct+aeall+x2shared` in "
        "the rows; with an autoencoder per held-out section on the other 3, the second member of each section on "
        "the first's, the default in session 15: `...+distinct+head1024+x2shared`; with 512-wide heads, the "
        "default until 2026-12-03: `hespotex-ens+stainaug+distinct+x2shared`; the 4 first members alone: "
        "`...+distinct`, the default until 2026-12-02), "
        "each trained on the clean embedding and 4 HED-jittered views per spot (one drawn per spot "
        "per epoch); prediction on the clean embedding of the held-out section, smoothed as `hx.tl.predict` "
        "smooths by default since 2026-12-02 (session 12): each spot keeps weight 0.5 of its prediction and its 6 "
        "nearest spots share the rest (`+smooth50`; the unsmoothed ensembles among the other variants). "
        "Leave-one-section-out over "
        "her2st C2-C6; conditions `clean`, `thinned` (~650 counts per spot), `restained` (HED gain/shift, blur, "
        "JPEG q40), `rescaled` (µm/px 10 % off); truths `lib_all`, `lib_scored`, `log1p_raw` (see shift.md). "
        "Score: mean per-gene Pearson over the top-50 HVG / all 785 modelled genes; per seed the mean over the 5 "
        "folds, then `mean ± spread (seeds)` with spread = max - min of the seed means. `strongest tuned "
        "baseline` = the best of ridge / retrieval, raw / 6-NN smoothed (`+smooth`: the spot and its neighbours "
        "alike; `+smooth50`: the spot at 0.5; `+smoothcv`: the spot's weight tuned too; α and k by "
        "leave-one-training-section-out, same targets), on the single-scale `(spot)` or two-scale "
        "`(spot+context)` features, picked per cell after the fact; `margin` = default mean - baseline; "
        f"`worst-seed margin` = the default's worst seed - baseline; `≥ {GOAL}`: `yes` when even the worst seed "
        f"is ≥ {GOAL} ahead (the issue's goal), `ahead` when the mean is ahead by less, `no` when behind.",
        "",
        f"## The default vs the strongest tuned baseline, every condition x truth x gene set (seeds "
        f"{', '.join(map(str, seeds))}; {n_cells} cells)",
        "",
        main_t.to_markdown(index=False),
        "",
        f"Cells ahead of the strongest baseline: {int((raw['margin'] > 0).sum())} / {n_cells}; by ≥ {GOAL} on the "
        f"mean: {int((raw['margin'] >= GOAL).sum())}; by ≥ {GOAL} on the worst seed: "
        f"{int((raw['worst-seed margin'] >= GOAL).sum())}. Margin: mean {raw['margin'].mean():.4f}, min "
        f"{raw['margin'].min():.4f}, max {raw['margin'].max():.4f}."
        + (
            f" Seed spread of the default: max {raw['spread'].max():.4f}, median {raw['spread'].median():.4f} (goal "
            f"≤ 0.01: {int((raw['spread'] <= 0.01).sum())} / {n_cells} cells)."
            if len(seeds) > 1
            else ""
        ),
        "",
        "## Mean over the three truths",
        "",
        mean_t.to_markdown(index=False),
        "",
        "## Seed spread before and after (spread = max - min over seeds of the 5-fold mean; the same seeds for "
        "every variant)",
        "",
        spread_table(hes, folds).to_markdown(index=False)
        if len(seeds) > 1
        else "The default has one seed on every fold: see the partial comparison below for its spread.",
        "",
        "## The other variants against the same baselines (mean over the three truths)",
        "",
        others_t.to_markdown(index=False),
        "",
    ]
    choice = seed_choice_table(hes, folds, ["condition", "genes"])
    if len(choice):
        lines += [
            "## Members with their own seeds (the default since 2026-12-02) vs members sharing the seed",
            "",
            "Until 2026-12-02 every member of an ensemble was trained with the seed given to `hx.tl.train`, so all "
            "started from the same weights and differed only in the section held out for early stopping. Now each "
            "member trains with `member_seed(seed, its training samples)` (numpy `SeedSequence` of the seed and the "
            "samples' "
            "names: members of one ensemble differ, and folds that train a member on the same samples share its "
            "pre-trained autoencoder). Same folds, seeds and "
            "embeddings; `gain` = own seeds - shared seed per seed (mean, min, max over seeds). Mean over the three "
            "truths:",
            "",
            choice.sort_values(["genes", "condition"]).to_markdown(index=False),
            "",
        ]
    ranks = spread_ranks_errors(ctx_work if args.default == "two-scale" else work)
    if len(ranks):
        lines += [
            "## Does the default's spread rank its errors? (uncertainty users can act on)",
            "",
            "Measured on the 4-member ensemble (one member per held-out section, unsmoothed: the default until "
            "2026-12-02; the 8-member runs did not record it). "
            "Per held-out slide, Spearman correlations between what the ensemble says of itself and how wrong it "
            "is (the model's own `library_modelled` targets; `shift.spread_vs_error`). Spots: the members' standard "
            "deviation (`layers['hespotex_spread']` after `hx.tl.predict`) vs the absolute error of the ensemble mean, "
            "over every spot x gene of the slide (`spots x genes`) and over the spots of each gene, then the mean over "
            "genes (`within gene`: does the spread say which spots of a gene to trust?). Genes (which genes to "
            "trust?): over genes, the gene's Pearson with the truth vs its mean spread (`gene: spread`), its mean "
            "spread over the standard deviation of its prediction across spots (`gene: spread / predicted sd`), the "
            "members' agreement, their mean pairwise Pearson across spots (`gene: member agreement`, "
            "`var['hespotex_agreement']` after `hx.tl.predict`), and, as a reference that needs no ensemble, the "
            "standard deviation of the prediction across spots (`gene: predicted sd`). Cells: mean [min, max] over "
            "folds x seeds (slides).",
            "",
            ranks.to_markdown(index=False),
            "",
        ]
    thin = thinning_table(rows, hes, base, folds)
    if len(thin):
        lines += [
            "## Why the thinned margins are small: the truth, not the prediction, changes",
            "",
            "Under `thinned` the held-out image is the clean one, so every method predicts exactly what it predicts on "
            "`clean`; only the truth is recomputed from ~650 counts per spot. Binomial noise in the truth scales every "
            "correlation down by about the same factor, margins included. `ceiling` scores the clean truth itself "
            "(what a perfect predictor of the deep section would produce) against the thinned truth: no image "
            "model can be expected to reach it. The last column is the clean-section margin that would carry "
            f"through to a {GOAL} margin under thinning at the default's ratio (mean over folds and seeds).",
            "",
            thin.to_markdown(index=False),
            "",
        ]
    if sub_folds:
        sub_hes = hes[hes["seed"].isin(sub_seeds)]
        sub_t, _ = versus_baseline(sub_hes, base, DEFAULT, ["condition", "genes"], sub_folds)
        sub_cells, sub_cells_raw = versus_baseline(sub_hes, base, DEFAULT, ["condition", "truth", "genes"], sub_folds)
        lines += [
            f"## Partial: seeds {', '.join(map(str, sub_seeds))} on the folds they share ({', '.join(sub_folds)})",
            "",
            "The default's further seeds did not finish on every fold in this session's compute; on the folds they "
            "did finish, every method is restricted to those folds and seeds (the baseline too).",
            "",
            "### The default vs the strongest tuned baseline (mean over the three truths)",
            "",
            sub_t.sort_values(["genes", "condition"]).to_markdown(index=False),
            "",
            f"Per condition x truth x gene set on these folds: ahead in {int((sub_cells_raw['margin'] > 0).sum())} / "
            f"{len(sub_cells_raw)} cells, by ≥ {GOAL} (mean) in {int((sub_cells_raw['margin'] >= GOAL).sum())}, "
            f"by ≥ {GOAL} (worst seed) in {int((sub_cells_raw['worst-seed margin'] >= GOAL).sum())}; margin mean "
            f"{sub_cells_raw['margin'].mean():.4f}, min {sub_cells_raw['margin'].min():.4f}; seed spread max "
            f"{sub_cells_raw['spread'].max():.4f}, median {sub_cells_raw['spread'].median():.4f}.",
            "",
            "### Seed spread before and after on these folds and seeds",
            "",
            spread_table(sub_hes, sub_folds).to_markdown(index=False),
            "",
            "### Per condition x truth x gene set",
            "",
            sub_cells.sort_values(["genes", "condition", "truth"]).to_markdown(index=False),
            "",
        ]
    if len(agree):
        lines += [
            "## Reproducibility: the same single model from two runs",
            "",
            "The ensemble task of a seed also scores its single model (the member whose validation section the seed "
            "picks), which a single-model task of the same seed, run at another time (older code version), "
            "trained too:",
            "",
            agree.to_markdown(index=False),
            "",
        ]
    if len(fit):
        fit.columns = ["mean", "min", "max", "folds"]
        lines += [
            "## Training time of the default per fold (8 members on one autoencoder, stain views, 1 torch thread, "
            "two tasks at a time on 2 cores), s",
            "",
            "Each task pre-trained its one autoencoder (on the fold's 4 training sections; none was cached), then "
            "the 8 members' joint stages and the predictions of the 4 conditions; "
            "`benchmarks/results/shared_autoencoder_time.md` compares the ensembles' training side by side and "
            "`benchmarks/results/her2st_cv.md` times the default from an empty cache.",
            "",
            fit.round(0).reset_index().to_markdown(index=False),
            "",
        ]
    if (ctx_work / "rows").is_dir():
        spot = spot_rows.assign(features="spot")
        ctx = setting_rows(ctx_work).assign(features="spot+context")
        ctx_base = ctx[ctx["method"].str.startswith(("ridge", "retrieval")) & ~ctx["stain_augment"]]
        spot_base = spot[spot["method"].str.startswith(("ridge", "retrieval")) & ~spot["stain_augment"]]
        a = pd.concat([spot[spot["method"] == SHARED], spot_base])
        c = pd.concat([ctx[ctx["method"] == SHARED], ctx_base])
        cm, cf, cs = candidate_table(a, c, ["condition", "genes"])
        if cm is not None:
            ct, _, _ = candidate_table(a, c, ["condition", "truth", "genes"])
            lines += [
                f"## Two scales ({args.context:g} µm context) vs the spot patch alone, both stain-augmented "
                f"ensembles whose members share the seed (folds {', '.join(cf)}; seeds {', '.join(map(str, cs))})",
                "",
                "`hx.pp.embed(..., patch_um=100, context_um=" + f"{args.context:g}" + ", stain_augment=4)`: the spot "
                "and context features concatenated (2560 wide), the stain views likewise view by view (the same "
                "seeded re-staining at both scales; `tests/test_pp_context.py::"
                "test_context_with_stain_views_concatenates_view_by_view`); trained as the default otherwise. The "
                "baseline is the strongest on either feature set (the baselines gain from the context features "
                "too). `gain` = two-scale - spot only per seed, mean (and min over seeds). Measured before members "
                "had seeds of their own (the distinct-seed runs exist at two scales only).",
                "",
                "### Mean over the three truths",
                "",
                cm.sort_values(["genes", "condition"]).to_markdown(index=False),
                "",
                "### Per truth",
                "",
                ct.sort_values(["genes", "condition", "truth"]).to_markdown(index=False),
                "",
            ]
    shift.write_keeping_conclusion("\n".join(lines), args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["report"])
    parser.add_argument("--data", default=None)
    parser.add_argument("--work", default="/tmp/hespotex_shift")
    parser.add_argument("--context", type=float, default=200.0, help="context patch side of the candidate, µm")
    parser.add_argument(
        "--default",
        choices=["single-scale", "two-scale"],
        default="two-scale",
        help="which rows are the default's: the single-scale work folder or its context folder",
    )
    parser.add_argument("--out", default="benchmarks/results/shift_defaults.md")
    args = parser.parse_args()
    {"report": cmd_report}[args.stage](args)


if __name__ == "__main__":
    main()
