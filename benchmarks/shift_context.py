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
    n = 0
    for sid in her2st_sections(args.data):
        for cond in ("clean", "restained", "rescaled"):
            spot = shift.embedding_path(work, sid, cond, SPOT_UM, False)
            wide = shift.embedding_path(work, sid, cond, args.context, False)
            target = shift.embedding_path(out, sid, cond, SPOT_UM, False)  # shift.run_task reads this name
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
    print(f"{n} two-scale embeddings in {out / 'emb'}")


def cmd_verify(args) -> None:
    """``hx.pp.embed(..., context_um=)`` on one clean section equals the concatenation the benchmark uses."""
    import dask

    import hespotex as hx

    hx.settings.progress = False
    work = Path(args.work)
    sdata = shift.load_section(args.section, "clean", args.data, work)
    t0 = time.perf_counter()
    with dask.config.set(scheduler="synchronous"):
        hx.pp.embed(sdata, encoder=shift.ENCODER, patch_um=SPOT_UM, context_um=args.context, key_added="X", cache=False)
    got = sdata.tables["table"].obsm["X"]
    want = np.load(shift.embedding_path(context_work(work, args.context), args.section, "clean", SPOT_UM, False))
    diff = float(np.abs(got - want).max())
    print(f"{args.section}: hx.pp.embed(context_um={args.context:g}) in {time.perf_counter() - t0:.0f} s, "
          f"shape {got.shape}, max |difference| to the benchmark's features {diff:.2e}")  # fmt: skip
    if diff > 1e-4:
        raise SystemExit(1)


def _rows(work: Path, label: str) -> pd.DataFrame:
    rows = shift.load_rows(work)
    rows = rows[~rows["stain_augment"] & (rows["genes"] != "spread_spearman")]
    rows = rows[(rows["target_norm"] == SETTING["target_norm"]) & (rows["patch_um"] == SPOT_UM) & ~rows["tta"]]
    rows = rows.copy()
    rows["features"] = label
    return rows


def _seed_table(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean over folds (and truths, when not in keys) per seed; then mean, spread (max - min) and count of seeds."""
    per_seed = rows.groupby([*keys, "seed"])["pearson"].mean().reset_index()
    return per_seed.groupby(keys)["pearson"].agg(mean="mean", spread=lambda v: float(v.max() - v.min()), seeds="size")


def cmd_report(args) -> None:
    from _common import write_report

    work = Path(args.work)
    one = _rows(work, "spot")
    two = _rows(context_work(work, args.context), "spot+context")
    rows = pd.concat([one, two], ignore_index=True)
    # hespotex single models and ensembles on the seeds both feature sets have; single rows of the "hespotex" tasks
    # and of the "single" tasks are the same model (a seed's validation section): keep one per (fold, seed)
    hes = rows[rows["method"].isin(["hespotex", "hespotex-ens"])].drop_duplicates(
        ["features", "method", "fold", "seed", "condition", "truth", "genes"]
    )
    keep = []
    for _, grp in hes.groupby("method"):
        seeds = set.intersection(*(set(g["seed"]) for _, g in grp.groupby("features")))
        keep.append(grp[grp["seed"].isin(seeds)])
    hes = pd.concat(keep)
    base = rows[rows["method"].str.startswith(("ridge", "retrieval"))]
    folds = sorted(set(hes["fold"]) & set(base["fold"]))
    hes, base = hes[hes["fold"].isin(folds)], base[base["fold"].isin(folds)]

    def summary(keys: list[str]) -> pd.DataFrame:
        h = _seed_table(hes, ["features", "method", *keys])
        cells = {}
        for (feat, method, *k), r in h.iterrows():
            cells.setdefault(tuple(k), {})[f"{method} ({feat})"] = f"{r['mean']:.4f} ± {r['spread']:.4f} ({r['seeds']})"
            cells[tuple(k)][f"_{method} ({feat})"] = r["mean"]
        b = base.groupby(["features", "method", *keys])["pearson"].mean()
        for (feat, method, *k), v in b.items():
            cell = cells.setdefault(tuple(k), {})
            if v > cell.get(f"_best ({feat})", -np.inf):
                cell[f"_best ({feat})"] = v
                cell[f"best baseline ({feat})"] = f"{v:.4f} {method}"
        out = []
        for k, cell in cells.items():
            row = dict(zip(keys, k, strict=True))
            row.update({c: v for c, v in cell.items() if not c.startswith("_")})
            best = max(cell.get("_best (spot)", -np.inf), cell.get("_best (spot+context)", -np.inf))
            for m in ("hespotex", "hespotex-ens"):
                a, c = cell.get(f"_{m} (spot+context)"), cell.get(f"_{m} (spot)")
                if a is not None and c is not None:
                    row[f"gain {m}"] = round(a - c, 4)
                if a is not None:
                    row[f"margin {m} (spot+context)"] = round(a - best, 4)
            out.append(row)
        cols = [*keys]
        for m in ("hespotex", "hespotex-ens"):
            cols += [f"{m} (spot)", f"{m} (spot+context)", f"gain {m}"]
        cols += ["best baseline (spot)", "best baseline (spot+context)", "margin hespotex (spot+context)",
                 "margin hespotex-ens (spot+context)"]  # fmt: skip
        df = pd.DataFrame(out)
        return df[[c for c in cols if c in df]].sort_values(keys)

    overall = summary(["genes"])
    per_cond = summary(["condition", "genes"])
    per_truth = summary(["condition", "truth", "genes"])
    base_tab = base.groupby(["features", "method", "condition", "genes"])["pearson"].mean().unstack("condition")
    base_tab = base_tab[[c for c in shift.CONDITIONS if c in base_tab]].round(4).reset_index()
    seeds = {m: sorted(g["seed"].unique()) for m, g in hes.groupby("method")}
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        f"# Shift benchmark: two-scale embeddings (100 µm spot + {args.context:g} µm context) vs the spot patch alone",
        "",
        "Commands (2-core machine shared with other jobs, `nice -n 10`, 1 dask worker, 1 torch thread):  ",
        "`python benchmarks/shift.py embed --patch 200 --workers 1` (context-scale embeddings of the restained and "
        "rescaled sections; the clean ones were cached by shift.md's run);  ",
        f"`python benchmarks/shift_context.py prepare --context {args.context:g}`;  ",
        f"`python benchmarks/shift_context.py verify --context {args.context:g} --section C6`;  ",
        f"`python benchmarks/shift.py run --work /tmp/hespotex_shift/context{args.context:g} --workers 1 --what "
        "hespotex --seeds 0 --setting \"{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False}\"` "
        "(tuned baselines on the concatenated features, 4-member ensembles and single models);  ",
        f"`python benchmarks/shift.py run --work /tmp/hespotex_shift/context{args.context:g} --workers 1 --what "
        "single --seeds 1 2 --setting ...` (single models, more seeds);  ",
        f"`{cmd}`.",
        "",
        "Setting: targets `library_modelled`, spot patch 100 µm (the spot diameter), EfficientNet-Lite0 (ImageNet, "
        "frozen). `(spot)`: the single-scale features of `shift.md` (1280 wide); `(spot+context)`: "
        f"`hx.pp.embed(..., patch_um=100, context_um={args.context:g})`, the spot and context features concatenated "
        "(2560 wide), for hespotex and for the baselines alike. hespotex = one model (validation section chosen by "
        "the seed), hespotex-ens = mean of 4 members (one per held-out validation section). Seeds: "
        + ", ".join(f"{m} {', '.join(map(str, s))}" for m, s in seeds.items())
        + f" (the same seeds for both feature sets); folds {', '.join(folds)}. `±` = spread (max - min) of the seed "
        "means, `(n)` = seeds. Baselines (ridge, retrieval; raw and 6-NN smoothed; α / k tuned by "
        "leave-one-training-section-out) are deterministic; `best baseline` is the strongest of the four per cell, "
        "`margin` is against the stronger of the best single-scale and best two-scale baseline.",
        "",
        "## Mean over conditions and truths",
        "",
        overall.to_markdown(index=False),
        "",
        "## Per condition (mean over the three truths)",
        "",
        per_cond.to_markdown(index=False),
        "",
        "## Per condition and truth",
        "",
        per_truth.to_markdown(index=False),
        "",
        "## Baselines on either feature set (mean over truths)",
        "",
        base_tab.to_markdown(index=False),
        "",
    ]
    write_report("\n".join(lines), args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["prepare", "verify", "report"])
    parser.add_argument("--data", default=None)
    parser.add_argument("--work", default="/tmp/hespotex_shift")
    parser.add_argument("--context", type=float, default=200.0, help="context patch side in µm")
    parser.add_argument("--section", default="C6", help="verify: the section to embed")
    parser.add_argument("--out", default="benchmarks/results/shift_context.md")
    args = parser.parse_args()
    {"prepare": cmd_prepare, "verify": cmd_verify, "report": cmd_report}[args.stage](args)


if __name__ == "__main__":
    main()
