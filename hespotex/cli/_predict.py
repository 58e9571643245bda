"""``hespotex predict``: expression maps for whole-slide images, one slide in-process or several on Dask."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hespotex.cli._common import output_problem, positive_float, positive_int

logger = logging.getLogger("hespotex")


PREDICT_HELP = """Predict spot-level gene expression for whole-slide H&E images that have no spatial transcriptomics.

Each slide is read lazily (pyramidal TIFF / OME-TIFF, SVS...), its tissue detected and covered with
pseudo-spots of the geometry the model was trained on (e.g. 55 µm spots 100 µm apart for Visium),
and the model predicts every spot's expression, streaming, into OUT/<slide name>.zarr (table
'hespotex', layer 'hespotex'). OUT/<slide name>.done.json is written when a slide is finished; a
re-run skips finished slides and resumes interrupted ones. One slide runs in this process; several
run in parallel on a local Dask cluster (--workers processes, one thread each). A slide that fails
is reported (and its error written to OUT/<slide name>.error.txt) without stopping the others.
A SLIDE may also be a zarr store written by `hespotex tile`, whose pseudo-spots are then used as they are.
"""
PREDICT_EPILOG = """examples:
  hespotex predict --model my-model --out predictions slide.ome.tif
  hespotex predict --model my-model --out predictions --workers 4 slides/*.svs
  hespotex predict --model my-model --out predictions --mpp 0.5 scan.tif   # file without resolution metadata

exit codes: 0 all slides finished (or skipped as finished earlier), 1 some slides failed (an error,
            or NaN / infinite predictions), 2 bad usage, a missing input, results that --overwrite would be
            needed to replace, or an --out that cannot be written (a file, a read-only folder)
"""


def predict_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``hespotex predict``: one slide in-process, several through :func:`hespotex.tl.predict_slides`."""
    import pandas as pd

    from hespotex.tl.prediction._cohort import COLUMNS, predict_slides, run_slide, slide_name

    model = Path(args.model)
    problem = output_problem(Path(args.out), "--out", kind="a folder")
    if problem:
        parser.error(problem)
    if args.model.startswith("hf-hub:"):  # a Hugging Face Hub id: its snapshot in the local cache
        from hespotex.tl.model._resolve import model_folder

        model = model_folder(args.model)
    if not model.is_dir():
        parser.error(
            f"--model {args.model!r} is not a folder; pass the folder written by `hespotex train` (or HESpotEx.save)."
        )
    missing = [s for s in args.slides if not Path(s).exists()]
    if missing and len(args.slides) == 1:
        parser.error(f"the slide {missing[0]!r} does not exist.")
    names = [slide_name(s) for s in args.slides]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        parser.error(f"slides must have distinct file names (each writes OUT/<name>.zarr); repeated: {dupes}.")
    predict_kwargs = {"device": args.device} if args.device else {}
    if hasattr(args, "smooth"):  # given: else hx.tl.predict's default
        predict_kwargs["smooth"] = args.smooth
    tile_kwargs = {"layout": args.layout} if args.layout else {}
    if len(args.slides) == 1:
        record = run_slide(
            args.slides[0], model, out=args.out, microns_per_pixel=args.mpp, tile_kwargs=tile_kwargs,
            predict_kwargs=predict_kwargs, overwrite=args.overwrite, raise_errors=True,
        )  # fmt: skip
        table = pd.DataFrame([record], columns=COLUMNS)
    else:
        table = predict_slides(
            args.slides, model, out=args.out, n_workers=args.workers, microns_per_pixel=args.mpp,
            tile_kwargs=tile_kwargs, predict_kwargs=predict_kwargs, overwrite=args.overwrite,
        )  # fmt: skip
    shown = table[["slide", "status", "n_tiles", "seconds", "output", "error"]].copy()
    shown["seconds"] = shown["seconds"].map(lambda v: f"{v:.1f}" if pd.notna(v) else "")
    shown["n_tiles"] = shown["n_tiles"].map(lambda v: f"{int(v)}" if pd.notna(v) else "")  # Int64 takes no ""
    shown = shown.fillna("")
    sys.stdout.write(shown.to_string(index=False) + "\n")
    n_failed = int((table["status"] == "failed").sum())
    if n_failed:
        logger.error(
            "%d of %d slides failed; their errors are in %s/<slide>.error.txt.", n_failed, len(table), args.out
        )
        return 1
    return 0


def smooth_weight(value: str) -> float | None:
    """An argparse type: a number in [0, 1], or ``none`` (no smoothing)."""
    if value.strip().lower() == "none":
        return None
    return unit_float(value)


def unit_float(value: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], found {value!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], found {value}")
    return x


def add_predict_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hespotex predict`` and its options to the subcommands ``sub``; return its parser."""
    raw = argparse.RawDescriptionHelpFormatter
    p_pred = sub.add_parser(
        "predict",
        help="expression maps for whole-slide images",
        description=PREDICT_HELP,
        epilog=PREDICT_EPILOG,
        formatter_class=raw,
    )
    p_pred.add_argument(
        "slides", nargs="+", metavar="SLIDE", help="whole-slide image files (or zarr stores from `hespotex tile`)"
    )
    p_pred.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="model folder written by `hespotex train`, or hf-hub:owner/name[@revision]",
    )
    p_pred.add_argument(
        "--out", required=True, metavar="DIR", help="output folder: one OUT/<slide name>.zarr per slide"
    )
    p_pred.add_argument(
        "--mpp", type=positive_float, metavar="X", help="microns per pixel of the slides, when their files do not say"
    )
    p_pred.add_argument(
        "--workers", type=positive_int, metavar="N", help="worker processes for several slides (default: one per core)"
    )
    p_pred.add_argument("--layout", choices=["hex", "grid"], help="pseudo-spot layout (default: hexagonal, as Visium)")
    p_pred.add_argument("--device", metavar="NAME", help="torch device: cpu, cuda, cuda:1... (default: auto)")
    p_pred.add_argument(
        "--smooth",
        type=smooth_weight,
        default=argparse.SUPPRESS,
        metavar="W",
        help="smooth each tile's prediction over its 6 nearest tiles, keeping weight W in [0, 1] of its own "
        "(hx.tl.predict(..., smooth=W); default: hx.tl.predict's, 0.5; 'none': the model's output unsmoothed)",
    )
    p_pred.add_argument(
        "--overwrite", action="store_true", help="predict finished slides again, replacing their results"
    )
    return p_pred
