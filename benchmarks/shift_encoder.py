"""The default encoder on the shift benchmark: EfficientNet-Lite0's head alone vs its head with 4 inner stages.

``efficientnet_lite0.imagenet`` (1,280 features per scale, the default until 2026-12-03) against
``efficientnet_lite0.imagenet.multilayer`` (the same frozen network, the spatial means of blocks 3-6 put before
its head's features: 1,984 per scale; the default since). Everything else is the default of ``shift_defaults.md``
(two scales, 8 members on one autoencoder, stain views, prediction smoothed with the spot at 0.5); the tuned
baselines are fitted on the same features as hespotex each time (ridge / retrieval, raw and smoothed, α / k and the
smoothing weight tuned on the training sections), so the margins compare like with like. Reads the per-task rows;
trains nothing::

    python benchmarks/shift.py embed --work /tmp/hespotex_shift_ml2 --encoder efficientnet_lite0.imagenet.multilayer
    python benchmarks/shift.py embed --work /tmp/hespotex_shift_ml2 --stain-views --patch 100 200
    python benchmarks/shift_context.py prepare --work /tmp/hespotex_shift_ml2 --context 200
    python benchmarks/shift.py run --work /tmp/hespotex_shift_ml2/context200 --what baselines \\
        --grid smooth_baselines                                   # and --grid smooth_tuned_baselines
    python benchmarks/shift.py run --work /tmp/hespotex_shift_ml2/context200 --what hespotex --seeds 0 1 2 \\
        --setting "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, 'stain_augment': True, \\
        'distinct_seeds': True, 'smooth_predict': True, 'rounds': 2, 'shared_ae': True, 'config': 'aeall'}"
    # rows copied to benchmarks/results/shift_rows_multilayer/context200/rows (committed)
    python benchmarks/shift_encoder.py      # -> benchmarks/results/shift_encoder.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shift  # noqa: E402
import shift_defaults as sd  # noqa: E402

FOLDS = ["C2", "C3", "C4", "C5", "C6"]
ENCODERS = {"head": "efficientnet_lite0.imagenet", "multilayer": "efficientnet_lite0.imagenet.multilayer"}


def encoder_rows(work: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The default's rows and the tuned baselines' rows (two-scale features) of one encoder's work folder."""
    rows = sd.setting_rows(work / "context200")
    return rows[rows["method"] == sd.DEFAULT], sd.labelled_baselines(rows, "spot+context")


def side_by_side(runs: dict[str, tuple[pd.DataFrame, pd.DataFrame]], keys: list[str]) -> pd.DataFrame:
    """Per cell: each run's default (mean ± seed spread) and strongest baseline, the gain per seed of the second
    run's default over the first's (same seed; mean and min over seeds) and each run's margin. ``runs``: two
    ``name: (default's rows, baselines' rows)``, old first (here head, multi-layer)."""
    n_truths = 1 if "truth" in keys else 3
    cols, per = {}, {}
    for name, (hes, base) in runs.items():
        ps = sd.per_seed(hes, keys, len(FOLDS), n_truths)
        st = sd.seed_stats(ps, keys).set_index(keys)
        best = sd.best_baseline(base, keys)
        per[name] = ps.set_index([*keys, "seed"])["mean"]
        cols[f"default ({name})"] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(st["mean"], st["spread"], strict=True)]
        cols[f"baseline ({name})"] = best["baseline"].reindex(st.index).round(4).to_numpy()
        cols[f"margin ({name})"] = (st["mean"] - best["baseline"].reindex(st.index)).round(4).to_numpy()
        index = st.index
    old, new = runs
    gain = (per[new] - per[old]).groupby(keys).agg(["mean", "min"]).reindex(index)
    out = pd.DataFrame(cols, index=index)
    pairs = zip(gain["mean"], gain["min"], strict=True)
    out.insert(2, "gain (mean, min over seeds)", [f"{a:+.4f}, {b:+.4f}" for a, b in pairs])
    return out.reset_index()


def summary_row(name: str, hes: pd.DataFrame, base: pd.DataFrame, method: str) -> list:
    """One row of the "against the strongest tuned baseline" summary (:data:`shift_defaults.CELL_SUMMARY`)."""
    _, raw = sd.versus_baseline(hes, base, method, ["condition", "truth", "genes"], FOLDS)
    raw["spread"] = raw["spread"].astype(float)
    return [name, *sd.cell_summary(raw)]


def in_full(hes: pd.DataFrame, base: pd.DataFrame, method: str) -> list[str]:
    """Markdown lines: ``method`` against the strongest tuned baseline, mean over truths then every cell."""
    per_cell, _ = sd.versus_baseline(hes, base, method, ["condition", "truth", "genes"], FOLDS)
    means, _ = sd.versus_baseline(hes, base, method, ["condition", "genes"], FOLDS)
    return [
        means.sort_values(["genes", "condition"]).to_markdown(index=False),
        "",
        per_cell.sort_values(["genes", "condition", "truth"]).to_markdown(index=False),
        "",
    ]


def cmd_report(args) -> None:
    runs = {name: encoder_rows(Path(work)) for name, work in (("head", args.head), ("multilayer", args.multilayer))}
    for name, (hes, base) in runs.items():
        if hes.empty or base.empty:
            raise SystemExit(f"No rows of the default or of the baselines for {name!r}: see this script's docstring.")
    cells = side_by_side(runs, ["condition", "truth", "genes"]).sort_values(["genes", "condition", "truth"])
    means = side_by_side(runs, ["condition", "genes"]).sort_values(["genes", "condition"])
    summary = [summary_row(name, hes, base, sd.DEFAULT) for name, (hes, base) in runs.items()]
    gain_all = cells["gain (mean, min over seeds)"].str.split(", ").str[0].astype(float)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    lines = [
        "# The default encoder on the shift benchmark: EfficientNet-Lite0's head vs head + 4 inner stages",
        "",
        f"Command: `{cmd}` (reads the rows; the commands that made them are in `benchmarks/shift_encoder.py`). "
        f"Rows: head `{args.head}/context200/rows` (the `+aeall` default of `shift_defaults.md`), multi-layer "
        f"`{args.multilayer}/context200/rows`; seeds 0, 1, 2 x folds C2-C6; 2-core machine, 2 dask workers of one "
        "torch thread each, 2026-12-03 (session 17).",
        "",
        f"`head` = `{ENCODERS['head']}` (1,280 features per scale, the default until 2026-12-03); `multilayer` = "
        f"`{ENCODERS['multilayer']}` (the same frozen network; the spatial means of its blocks 3, 4, 5 and 6, "
        "80 + 112 + 192 + 320 channels, before its head's 1,280: 1,984 per scale; the default since), embedded by "
        "`hx.pp.embed` as the library runs it (BatchNorm folded, channels-last, as for the head). Everything else "
        "is the default of `shift_defaults.md` (`" + sd.DEFAULT + "`). Baselines: ridge / retrieval, raw and "
        "smoothed (`+smooth`, `+smooth50`, `+smoothcv`), tuned on the training sections, **fitted on the same "
        "encoder's two-scale features as the model**; the strongest per cell picked after the fact. `gain` = "
        "multi-layer default - head default, seed by seed (mean and worst over the 3 seeds); `margin` = default - "
        "strongest baseline of the same features.",
        "",
        f"The default is better with the multi-layer features in **{int((gain_all > 0).sum())} / {len(cells)} "
        f"cells** (mean gain {gain_all.mean():+.4f}, min {gain_all.min():+.4f}).",
        "",
        "## Mean over the three truths",
        "",
        means.to_markdown(index=False),
        "",
        "## Every condition x truth x gene set",
        "",
        cells.to_markdown(index=False),
        "",
        "## Against the strongest tuned baseline, each encoder (24 cells)",
        "",
        pd.DataFrame(summary, columns=["encoder", *sd.CELL_SUMMARY]).to_markdown(index=False),
        "",
        "## The new default in full (multi-layer features, seeds 0, 1, 2)",
        "",
        *in_full(*runs["multilayer"], sd.DEFAULT),
    ]
    shift.write_keeping_conclusion("\n".join(lines), args.out)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="benchmarks/results/shift_rows", help="rows of the head-only encoder")
    parser.add_argument(
        "--multilayer", default="benchmarks/results/shift_rows_multilayer", help="rows of the multi-layer encoder"
    )
    parser.add_argument("--out", default="benchmarks/results/shift_encoder.md")
    cmd_report(parser.parse_args())


if __name__ == "__main__":
    main()
