"""``hespotex demo``: train, predict an unseen slide, evaluate, write the results."""

from __future__ import annotations

import argparse

from hespotex._demo import demo

DEMO_HELP = """Train HESpotEx, predict a slide it did not train on, evaluate, write the results.

By default the slides are synthetic sections made by hespotex itself (expression is a known
function of the H&E-like image), so the demo needs no download. With --her2st PATH it runs on the
public HER2+ breast cancer sections (Andersson et al. 2021): trains on C2-C5 and predicts C6.
"""


def demo_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``hespotex demo``."""
    demo(args.out, her2st=args.her2st, quick=args.quick or None, overwrite=args.overwrite)
    return 0


def add_demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hespotex demo`` and its options to the subcommands ``sub``; return its parser."""
    raw = argparse.RawDescriptionHelpFormatter
    p_demo = sub.add_parser(
        "demo", help="train, predict an unseen slide, evaluate", description=DEMO_HELP, formatter_class=raw
    )
    p_demo.add_argument("--her2st", metavar="PATH", help="folder of the public her2st data (images/, counts/, spots/)")
    p_demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p_demo.add_argument(
        "--quick", action="store_true", help="smaller synthetic slides and fewer epochs (also HESPOTEX_QUICK=1)"
    )
    p_demo.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    return p_demo
