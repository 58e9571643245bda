"""``hespotex demo``: train, predict a slide the model did not see, evaluate, and write results a person can look at.

The command line (:mod:`hespotex.cli`) only parses its options and calls :func:`demo`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

from hespotex import _ownership

logger = logging.getLogger("hespotex")

N_SHOWN = 4  # best-predicted genes in the PNG overview and the explorer


def _samples(her2st: str | None, *, quick: bool):
    import hespotex as hx

    if her2st:
        sections = hx.datasets.her2st(her2st)
        names = sorted(sections)
        test = names[-1]
        return (
            {n: sections[n] for n in names if n != test},
            (test, sections[test]),
            hx.datasets.her2st_genes(her2st),
            None,
        )
    n_spots = 150 if quick else 400
    # 1 µm/px: a 55 µm patch is 55 px, fed to the encoder at 64 px (no upsampling beyond 1.2x)
    make = dict(n_genes=120, microns_per_pixel=1.0)
    train = {
        f"synthetic_{i}": hx.datasets.synthetic(n_spots, seed=i, sample_id=f"synthetic_{i}", **make) for i in range(3)
    }
    test = hx.datasets.synthetic(n_spots, seed=10, sample_id="synthetic_test", **make)
    return train, ("synthetic_test", test), None, 64


def check_demo_folder(out: Path, *, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` that an earlier demo did not write, unless ``overwrite``."""
    if out.exists() and any(out.iterdir()) and not overwrite and not _ownership.owned(out, "demo"):
        msg = (
            f"{str(out)!r} already holds files that hespotex's demo did not write; pass --overwrite to replace "
            "the demo's outputs in it, or --out another folder."
        )
        raise FileExistsError(msg)


def demo(
    out: str | Path = "demo-output", *, her2st: str | None = None, quick: bool | None = None, overwrite: bool = False
) -> Path:
    """Run the demo and return the output folder.

    Trains HESpotEx on three sections (synthetic, or her2st C2-C5 with ``her2st``), predicts a fourth it
    never saw, evaluates it and writes to ``out``: ``prediction.zarr`` (SpatialData, table ``"hespotex"``),
    ``metrics.csv``, ``per_gene.csv``, ``model/``, ``prediction.png`` (the best-predicted genes over the
    tissue, :func:`hespotex.io.write_png`) and ``explorer.html`` (the interactive explorer as one standalone
    page, :func:`hespotex.pl.explorer` and :func:`hespotex.pl.export`). Prints a summary and where each file is.

    ``quick`` (default: ``HESPOTEX_QUICK=1`` in the environment) uses smaller slides and fewer epochs. A
    folder an earlier demo wrote is reused (its results replaced); any other non-empty ``out`` is refused
    unless ``overwrite=True``.
    """
    import pandas as pd

    import hespotex as hx
    from hespotex.models import ModelConfig

    if quick is None:
        quick = os.environ.get("HESPOTEX_QUICK") == "1"
    out = Path(out)
    check_demo_folder(out, overwrite=overwrite)
    fresh = not out.exists() or not any(out.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    if fresh:  # a later demo may replace what this one writes; a user's folder (--overwrite) is never marked
        _ownership.mark(out, "demo")
    t0 = time.perf_counter()
    train_samples, (test_name, test), panel, input_size = _samples(her2st, quick=quick)
    for s in [*train_samples.values(), test]:
        hx.pp.embed(s, input_size=input_size)
    config = ModelConfig.preset("hespotex", epochs=30 if quick else 100, ae_epochs=100 if quick else 300)
    # one model (not the ensemble hx.tl.train makes of 3+ samples by default): the demo stays a minutes-long tour
    model = hx.tl.train(train_samples, genes=panel, n_top_genes=100, config=config, seed=0, ensemble=False)
    model.save(out / "model", overwrite=True)
    pred = hx.tl.predict(test, model)
    scores = hx.tl.evaluate(pred, reference=train_samples)
    summary = pd.DataFrame([{"test_sample": test_name, **scores.attrs["summary"]}])
    summary.to_csv(out / "metrics.csv", index=False)
    scores.to_csv(out / "per_gene.csv")
    hx.io.write_zarr(test, out / "prediction.zarr", overwrite=True)

    best = list(scores["pearson"].dropna().nlargest(N_SHOWN).index)
    png = hx.io.write_png(
        out / "prediction.zarr", out / "prediction.png", genes=best, slide=out / "prediction.zarr", overwrite=True
    )
    if importlib.util.find_spec("panel") is None:
        html = None
        logger.warning("No explorer.html: the explorer needs Panel (pip install 'hespotex[interactive]').")
    else:
        html = hx.pl.export(
            hx.pl.explorer(test, genes=best, title=f"hespotex demo: {test_name}"),
            out / "explorer.html",
            title=f"hespotex demo: {test_name}",
            overwrite=True,
        )
    elapsed = time.perf_counter() - t0
    early = model.validation_["samples"] or "a spatial block"
    lines = [
        f"hespotex demo: trained on {model.train_samples_} (early stopping on {early}), predicted {test_name} "
        f"({pred.n_obs} spots x {pred.n_vars} genes) in {elapsed:.0f} s",
        f"  mean Pearson over all genes {summary['pearson_mean'].iat[0]:.3f}, "
        f"top-50 HVG {summary['pearson_mean_hvg'].iat[0]:.3f}, "
        f"genes significantly positive {int(summary['n_significant'].iat[0])}/{pred.n_vars}",
        f"  picture:     {png} (best-predicted genes {', '.join(best)} over the tissue)",
        f"  explorer:    {html} (open it in a browser; no server needed)" if html else "  explorer:    not written",
        f"  predictions: {out / 'prediction.zarr'} (table 'hespotex', layer 'hespotex')",
        f"  metrics:     {out / 'metrics.csv'} and {out / 'per_gene.csv'}",
        f"  model:       {out / 'model'}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return out
