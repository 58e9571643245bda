"""``hespotex export``: predictions as GeoJSON (QuPath), OME-TIFF heatmaps, a PNG overview or CSV."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hespotex._constants import PREDICTION_KEY
from hespotex.cli._common import positive_float, positive_int

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
                hx.io.write_ome_tiff(
                    pred, out / f"{g}.ome.tif", genes=[g], key=args.key, overwrite=args.overwrite, **options
                )
                for g in genes
            ]
        else:
            written = [hx.io.write_ome_tiff(pred, out, **common, **options)]
    sys.stdout.write(f"hespotex export: wrote {', '.join(map(str, written))}\n")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hespotex export`` and its options to the subcommands ``sub``; return its parser."""
    raw = argparse.RawDescriptionHelpFormatter
    p_export = sub.add_parser(
        "export",
        help="predictions as GeoJSON, OME-TIFF, PNG or CSV",
        description=EXPORT_HELP,
        epilog=EXPORT_EPILOG,
        formatter_class=raw,
    )
    p_export.add_argument(
        "prediction", metavar="PRED", help="prediction store (OUT/<slide>.zarr of `hespotex predict`)"
    )
    p_export.add_argument(
        "--format", required=True, choices=["geojson", "ome-tiff", "png", "csv"], help="output format"
    )
    p_export.add_argument("--out", required=True, metavar="PATH", help="output file (a folder with --per-gene)")
    p_export.add_argument("--genes", nargs="+", metavar="GENE", help="genes to export (default: all; png: required)")
    p_export.add_argument("--key", default=PREDICTION_KEY, help=f"prediction key (default: {PREDICTION_KEY})")
    p_export.add_argument(
        "--shape", default="circle", choices=["circle", "square"], help="spot footprint (default: circle)"
    )
    p_export.add_argument(
        "--size-um", type=positive_float, metavar="UM", help="footprint diameter / side in µm (default: the spot's)"
    )
    p_export.add_argument(
        "--dtype", default="float32", choices=["float32", "uint16"], help="ome-tiff values (default: float32)"
    )
    p_export.add_argument(
        "--downsample",
        type=positive_int,
        default=1,
        metavar="N",
        help="ome-tiff: slide pixels per heatmap pixel (default: 1)",
    )
    p_export.add_argument("--per-gene", action="store_true", help="ome-tiff: one file per gene in the folder --out")
    p_export.add_argument("--slide", metavar="FILE", help="png: the slide image, if not where the prediction says")
    p_export.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p_export
