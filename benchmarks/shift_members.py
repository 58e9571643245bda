"""The default's members on the shift benchmark: their width and how many of them (diagnostic of two levers).

The default (2 members per held-out section, the second on the first's autoencoder, two scales, stain views,
prediction smoothed with the spot at 0.5) trained again per fold and seed with its members' layers narrower or wider
(``shift.CONFIGS``) and with 1-4 members per held-out section (``rounds``; every later member on the first one's
autoencoder), against the same strongest tuned baselines as ``shift_defaults.md`` (raw / smoothed on either feature
set, picked per cell after the fact).

    python benchmarks/shift.py run --work /tmp/hespotex_shift/context200 --what hespotex --seeds 0 1 2 \
        --setting "{..., 'rounds': 4, 'shared_ae': True, 'config': 'narrow'}"     # and 'head1024' (rounds 2 and 4)
    # rows copied to benchmarks/results/shift_rows/context200/rows (committed)
    python benchmarks/shift_members.py [--work benchmarks/results/shift_rows]
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
SMOOTH = shift.smooth_label(0.5)
LABELS = {"": "heads 512 (the default's until 2026-12-03)", "head1024": "head1024 (the default's)"}


def variants(methods: set[str]) -> dict[str, tuple[str, int]]:
    """(label -> (method, members per held-out section)) for the ensembles the rows hold, the default first."""
    out = {}
    for name in ("", *shift.CONFIGS):
        tag = f"+{name}" if name else ""
        label = LABELS.get(name, name)
        for r in range(1, 5):
            method = sd.MEMBERS + tag + (f"+x{r}shared" if r > 1 else "") + SMOOTH
            if method in methods:
                out[f"{label}, {r} per section" + (" = the default" if method == sd.DEFAULT else "")] = (method, r)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="benchmarks/results/shift_rows")
    parser.add_argument("--out", default="benchmarks/results/shift_members.md")
    args = parser.parse_args()
    work = Path(args.work)
    spot, ctx = sd.setting_rows(work), sd.setting_rows(work / "context200")
    base = pd.concat([sd.labelled_baselines(spot, "spot"), sd.labelled_baselines(ctx, "spot+context")])
    hes = ctx
    runs = ctx[ctx["method"].str.contains("|".join(rf"\+{name}\b" for name in shift.CONFIGS))]
    seeds = sorted(int(s) for s in runs["seed"].unique())
    labels = variants(set(hes["method"]))

    margins, cells = {}, {}
    for label, (method, _) in labels.items():
        _, t = sd.versus_baseline(hes, base, method, ["condition", "genes"], FOLDS)
        margins[label] = t["margin"]
        _, t = sd.versus_baseline(hes, base, method, ["condition", "truth", "genes"], FOLDS)
        cells[label] = [4 * labels[label][1], *sd.cell_summary(t)]
    table = pd.DataFrame(margins).round(4).T
    table.columns = [f"{c} {g}" for c, g in table.columns]
    table = table.reset_index(names="members")
    counts = pd.DataFrame(cells, index=["members in all", *sd.CELL_SUMMARY]).T.reset_index(names="members")
    counts["members in all"] = counts["members in all"].astype(int)

    tasks = shift.load_rows(work / "context200")  # every task's own rows (setting_rows keeps one of duplicates)
    config = tasks["method"].str.extract(r"\+(" + "|".join(shift.CONFIGS) + r")\b")[0]
    tasks = tasks[config.notna()].assign(config=config)
    per_task = tasks.groupby(["config", "fold", "seed", "fit_seconds"])["members"].max().reset_index()
    fit = (
        per_task.groupby(["config", "members"])["fit_seconds"]
        .agg(["mean", "min", "max", "size"])
        .round(0)
        .reset_index()
        .rename(columns={"members": "members per task", "size": "tasks"})
    )
    text = "\n".join(
        [
            "# The default's members on the shift benchmark: width and number (diagnostic)",
            "",
            "Commands: `python benchmarks/shift.py run --work /tmp/hespotex_shift/context200 --what hespotex --seeds "
            "0 1 2 --setting \"{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, 'stain_augment': "
            "True, 'distinct_seeds': True, 'smooth_predict': True, 'rounds': R, 'shared_ae': True, 'config': C}\"` "
            "for (R, C) = (4, 'narrow'), (2, 'head1024'), (4, 'head1024'), (2, 'head2048') (work folders as in "
            "`shift_defaults.md`; rows copied to `benchmarks/results/shift_rows/context200/rows`), then "
            "`python benchmarks/shift_members.py --work benchmarks/results/shift_rows`.",
            "",
            f"Seeds {', '.join(map(str, seeds))}; 5 folds. Every variant is the default but for its members: their "
            "layer widths (`ModelConfig` overrides, `shift.CONFIGS`; the projection 2,560 → 1,024 → 64, the gene "
            "heads 64 → 512 → 785 until 2026-12-03, 64 → 1,024 → 785 since) and how many train per held-out section "
            "(each further one on the first one's autoencoder, as `hx.tl.train(..., ensemble=r)`); every prediction "
            "smoothed with the spot at 0.5. Baselines as in `shift_defaults.md`: the strongest per cell, picked after "
            "the fact. Widths: "
            + "; ".join(f"`{name}` {overrides}" for name, overrides in shift.CONFIGS.items())
            + ".",
            "",
            "## Margin over the strongest tuned baseline, mean over the three truths",
            "",
            table.to_markdown(index=False),
            "",
            "## Every condition x truth x gene set (24 cells)",
            "",
            counts.to_markdown(index=False),
            "",
            "## Training and prediction per fold task (seconds; all rounds of a task; two tasks at a time on 2 cores)",
            "",
            "The autoencoders came from the disk cache of earlier runs (`hx.settings.cachedir`), so these are the "
            "joint stages and predictions alone.",
            "",
            fit.to_markdown(index=False),
        ]
    )
    shift.write_keeping_conclusion(text, args.out)


if __name__ == "__main__":
    main()
