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

It also reports refits (``--setting "{..., 'refit': True}"``, seed 0): models trained on every training section for
their member's best epoch count, added to the ensemble.
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
LABELS = {
    "": "heads 512 (the default's until 2026-12-03)",
    "head1024": "head1024 (the default's in session 15)",
    "aeall": "aeall: head1024, one autoencoder on every section (the default's since session 16)",
}


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


REFITS = {
    "4 first-round members + their 4 refits (8)": sd.WIDE + "+refit" + SMOOTH,
    "the 4 refits alone": sd.WIDE + "+refitonly" + SMOOTH,
    "the default's 8 + the 4 refits (12)": sd.WIDE + "+x2shared+refit" + SMOOTH,
}


def refits(hes: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """The refit ensembles (seed 0) beside the session-15 default they were run with (same folds and seed): mean
    and margin per condition x gene set, mean over the three truths."""
    seed0 = hes[hes["seed"] == 0]
    _, default = sd.versus_baseline(seed0, base, sd.WIDE_DEFAULT, ["condition", "genes"], FOLDS)
    out = pd.DataFrame({"session-15 default (8)": default["mean"], "its margin": default["margin"]})
    for label, method in REFITS.items():
        _, t = sd.versus_baseline(seed0, base, method, ["condition", "genes"], FOLDS)
        out[f"{label}: vs default"] = t["mean"] - default["mean"]
    return out.round(4).reset_index()


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
    refit_table = refits(hes, base)
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
            "joint stages and predictions alone, but for two kinds of run that pre-trained one autoencoder per task: "
            "`aeall` (the members' one, on all 4 training sections; `shared_autoencoder_time.md` compares the "
            "defaults side by side from an empty cache) and the refit run (12 per task: the refits' own).",
            "",
            fit.to_markdown(index=False),
            "",
            "## Refits on every training section (seed 0, 5 folds; run in session 15's default, `head1024`)",
            "",
            "`--setting \"{..., 'rounds': 2, 'shared_ae': True, 'refit': True}\"` (seed 0): after the default's "
            "members, one more model per first-round member trained on all 4 training sections (none held out) for "
            "that member's best epoch count, the 4 on one autoencoder, as the baselines are refitted on every training "
            "section once tuned. The same run's default (8 members) gave exactly the rows of the `head1024` run above "
            "(every score equal), so the refit rows keep only the refit ensembles. Mean over the three truths; "
            "`vs default` = the ensemble's mean minus the default's (same folds, seed 0).",
            "",
            refit_table.to_markdown(index=False),
        ]
    )
    shift.write_keeping_conclusion(text, args.out)


if __name__ == "__main__":
    main()
