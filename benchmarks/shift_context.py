"""Shift benchmark of two-scale (spot + context) embeddings, against the single-scale ones and tuned baselines.

The same leave-one-section-out benchmark as ``benchmarks/shift.py`` (her2st C2-C6, conditions clean /
thinned / restained / rescaled, truths lib_all / lib_scored / log1p_raw; see its docstring), with
hespotex trained on the two-scale embeddings of :func:`hespotex.pp.embed` ``(..., context_um=C)``:
the 100 µm spot patch and a C µm context patch through the same frozen encoder, concatenated. The
ridge / retrieval baselines are tuned and fitted on the same concatenated features (and reported on
the single-scale ones too), so the comparison gives every method the same information.

The two-scale features of each (section, image condition) are the concatenation of the cached
single-scale embeddings of ``shift.py embed`` at 100 µm and at C µm, which is what
``hx.pp.embed(..., patch_um=100, context_um=C)`` computes (``verify`` checks it on one section and
``tests/test_pp_context.py`` in general). They are written to their own work folder, so the
single-scale work files are never touched, and ``shift.py run`` trains and scores on them::

    python benchmarks/shift.py embed --patch 200 --workers 1                  # context-scale embeddings
    python benchmarks/shift_context.py prepare --context 200                  # -> /tmp/hespotex_shift/context200/emb
    python benchmarks/shift_context.py verify --context 200 --section C6      # hx.pp.embed(context_um=) == concat
    python benchmarks/shift.py run --work /tmp/hespotex_shift/context200 --workers 1 --what hespotex --seeds 0 \\
        --setting "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False}"
    python benchmarks/shift.py run --work /tmp/hespotex_shift/context200 --workers 1 --what single --seeds 1 2 \\
        --setting "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False}"
    python benchmarks/shift_context.py report --context 200 --out benchmarks/results/shift_context.md

With the stain-augmented views of the clean sections at both scales (``shift.py embed --stain-views --patch 100``
and ``--patch 200``), ``prepare`` also writes their two-scale views (view by view, as ``hx.pp.embed(...,
context_um=C, stain_augment=4)`` does), so ``shift.py run --work .../context200 --setting "{..., 'stain_augment':
True}"`` trains the two-scale + stain augmentation + ensemble candidate; ``benchmarks/shift_defaults.py report``
compares it with the default. This report covers the runs without stain augmentation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shift  # noqa: E402  (the benchmark's data, conditions and tasks)

SPOT_UM = 100.0
SETTING = {"target_norm": "library_modelled", "patch_um": SPOT_UM, "tta": False}


def context_work(work: Path, context: float) -> Path:
    return work / f"context{context:g}"


def cmd_prepare(args) -> None:
    """Concatenate the cached 100 µm and context-scale embeddings of every (section, image condition)."""
    from hespotex.datasets._her2st import her2st_sections

    work = Path(args.work)
    out = context_work(work, args.context)
    shift.claim_work(out, shift.work_encoder(work))  # the two-scale folder records the encoder it comes from
    n = n_views = 0
    for sid in her2st_sections(args.data):
        for cond in ("clean", "restained", "rescaled"):
            spot = shift.embedding_path(work, sid, cond, SPOT_UM, args.tta)
            wide = shift.embedding_path(work, sid, cond, args.context, args.tta)
            target = shift.embedding_path(out, sid, cond, SPOT_UM, args.tta)  # shift.run_task reads this name
            if not (spot.is_file() and wide.is_file()):
                print(f"skip {sid} {cond}: missing {spot.name if not spot.is_file() else wide.name}")
                continue
            a, b = np.load(spot), np.load(wide)
            if a.shape[0] != b.shape[0]:
                msg = f"{sid} {cond}: {a.shape[0]} spots at {SPOT_UM:g} µm but {b.shape[0]} at {args.context:g} µm."
                raise ValueError(msg)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp.npy")
            np.save(tmp, np.concatenate([a, b], axis=1))
            os.replace(tmp, target)
            seconds = sum(float(p.with_suffix(".seconds").read_text()) for p in (spot, wide))
            target.with_suffix(".seconds").write_text(f"{seconds:.1f}")
            n += 1
        n_views += prepare_views(work, out, sid, args.context, args.tta, args.scale_augment, args.dihedral)
    print(f"{n} two-scale embeddings and {n_views} two-scale stain views in {out / 'emb'}")


def prepare_views(
    work: Path,
    out: Path,
    sid: str,
    context: float,
    tta: bool = False,
    scale_augment: float = 0.0,
    dihedral: bool = False,
) -> int:
    """Concatenate the stain-augmented views of the clean section at both scales, view by view (what
    ``hx.pp.embed(..., patch_um=100, context_um=C, stain_augment=4)`` computes: the same seeded re-staining of a
    spot at both scales); 0 when either scale's views are missing (``shift.py embed --stain-views --patch P``)."""
    spot = shift.views_path(work, sid, SPOT_UM, tta, scale_augment, dihedral)
    wide = shift.views_path(work, sid, context, tta, scale_augment, dihedral)
    target = shift.views_path(out, sid, SPOT_UM, tta, scale_augment, dihedral)  # shift.run_task reads this name
    if not (spot.is_file() and wide.is_file()):
        return 0
    a, b = np.load(spot), np.load(wide)
    if a.shape[:2] != b.shape[:2]:
        msg = f"{sid}: stain views {a.shape} at {SPOT_UM:g} µm but {b.shape} at {context:g} µm (spots x views x dim)."
        raise ValueError(msg)
    tmp = target.with_suffix(".tmp.npy")
    np.save(tmp, np.concatenate([a, b], axis=2))
    os.replace(tmp, target)
    seconds = sum(float(p.with_suffix(".seconds").read_text()) for p in (spot, wide))
    target.with_suffix(".seconds").write_text(f"{seconds:.1f}")
    return 1


def cmd_verify(args) -> None:
    """``hx.pp.embed(..., context_um=)`` on one clean section equals the concatenation the benchmark uses."""
    import dask

    import hespotex as hx

    hx.settings.progress = False
    work = Path(args.work)
    sdata = shift.load_section(args.section, "clean", args.data, work)
    t0 = time.perf_counter()
    with dask.config.set(scheduler="synchronous"):
        hx.pp.embed(
            sdata,
            encoder=shift.work_encoder(work),
            patch_um=SPOT_UM,
            context_um=args.context,
            key_added="X",
            cache=False,
        )
    got = sdata.tables["table"].obsm["X"]
    want = np.load(shift.embedding_path(context_work(work, args.context), args.section, "clean", SPOT_UM, False))
    diff = float(np.abs(got - want).max())
    print(f"{args.section}: hx.pp.embed(context_um={args.context:g}) in {time.perf_counter() - t0:.0f} s, "
          f"shape {got.shape}, max |difference| to the benchmark's features {diff:.2e}")  # fmt: skip
    if diff > 1e-4:
        raise SystemExit(1)


def _rows(work: Path, label: str) -> pd.DataFrame:
    rows = shift.load_rows(work)
    rows = rows[~rows["stain_augment"] & ~rows["genes"].str.startswith("spread_spearman")]
    rows = rows[(rows["target_norm"] == SETTING["target_norm"]) & (rows["patch_um"] == SPOT_UM) & ~rows["tta"]]
    rows = rows.copy()
    rows["features"] = label
    return rows


def _seed_table(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean over folds (and truths, when not in keys) per seed; then mean, spread (max - min) and count of seeds."""
    per_seed = rows.groupby([*keys, "seed"])["pearson"].mean().reset_index()
    return per_seed.groupby(keys)["pearson"].agg(mean="mean", spread=lambda v: float(v.max() - v.min()), seeds="size")


def _paired(hes: pd.DataFrame, method: str) -> tuple[pd.DataFrame, list[str], list[int]]:
    """The rows of ``method`` on the (fold, seed) pairs both feature sets have, restricted to the seeds that have
    every such fold (so seeds and feature sets are compared on the same folds)."""
    part = hes[hes["method"] == method]
    pairs = [set(zip(g["fold"], g["seed"], strict=True)) for _, g in part.groupby("features")]
    common = set.intersection(*pairs) if len(pairs) == 2 else set()
    by_seed: dict[int, set] = {}
    for fold, seed in common:
        by_seed.setdefault(int(seed), set()).add(fold)
    if not by_seed:
        return part.iloc[:0], [], []
    folds = max(by_seed.values(), key=len)
    seeds = sorted(s for s, f in by_seed.items() if f >= folds)
    keep = part["fold"].isin(folds) & part["seed"].isin(seeds)
    return part[keep], sorted(folds), seeds


def _compare(hes: pd.DataFrame, base: pd.DataFrame, method: str, keys: list[str]) -> pd.DataFrame:
    """hespotex `method` on both feature sets vs the best tuned baseline on each, per `keys` (mean over the rest)."""
    h = _seed_table(hes, ["features", *keys])
    b = base.groupby(["features", "method", *keys])["pearson"].mean()
    out = []
    for k in h.reset_index()[keys].drop_duplicates().itertuples(index=False):
        row = dict(zip(keys, k, strict=True))
        mean = {}
        for feat in ("spot", "spot+context"):
            r = h.loc[(feat, *k)] if (feat, *k) in h.index else None
            if r is not None:
                mean[feat] = r["mean"]
                row[f"{method} ({feat})"] = f"{r['mean']:.4f} ± {r['spread']:.4f}"
            cell = b.xs(feat, level="features")
            cell = cell[[tuple(i[1:]) == tuple(k) for i in cell.index]]
            if len(cell):
                best = cell.idxmax()
                mean[f"base {feat}"] = float(cell.max())
                row[f"best baseline ({feat})"] = f"{cell.max():.4f} {best[0]}"
        if "spot" in mean and "spot+context" in mean:
            row["gain (context)"] = round(mean["spot+context"] - mean["spot"], 4)
        strongest = max(mean.get("base spot", -np.inf), mean.get("base spot+context", -np.inf))
        for feat in ("spot", "spot+context"):
            if feat in mean:
                row[f"margin ({feat})"] = round(mean[feat] - strongest, 4)
        out.append(row)
    return pd.DataFrame(out)


def cmd_report(args) -> None:
    from _common import write_report

    work = Path(args.work)
    rows = pd.concat([_rows(work, "spot"), _rows(context_work(work, args.context), "spot+context")], ignore_index=True)
    # the single model of a "hespotex" (ensemble) task and of a "single" task with the same seed is the same model
    hes = rows[rows["method"].isin(["hespotex", "hespotex-ens"])].drop_duplicates(
        ["features", "method", "fold", "seed", "condition", "truth", "genes"]
    )
    base = rows[rows["method"].str.startswith(("ridge", "retrieval"))]
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    ctx = f"{args.context:g}"
    lines = [
        f"# Shift benchmark: two-scale embeddings (100 µm spot + {ctx} µm context) vs the spot patch alone",
        "",
        "Commands (2-core machine shared with other jobs, load 12-15 during the runs; `nice -n 10`, 1 dask worker, "
        "1 torch thread):  ",
        "`python benchmarks/shift.py embed --patch 200 --workers 1` (context-scale embeddings of the restained and "
        "rescaled sections; the clean ones were cached by shift.md's run);  ",
        f"`python benchmarks/shift_context.py prepare --context {ctx}`;  ",
        f"`python benchmarks/shift_context.py verify --context {ctx} --section C6` (`hx.pp.embed(..., patch_um=100, "
        f"context_um={ctx})` on C6 equals the benchmark's features: max |difference| 0);  ",
        f"`python benchmarks/shift.py run --work /tmp/hespotex_shift/context{ctx} --workers 1 "
        "--what hespotex --seeds 0 "
        "--setting \"{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False}\"` (tuned baselines on the "
        "concatenated features for every fold; the 4-member ensemble of fold C2, then stopped for time);  ",
        f"`python benchmarks/shift.py run --work /tmp/hespotex_shift/context{ctx} --workers 1 --what single --seeds 0 "
        "--folds C3 C4 C5 C6 --setting ...`, `... --what single --seeds 1 --setting ...` and `... --seeds 2 ...` "
        "(single models);  ",
        f"`{cmd}`.",
        "",
        "Setting: targets `library_modelled`, spot patch 100 µm (the spot diameter), EfficientNet-Lite0 (ImageNet, "
        "frozen), the held-out section as is and under the emulated shifts of `shift.md`. `(spot)`: the "
        "single-scale features of `shift.md` (1280 wide); `(spot+context)`: "
        f"`hx.pp.embed(..., patch_um=100, context_um={ctx})`, the spot and context features concatenated (2560 "
        "wide), for hespotex and the baselines alike. hespotex = one model (validation section chosen by the seed, "
        "as `hx.tl.train` does), hespotex-ens = mean of 4 members (one per held-out validation section). Both "
        "feature sets are compared on the same folds and seeds (given per table); `±` = spread (max - min) of the "
        "seed means (0 with one seed). Baselines (ridge, retrieval; raw and 6-NN smoothed; α / k tuned by "
        "leave-one-training-section-out, fitted to the same targets) are deterministic; `best baseline` is the "
        "strongest of the four per cell and feature set; `margin` is against the stronger of the two.",
        "",
    ]
    for method in ("hespotex", "hespotex-ens"):
        part, folds, seeds = _paired(hes, method)
        if not folds:
            continue
        b = base[base["fold"].isin(folds)]
        what = f"{method}: folds {', '.join(folds)}; seeds {', '.join(map(str, seeds))}"
        lines += [
            f"## {what}",
            "",
            "### Mean over conditions and truths",
            "",
            _compare(part, b, method, ["genes"]).to_markdown(index=False),
            "",
            "### Per condition (mean over the three truths)",
            "",
            _compare(part, b, method, ["condition", "genes"])
            .sort_values(["genes", "condition"])
            .to_markdown(index=False),
            "",
            "### Per condition and truth",
            "",
            _compare(part, b, method, ["condition", "truth", "genes"])
            .sort_values(["genes", "condition", "truth"])
            .to_markdown(index=False),
            "",
        ]
    base_tab = base.groupby(["features", "method", "genes", "condition"])["pearson"].mean().unstack("condition")
    base_tab = base_tab[[c for c in shift.CONDITIONS if c in base_tab]].round(4).reset_index()
    chosen = base.groupby(["features", "method"])["chosen"].agg(lambda v: ", ".join(sorted(set(v)))).reset_index()
    lines += [
        "## Tuned baselines on either feature set (all folds, mean over truths)",
        "",
        base_tab.sort_values(["genes", "method", "features"]).to_markdown(index=False),
        "",
        chosen.to_markdown(index=False),
        "",
    ]
    write_report("\n".join(lines), args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "verify", "report"])
    parser.add_argument("--data", default=None)
    parser.add_argument("--work", default="/tmp/hespotex_shift")
    parser.add_argument("--context", type=float, default=200.0, help="context patch side in µm")
    parser.add_argument(
        "--scale-augment", type=float, default=0.0, help="prepare: the views of `shift.py embed --scale-augment A`"
    )
    parser.add_argument("--dihedral", action="store_true", help="prepare: the views of `shift.py embed --dihedral`")
    parser.add_argument("--section", default="C6", help="verify: the section to embed")
    parser.add_argument(
        "--tta", type=int, default=0, help="prepare: 1 = concatenate the TTA embeddings and views (shift.py --tta 1)"
    )
    parser.add_argument("--out", default="benchmarks/results/shift_context.md")
    args = parser.parse_args()
    args.tta = bool(args.tta)
    {"prepare": cmd_prepare, "verify": cmd_verify, "report": cmd_report}[args.stage](args)


if __name__ == "__main__":
    main()
