"""``hespotex demo``: train, predict an unseen slide, evaluate, write the results."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_HELP = """Train HESpotEx, predict a slide it did not train on, evaluate, write the results.

By default the slides are synthetic sections made by hespotex itself (expression is a known
function of the H&E-like image), so the demo needs no download. With --her2st PATH it runs on the
public HER2+ breast cancer sections (Andersson et al. 2021): trains on C2-C5 and predicts C6.
"""


def _demo_samples(her2st: str | None, *, quick: bool):
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
    make = dict(n_genes=120, microns_per_pixel=1.0)
    train = {
        f"synthetic_{i}": hx.datasets.synthetic(n_spots, seed=i, sample_id=f"synthetic_{i}", **make) for i in range(3)
    }
    test = hx.datasets.synthetic(n_spots, seed=10, sample_id="synthetic_test", **make)
    return train, ("synthetic_test", test), None, 112


def demo(
    out: str | Path = "demo-output", *, her2st: str | None = None, quick: bool = False, overwrite: bool = False
) -> Path:
    """Run the demo and return the output folder (``prediction.zarr``, ``metrics.csv``, ``model/``)."""
    import pandas as pd

    import hespotex as hx
    from hespotex.models import ModelConfig

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        msg = f"{str(out)!r} already holds results; pass --overwrite to replace them, or --out another folder."
        raise FileExistsError(msg)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_samples, (test_name, test), panel, input_size = _demo_samples(her2st, quick=quick)
    for s in [*train_samples.values(), test]:  # 110 µm synthetic patches are 110 px: no need to upsample to 224
        hx.pp.embed(s, encoder="efficientnet_lite0.imagenet", input_size=input_size)
    config = ModelConfig.preset("hespotex", epochs=30 if quick else 100, ae_epochs=100 if quick else 300)
    model = hx.tl.train(train_samples, genes=panel, n_top_genes=100, config=config, seed=0)
    model.save(out / "model", overwrite=True)
    pred = hx.tl.predict(test, model)
    scores = hx.tl.evaluate(pred, reference=train_samples)
    summary = pd.DataFrame([{"test_sample": test_name, **scores.attrs["summary"]}])
    summary.to_csv(out / "metrics.csv", index=False)
    scores.to_csv(out / "per_gene.csv")
    hx.io.write_zarr(test, out / "prediction.zarr", overwrite=True)
    elapsed = time.perf_counter() - t0
    lines = [
        f"hespotex demo: trained on {model.train_samples_} (early stopping on {model.validation_['samples'] or 'a spatial block'}), predicted {test_name} ({pred.n_obs} spots x {pred.n_vars} genes) in {elapsed:.0f} s",
        f"  mean Pearson over all genes {summary['pearson_mean'].iat[0]:.3f}, top-50 HVG {summary['pearson_mean_hvg'].iat[0]:.3f}, "
        f"genes significantly positive {int(summary['n_significant'].iat[0])}/{pred.n_vars}",
        f"  predictions: {out / 'prediction.zarr'} (table 'hespotex', layer 'hespotex')",
        f"  metrics:     {out / 'metrics.csv'} and {out / 'per_gene.csv'}",
        f"  model:       {out / 'model'}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return out


def demo_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``hespotex demo``."""
    demo(args.out, her2st=args.her2st, quick=args.quick, overwrite=args.overwrite)
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hespotex demo`` and its options to the subcommands ``sub``; return its parser."""
    raw = argparse.RawDescriptionHelpFormatter
    p_demo = sub.add_parser(
        "demo", help="train, predict an unseen slide, evaluate", description=DEMO_HELP, formatter_class=raw
    )
    p_demo.add_argument("--her2st", metavar="PATH", help="folder of the public her2st data (images/, counts/, spots/)")
    p_demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p_demo.add_argument("--quick", action="store_true", help="smaller synthetic slides and fewer epochs")
    p_demo.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    return p_demo
