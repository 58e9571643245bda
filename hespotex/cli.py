"""The ``hespotex`` command for batch jobs.

- ``hespotex demo``: train, predict an unseen slide, evaluate and write the result;
- ``hespotex train``: train a model on samples with spatial transcriptomics and save it;
- ``hespotex tile``: tissue detection and pseudo-spots over a whole-slide image, to a zarr store;
- ``hespotex predict``: expression maps for image-only slides (several run in parallel on Dask);
- ``hespotex export``: predictions as GeoJSON (QuPath detections), OME-TIFF heatmaps, a PNG overview or CSV.

Exit codes: 0 success; 1 an error, or (``predict``) some slides failed, or predictions that are not
finite; 2 bad usage, a refused overwrite (an output that already exists without ``--overwrite``, or
that hespotex did not write), a missing input, or an output that cannot be written (a file where a
folder is expected, a read-only folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("hespotex")

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
TRAIN_HELP = """Train HESpotEx on samples with spatial transcriptomics, then save the model folder.

SAMPLEs are SpatialData zarr stores written by hespotex (hx.io.write_zarr) or 10x Space Ranger
`outs` folders (filtered_feature_bc_matrix.h5 and spatial/); --her2st adds sections of the public
her2st data set. Each sample's H&E patches are embedded with the frozen --encoder (cached under
~/.cache/hespotex), then the model learns the expression of --genes genes from them. The saved
folder (model.safetensors + setup.json) is what `hespotex predict --model` and hx.tl.HESpotEx.load read.
"""
TRAIN_EPILOG = """examples:
  hespotex train --out my-model sampleA.zarr sampleB.zarr
  hespotex train --out my-model --genes 2000 --epochs 200 visium/A1/outs visium/B1/outs
  hespotex train --out her2st-model --genes genes_785.txt --her2st data/her2st --sections C2 C3 C4

exit codes: 0 model saved, 1 an error, 2 bad usage, a missing input or an existing --out without --overwrite
"""
TILE_HELP = """Cover the tissue of a whole-slide image with pseudo-spots, and write them to a zarr store.

The tissue is found on a low-resolution level of the slide; pseudo-spots of the model's training
geometry (--model) or of the given --spot-diameter and --spacing (in µm) are laid over it on a
hexagonal or square grid. The store holds the tissue outline, the spot circles and a table of spots
ready for prediction; by default not the image itself (the slide's path is recorded instead), so it
stays small. `hespotex predict` accepts the store in place of the slide.
"""
TILE_EPILOG = """examples:
  hespotex tile --out slide-tiles.zarr --model my-model slide.ome.tif
  hespotex tile --out slide-tiles.zarr --spot-diameter 55 --spacing 100 --layout hex slide.svs
  hespotex predict --model my-model --out predictions slide-tiles.zarr

exit codes: 0 written, 1 an error, 2 bad usage, a missing input or an existing --out without --overwrite
"""


def _is_zarr_store(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zattrs"))


def _is_visium_outs(path: Path) -> bool:
    return path.is_dir() and ((path / "spatial").is_dir() or any(path.glob("*filtered_feature_bc_matrix.h5")))


def _output_problem(path: Path, flag: str, *, kind: str, beside: bool = False) -> str | None:
    """Why nothing can be written at ``path`` (``--out``), or ``None``: an existing file where a folder is
    expected, or a folder (or its nearest existing parent) this user cannot write to. ``beside``: the
    output is written next to ``path`` and renamed into place (a model folder), so its parent must be writable."""
    import os

    if path.exists() and not path.is_dir():
        return f"{flag} {str(path)!r} is an existing file; expected {kind} (created if needed). Choose another path."
    start = path.parent if beside else path
    parent = start if start.exists() else next((p for p in start.parents if p.exists()), Path("."))
    if not parent.is_dir():
        return f"{flag} {str(path)!r} is inside {str(parent)!r}, which is a file, not a folder. Choose another path."
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {str(path)!r}: cannot write to {str(parent)!r} (permission denied or a read-only file system). Choose a folder you can write to."
    return None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        msg = f"expected a positive number, found {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive whole number, found {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


# --------------------------------------------------------------------------------------------------
# predict


def predict_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``hespotex predict``: one slide in-process, several through :func:`hespotex.tl.predict_slides`."""
    import pandas as pd

    from hespotex.tl._cohort import COLUMNS, predict_slides, run_slide, slide_name

    model = Path(args.model)
    problem = _output_problem(Path(args.out), "--out", kind="a folder")
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


# --------------------------------------------------------------------------------------------------
# train


def _genes_argument(text: str) -> tuple[list[str] | None, int]:
    """``--genes``: a number of top genes, or a file of gene names (one a line)."""
    if text.isdigit():
        return None, int(text)
    path = Path(text)
    if not path.is_file():
        msg = f"--genes expects a number of genes or a file of gene names, found {text!r} (no such file)."
        raise FileNotFoundError(msg)
    genes = [g.strip() for g in path.read_text().splitlines() if g.strip() and not g.lstrip().startswith("#")]
    if not genes:
        msg = f"The gene file {text!r} lists no genes (expected one name a line)."
        raise ValueError(msg)
    return genes, len(genes)


def _training_samples(args: argparse.Namespace) -> list:
    import hespotex as hx

    samples = []
    if args.her2st:
        samples += list(hx.datasets.her2st(args.her2st, sections=args.sections).values())
    for text in args.samples:
        path = Path(text)
        if not path.exists():
            msg = f"The sample {text!r} does not exist."
            raise FileNotFoundError(msg)
        if _is_zarr_store(path):
            samples.append(hx.io.read_zarr(path))
        elif _is_visium_outs(path):
            samples.append(hx.io.read_visium(path, microns_per_pixel=args.mpp))
        else:
            msg = (
                f"{text!r} is neither a SpatialData zarr store (written by hx.io.write_zarr) nor a Space Ranger "
                "`outs` folder (filtered_feature_bc_matrix.h5 and spatial/). Convert it with an hx.io reader first."
            )
            raise ValueError(msg)
    return samples


def _config_overrides(items: list[str] | None, parser: argparse.ArgumentParser) -> dict[str, object]:
    """``--set KEY=VALUE`` pairs as ModelConfig overrides (values parsed as JSON when they can be)."""
    import json

    overrides: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set expects KEY=VALUE (a ModelConfig field), found {item!r}.")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def train_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``hespotex train``: read samples, embed, train, save."""
    if not args.samples and not args.her2st:
        parser.error("give at least one SAMPLE, or --her2st PATH.")
    if args.sections and not args.her2st:
        parser.error("--sections needs --her2st PATH.")
    out = Path(args.out)
    problem = _output_problem(out, "--out", kind="a model folder", beside=True)
    if problem:
        parser.error(problem)
    if out.exists():  # checked before training: a folder hespotex did not write is refused, --overwrite or not
        from hespotex import _ownership
        from hespotex.tl._model import SETUP_FILE, WEIGHTS_FILE

        _ownership.check_replaceable(
            out, "model", what="hespotex model folder", option="--overwrite", legacy=(WEIGHTS_FILE, SETUP_FILE)
        )
        if not args.overwrite:
            msg = f"{str(out)!r} already exists; pass --overwrite to replace it, or --out another folder."
            raise FileExistsError(msg)
    genes, n_top = _genes_argument(args.genes)
    overrides = _config_overrides(args.set, parser)
    if args.epochs:
        overrides["epochs"] = args.epochs

    import hespotex as hx
    from hespotex.models import ModelConfig

    try:
        config = ModelConfig.preset(args.preset, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        parser.error(f"--set: {err.args[0] if err.args else err}")
    validation: object = args.validation
    if args.validation == "none":
        validation = None
    elif args.validation != "auto":
        try:
            validation = float(args.validation)
        except ValueError:
            parser.error(f"--validation expects auto, none or a fraction such as 0.2, found {args.validation!r}.")
    samples = _training_samples(args)
    for sdata in samples:
        hx.pp.embed(
            sdata, encoder=args.encoder, weights=args.weights, patch_um=args.patch_um, input_size=args.input_size
        )
    t0 = time.perf_counter()
    model = hx.tl.train(
        samples,
        genes=genes,
        n_top_genes=n_top,
        config=config,
        validation=validation,
        seed=args.seed,
        device=args.device or "auto",
    )
    model.save(out, overwrite=args.overwrite)
    sys.stdout.write(
        f"hespotex train: {len(model.genes)} genes from {len(samples)} samples ({', '.join(model.train_samples_)}) "
        f"in {time.perf_counter() - t0:.0f} s; model saved to {out}\n"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# tile


def tile_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``hespotex tile``: tissue, pseudo-spots and their table, written to a zarr store."""
    by_geometry = args.spot_diameter is not None or args.spacing is not None
    if args.model and by_geometry:
        parser.error("give either --model or --spot-diameter/--spacing, not both.")
    if not args.model and not (args.spot_diameter is not None and args.spacing is not None):
        parser.error("give --model DIR (its training geometry), or both --spot-diameter UM and --spacing UM.")
    slide, out = Path(args.slide), Path(args.out)
    if not slide.exists():
        parser.error(f"the slide {args.slide!r} does not exist.")
    if args.model and not args.model.startswith("hf-hub:") and not Path(args.model).is_dir():
        parser.error(f"--model {args.model!r} is not a folder; pass the folder written by `hespotex train`.")
    if out.exists() and not args.overwrite:
        msg = f"{str(out)!r} already exists; pass --overwrite to replace it, or --out another path."
        raise FileExistsError(msg)

    import hespotex as hx
    from hespotex._sample import get_sample_info

    sdata = hx.io.read_wsi(slide, microns_per_pixel=args.mpp)
    hx.pp.detect_tissue(sdata)
    geometry = (
        {"model": args.model} if args.model else {"spot_diameter_um": args.spot_diameter, "spacing_um": args.spacing}
    )
    table = hx.pp.tile(sdata, layout=args.layout, **geometry)
    attrs = dict(sdata.attrs)
    attrs["hespotex_slide"] = {**dict(attrs.get("hespotex_slide", {})), "path": str(slide.resolve())}
    if not args.with_image:
        from spatialdata import SpatialData

        sdata = SpatialData(shapes=dict(sdata.shapes), tables=dict(sdata.tables), attrs=attrs)
    else:
        sdata.attrs["hespotex_slide"] = attrs["hespotex_slide"]
    hx.io.write_zarr(sdata, out, overwrite=args.overwrite)
    info = get_sample_info(table)
    sys.stdout.write(
        f"hespotex tile: {table.n_obs} pseudo-spots of {info.spot_diameter_um:g} µm ({args.layout} layout) over the "
        f"tissue of {slide.name} at {info.microns_per_pixel:g} µm/px; written to {out}"
        f"{'' if args.with_image else ' (without the image: the slide path is recorded)'}\n"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# export

EXPORT_HELP = """Write predicted expression in the formats pathologists' viewers open.

PRED is a prediction store: OUT/<slide>.zarr written by `hespotex predict` (or hx.tl.predict(..., out=...)).
  geojson   spots (or tiles) as QuPath detections, predicted genes as their measurements
            (QuPath: File > Import objects from file), in full-resolution pixels of the slide;
  ome-tiff  a pyramidal, tiled OME-TIFF heatmap aligned to the slide (same size and µm per pixel;
            one channel per gene, or one file per gene with --per-gene) for QuPath and napari;
  png       an overview figure of the genes over the tissue (from a coarse level of the slide);
  csv       one row per spot: spot_id, x, y (pixels), x_um, y_um, then the genes.
"""
EXPORT_EPILOG = """examples:
  hespotex export predictions/slide.zarr --genes ERBB2 ESR1 --format geojson --out slide.geojson
  hespotex export predictions/slide.zarr --genes ERBB2 --format ome-tiff --out slide-ERBB2.ome.tif
  hespotex export predictions/slide.zarr --genes ERBB2 ESR1 --format ome-tiff --per-gene --out heatmaps/
  hespotex export predictions/slide.zarr --genes ERBB2 ESR1 CD8A --format png --out slide.png

exit codes: 0 written, 1 an error (e.g. a gene the model does not predict), 2 bad usage, a missing input
            or an existing --out without --overwrite
"""


def export_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``hespotex export``: GeoJSON, OME-TIFF, PNG or CSV from a prediction store."""
    import hespotex as hx

    pred = Path(args.prediction)
    if not pred.exists():
        parser.error(f"the prediction store {args.prediction!r} does not exist.")
    if args.per_gene and args.format != "ome-tiff":
        parser.error("--per-gene applies to --format ome-tiff.")
    if args.format == "png" and not args.genes:
        parser.error("--format png needs --genes (at most 16).")
    common = {"genes": args.genes, "key": args.key, "overwrite": args.overwrite}
    out = Path(args.out)
    if args.format == "geojson":
        written = [hx.io.write_geojson(pred, out, shape=args.shape, size_um=args.size_um, **common)]
    elif args.format == "csv":
        written = [hx.io.write_csv(pred, out, **common)]
    elif args.format == "png":
        written = [hx.io.write_png(pred, out, slide=args.slide, **common)]
    else:
        options = {"dtype": args.dtype, "shape": args.shape, "size_um": args.size_um, "downsample": args.downsample}
        if args.per_gene:
            from hespotex.io._export_common import open_prediction

            genes = args.genes or open_prediction(pred, key=args.key).genes
            out.mkdir(parents=True, exist_ok=True)
            written = [
                hx.io.write_ome_tiff(pred, out / f"{g}.ome.tif", genes=[g], key=args.key, overwrite=args.overwrite, **options)
                for g in genes
            ]
        else:
            written = [hx.io.write_ome_tiff(pred, out, **common, **options)]
    sys.stdout.write(f"hespotex export: wrote {', '.join(map(str, written))}\n")
    return 0


# --------------------------------------------------------------------------------------------------
# the command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hespotex`` and its subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="hespotex",
        description="Spot-level gene expression from H&E histology (HESpotEx). Run `hespotex COMMAND --help` for each command.",
        epilog="exit codes: 0 success, 1 an error (predict: some slides failed), 2 bad usage, a missing input or a refused overwrite",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages and full tracebacks on errors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_demo = sub.add_parser(
        "demo", help="train, predict an unseen slide, evaluate", description=DEMO_HELP, formatter_class=raw
    )
    p_demo.add_argument("--her2st", metavar="PATH", help="folder of the public her2st data (images/, counts/, spots/)")
    p_demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p_demo.add_argument("--quick", action="store_true", help="smaller synthetic slides and fewer epochs")
    p_demo.add_argument("--overwrite", action="store_true", help="replace results already in --out")

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
        "--mpp", type=_positive_float, metavar="X", help="microns per pixel of the slides, when their files do not say"
    )
    p_pred.add_argument(
        "--workers", type=_positive_int, metavar="N", help="worker processes for several slides (default: one per core)"
    )
    p_pred.add_argument("--layout", choices=["hex", "grid"], help="pseudo-spot layout (default: hexagonal, as Visium)")
    p_pred.add_argument("--device", metavar="NAME", help="torch device: cpu, cuda, cuda:1... (default: auto)")
    p_pred.add_argument(
        "--overwrite", action="store_true", help="predict finished slides again, replacing their results"
    )

    p_train = sub.add_parser(
        "train",
        help="train a model on spatial transcriptomics samples",
        description=TRAIN_HELP,
        epilog=TRAIN_EPILOG,
        formatter_class=raw,
    )
    p_train.add_argument(
        "samples", nargs="*", metavar="SAMPLE", help="SpatialData zarr stores or Space Ranger outs folders"
    )
    p_train.add_argument("--out", required=True, metavar="DIR", help="folder to save the model to")
    p_train.add_argument(
        "--genes",
        default="1000",
        metavar="N|FILE",
        help="number of most variable genes to predict, or a file of gene names (default: 1000)",
    )
    p_train.add_argument(
        "--encoder",
        default="efficientnet_lite0.imagenet",
        metavar="NAME",
        help="image encoder: a timm model name (default: efficientnet_lite0.imagenet)",
    )
    p_train.add_argument(
        "--weights", metavar="FILE", help="encoder weights file (e.g. a histology foundation model checkpoint)"
    )
    p_train.add_argument(
        "--patch-um", type=_positive_float, metavar="UM", help="patch side in µm (default: from the spot size)"
    )
    p_train.add_argument(
        "--input-size", type=_positive_int, metavar="PX", help="encoder input size in pixels (default: the encoder's)"
    )
    p_train.add_argument(
        "--preset",
        default="hespotex",
        choices=["hespotex", "paper"],
        help="model configuration preset (default: hespotex)",
    )
    p_train.add_argument("--epochs", type=_positive_int, metavar="N", help="training epochs (default: the preset's)")
    p_train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a model setting, e.g. --set ae_epochs=200 --set lr=0.003 (repeatable; see hx.models.ModelConfig)",
    )
    p_train.add_argument(
        "--validation", default="auto", metavar="auto|none|FRACTION", help="early stopping split (default: auto)"
    )
    p_train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p_train.add_argument("--device", metavar="NAME", help="torch device (default: auto)")
    p_train.add_argument(
        "--mpp",
        type=_positive_float,
        metavar="X",
        help="microns per pixel of Visium full-resolution images, when known",
    )
    p_train.add_argument(
        "--her2st", metavar="PATH", help="folder of the public her2st data set, to train on its sections"
    )
    p_train.add_argument(
        "--sections", nargs="+", metavar="ID", help="her2st sections to use (default: all), e.g. C2 C3"
    )
    p_train.add_argument("--overwrite", action="store_true", help="replace an existing model folder --out")

    p_tile = sub.add_parser(
        "tile",
        help="pseudo-spots over the tissue of a whole-slide image",
        description=TILE_HELP,
        epilog=TILE_EPILOG,
        formatter_class=raw,
    )
    p_tile.add_argument("slide", metavar="SLIDE", help="whole-slide image file (pyramidal TIFF / OME-TIFF, SVS...)")
    p_tile.add_argument("--out", required=True, metavar="ZARR", help="zarr store to write")
    p_tile.add_argument(
        "--model", metavar="DIR", help="model folder (or hf-hub:owner/name): use the spot geometry it was trained on"
    )
    p_tile.add_argument(
        "--spot-diameter",
        type=_positive_float,
        metavar="UM",
        help="pseudo-spot diameter in µm (with --spacing, instead of --model)",
    )
    p_tile.add_argument("--spacing", type=_positive_float, metavar="UM", help="centre-to-centre distance in µm")
    p_tile.add_argument(
        "--layout", default="hex", choices=["hex", "grid"], help="hexagonal (Visium-like, default) or square grid"
    )
    p_tile.add_argument(
        "--mpp", type=_positive_float, metavar="X", help="microns per pixel, when the file does not say"
    )
    p_tile.add_argument("--with-image", action="store_true", help="also copy the image pyramid into the store (large)")
    p_tile.add_argument("--overwrite", action="store_true", help="replace an existing store --out")
    p_export = sub.add_parser(
        "export",
        help="predictions as GeoJSON, OME-TIFF, PNG or CSV",
        description=EXPORT_HELP,
        epilog=EXPORT_EPILOG,
        formatter_class=raw,
    )
    p_export.add_argument("prediction", metavar="PRED", help="prediction store (OUT/<slide>.zarr of `hespotex predict`)")
    p_export.add_argument("--format", required=True, choices=["geojson", "ome-tiff", "png", "csv"], help="output format")
    p_export.add_argument("--out", required=True, metavar="PATH", help="output file (a folder with --per-gene)")
    p_export.add_argument("--genes", nargs="+", metavar="GENE", help="genes to export (default: all; png: required)")
    p_export.add_argument("--key", default="hespotex", help="prediction table and layer (default: hespotex)")
    p_export.add_argument(
        "--shape", default="circle", choices=["circle", "square"], help="spot footprint (default: circle)"
    )
    p_export.add_argument(
        "--size-um", type=_positive_float, metavar="UM", help="footprint diameter / side in µm (default: the spot's)"
    )
    p_export.add_argument(
        "--dtype", default="float32", choices=["float32", "uint16"], help="ome-tiff values (default: float32)"
    )
    p_export.add_argument(
        "--downsample", type=_positive_int, default=1, metavar="N", help="ome-tiff: slide pixels per heatmap pixel (default: 1)"
    )
    p_export.add_argument("--per-gene", action="store_true", help="ome-tiff: one file per gene in the folder --out")
    p_export.add_argument("--slide", metavar="FILE", help="png: the slide image, if not where the prediction says")
    p_export.add_argument("--overwrite", action="store_true", help="replace existing output files")
    for p in (p_demo, p_pred, p_train, p_tile, p_export):
        p.set_defaults(subparser=p)
    return parser


COMMANDS = {"predict": predict_command, "train": train_command, "tile": tile_command, "export": export_command}


def main(argv: list[str] | None = None) -> int:
    """Run ``hespotex`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    import hespotex as hx

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or bad usage (2)
        return int(exit_.code or 0)
    if args.quiet:
        logger.setLevel(logging.WARNING)
    elif args.verbose:
        logger.setLevel(logging.DEBUG)
    if args.no_progress:
        hx.settings.progress = False
    sub = args.subparser  # the subcommand's own parser, for its usage errors
    try:
        if args.command == "demo":
            demo(args.out, her2st=args.her2st, quick=args.quick, overwrite=args.overwrite)
            return 0
        return COMMANDS[args.command](args, sub)
    except SystemExit as exit_:  # sub.error(): bad usage
        return int(exit_.code or 0)
    except (FileExistsError, FileNotFoundError, NotADirectoryError) as err:
        logger.error("%s", err)
        logger.debug("Traceback:", exc_info=True)
        return 2
    except OSError as err:
        import errno

        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            logger.error("%s: %s", type(err).__name__, err)
            logger.debug("Traceback:", exc_info=True)
            return 1
        logger.error("Cannot write %r: %s. Choose an output you can write to.", err.filename, err.strerror)
        logger.debug("Traceback:", exc_info=True)
        return 2
    except Exception as err:  # any other failure: one clear line (full traceback with --verbose)
        logger.error("%s: %s", type(err).__name__, err)
        logger.debug("Traceback:", exc_info=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
