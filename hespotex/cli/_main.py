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

from hespotex.cli._demo import add_demo_parser, demo_command
from hespotex.cli._export import add_export_parser, export_command
from hespotex.cli._predict import add_predict_parser, predict_command
from hespotex.cli._tile import add_tile_parser, tile_command
from hespotex.cli._train import add_train_parser, train_command

logger = logging.getLogger("hespotex")

# --------------------------------------------------------------------------------------------------
# the command


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hespotex`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="hespotex",
        description="Spot-level gene expression from H&E histology (HESpotEx). Run `hespotex COMMAND --help` for each "
        "command.",
        epilog="exit codes: 0 success, 1 an error (predict: some slides failed), 2 bad usage, a missing input or a "
        "refused overwrite",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages and full tracebacks on errors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    parsers = [
        add_demo_parser(sub),
        add_predict_parser(sub),
        add_train_parser(sub),
        add_tile_parser(sub),
        add_export_parser(sub),
    ]
    for p in parsers:
        p.set_defaults(subparser=p)
    return parser


COMMANDS = {
    "demo": demo_command,
    "predict": predict_command,
    "train": train_command,
    "tile": tile_command,
    "export": export_command,
}


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
