"""Scale (and orientation) augmentation on the shift benchmark: the default's stain views as they are vs views whose
field of view is also scaled (``hx.pp.embed(..., stain_augment=4, scale_augment=0.15)``), and those also flipped /
turned (``dihedral_augment=True``).

A frozen encoder sees a spot at another scale when a slide's µm/px is off (the ``rescaled`` condition: 10 % too
large); the model on top can learn to ignore that if its training views cover it. With ``scale_augment=0.15`` each
of the 4 training views of a spot is cut with its side scaled about the spot centre by a factor drawn log-uniformly
in [1/1.15, 1.15] (the range fixed before any run: scanners' calibrations and magnification labels disagree by about
10 %) and re-stained as before; prediction embeds the clean patch as always. Everything else is the default of
``shift_encoder.md`` (multi-layer features, two scales, 8 members on one autoencoder, prediction smoothed with the
spot at 0.5), the baselines are the same rows (they train on clean embeddings, which do not change). Reads the
per-task rows; trains nothing::

    python benchmarks/shift.py embed --work /tmp/hespotex_shift_ml2 --stain-views --patch 100 200 \\
        --scale-augment 0.15
    python benchmarks/shift_context.py prepare --work /tmp/hespotex_shift_ml2 --context 200 --scale-augment 0.15
    python benchmarks/shift.py run --work /tmp/hespotex_shift_ml2/context200 --what hespotex --seeds 0 1 2 \\
        --setting "{'target_norm': 'library_modelled', 'patch_um': 100.0, 'tta': False, 'stain_augment': True, \\
        'distinct_seeds': True, 'smooth_predict': True, 'rounds': 2, 'shared_ae': True, 'config': 'aeall', \\
        'scale_augment': 0.15}"
    # the same three commands with --dihedral added to the first two and 'dihedral': True to the setting give the
    # zoomed + turned views (dihedral_augment=True)
    # rows copied to benchmarks/results/shift_rows_multilayer/context200/rows (committed)
    python benchmarks/shift_zoom.py      # -> benchmarks/results/shift_zoom.md
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
from shift_encoder import in_full, side_by_side, summary_row  # noqa: E402

ZOOM = 0.15
ZOOMED = sd.DEFAULT.replace("+aeall", f"+aeall+zoom{ZOOM:g}", 1)  # shift.run_task's method name for the setting
VARIANTS = {
    "views": sd.DEFAULT,
    "zoomed views": ZOOMED,
    "zoomed + turned views": ZOOMED.replace(f"+zoom{ZOOM:g}", f"+zoom{ZOOM:g}+dihedral", 1),
}
ADOPTED = "zoomed + turned views"  # hx.tl.train's default views (session 18)


def step(runs: dict, old: str, new: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Tables of one step (``new`` over ``old``): per cell and mean over truths, and the per-cell mean gains."""
    pair = {old: runs[old], new: runs[new]}
    cells = side_by_side(pair, ["condition", "truth", "genes"]).sort_values(["genes", "condition", "truth"])
    means = side_by_side(pair, ["condition", "genes"]).sort_values(["genes", "condition"])
    return cells, means, cells["gain (mean, min over seeds)"].str.split(", ").str[0].astype(float)


def cmd_report(args) -> None:
    rows = sd.setting_rows(Path(args.rows) / "context200")
    base = sd.labelled_baselines(rows, "spot+context")
    runs = {name: (rows[rows["method"] == method], base) for name, method in VARIANTS.items()}
    for name, (hes, _) in runs.items():
        if hes.empty or base.empty:
            raise SystemExit(f"No rows of {name!r} or of the baselines: see this script's docstring.")
    summary = [summary_row(name, hes, b, VARIANTS[name]) for name, (hes, b) in runs.items()]
    zoom_cells, zoom_means, zoom_gain = step(runs, "views", "zoomed views")
    turn_cells, turn_means, turn_gain = step(runs, "zoomed views", "zoomed + turned views")
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])

    def verdict(gain: pd.Series) -> str:
        return (
            f"better in **{int((gain > 0).sum())} / {len(gain)} cells** (mean gain {gain.mean():+.4f}, min "
            f"{gain.min():+.4f}, max {gain.max():+.4f})"
        )

    lines = [
        f"# Scaled and turned training views on the shift benchmark (field of view ±{ZOOM:.0%}, 8 flips / turns)",
        "",
        f"Command: `{cmd}` (reads the rows; the commands that made them are in `benchmarks/shift_zoom.py`). Rows: "
        f"`{args.rows}/context200/rows`; seeds 0, 1, 2 x folds C2-C6; 2-core machine, 2 dask workers of one torch "
        "thread each, 2026-12-03 (session 18).",
        "",
        f"`views` = the default of `shift_encoder.md` (`{VARIANTS['views']}`, multi-layer features): 4 "
        f"stain-augmented views per spot; `zoomed views` = the same with `hx.pp.embed(..., scale_augment={ZOOM:g})`: "
        f"each view also cut with its side scaled by a factor log-uniform in [1/{1 + ZOOM:g}, {1 + ZOOM:g}] per "
        "(view, spot), at both scales; `zoomed + turned views` = those with `dihedral_augment=True` too: each view "
        "also flipped / turned by one of the 8 transforms of the square, per (view, spot). Prediction embeds the "
        "clean patch in every case. Baselines: the tuned ridge / retrieval rows of `shift_encoder.md` (clean "
        "features, which do not change; the strongest per cell picked after the fact). `gain` = the variant - the "
        f"one before it, seed by seed (mean and worst over the 3 seeds); `margin` = variant - strongest baseline. "
        f"Adopted as the default: **{ADOPTED}** (`{VARIANTS[ADOPTED]}`).",
        "",
        f"Zoomed views vs views: {verdict(zoom_gain)}. Zoomed + turned vs zoomed views: {verdict(turn_gain)}.",
        "",
        "## Against the strongest tuned baseline (24 cells)",
        "",
        pd.DataFrame(summary, columns=["views", *sd.CELL_SUMMARY]).to_markdown(index=False),
        "",
        "## Zoomed vs plain views: mean over the three truths",
        "",
        zoom_means.to_markdown(index=False),
        "",
        "## Zoomed + turned vs zoomed views: mean over the three truths",
        "",
        turn_means.to_markdown(index=False),
        "",
        "## Zoomed vs plain views: every condition x truth x gene set",
        "",
        zoom_cells.to_markdown(index=False),
        "",
        "## Zoomed + turned vs zoomed views: every condition x truth x gene set",
        "",
        turn_cells.to_markdown(index=False),
        "",
        f"## The default ({ADOPTED}) in full against the strongest tuned baseline (seeds 0, 1, 2)",
        "",
        *in_full(*runs[ADOPTED], VARIANTS[ADOPTED]),
    ]
    shift.write_keeping_conclusion("\n".join(lines), args.out)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="benchmarks/results/shift_rows_multilayer", help="the work folder's rows")
    parser.add_argument("--out", default="benchmarks/results/shift_zoom.md")
    cmd_report(parser.parse_args())


if __name__ == "__main__":
    main()
