"""``hespotex tile``: tissue detection and pseudo-spots over a whole-slide image, to a zarr store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hespotex.cli._common import positive_float

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
    from hespotex import _ownership

    _ownership.check_zarr_replaceable(out, option="--overwrite")  # before the work: only a zarr store is replaced
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


def add_tile_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hespotex tile`` and its options to the subcommands ``sub``; return its parser."""
    raw = argparse.RawDescriptionHelpFormatter
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
        type=positive_float,
        metavar="UM",
        help="pseudo-spot diameter in µm (with --spacing, instead of --model)",
    )
    p_tile.add_argument("--spacing", type=positive_float, metavar="UM", help="centre-to-centre distance in µm")
    p_tile.add_argument(
        "--layout", default="hex", choices=["hex", "grid"], help="hexagonal (Visium-like, default) or square grid"
    )
    p_tile.add_argument("--mpp", type=positive_float, metavar="X", help="microns per pixel, when the file does not say")
    p_tile.add_argument("--with-image", action="store_true", help="also copy the image pyramid into the store (large)")
    p_tile.add_argument("--overwrite", action="store_true", help="replace an existing store --out")
    return p_tile
