"""``hespotex train``: train a model on samples with spatial transcriptomics and save it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hespotex.cli._common import is_visium_outs, is_zarr_store, output_problem, positive_float, positive_int
from hespotex.pp._encoder_base import DEFAULT_ENCODER
from hespotex.pp._stain_augment import DEFAULT_DIHEDRAL_AUGMENT, DEFAULT_SCALE_AUGMENT

TRAIN_HELP = """Train HESpotEx on samples with spatial transcriptomics, then save the model folder.

SAMPLEs are SpatialData zarr stores written by hespotex (hx.io.write_zarr) or 10x Space Ranger
`outs` folders (filtered_feature_bc_matrix.h5 and spatial/); --her2st adds sections of the public
her2st data set. Each sample's H&E patches (the spot patch and, by default, a context patch twice as
wide: --context-um) are embedded with the frozen --encoder (cached under ~/.cache/hespotex), then the
model learns the expression of --genes genes from them. The saved
folder (model.safetensors + setup.json) is what `hespotex predict --model` and hx.tl.HESpotEx.load read.
With 3 or more samples an ensemble is trained by default (--ensemble): two members per sample held out
for early stopping, saved as one folder (ensemble.json + member_*/) that `hespotex predict --model` and
hx.tl.load_model read; its predictions add the members' spread (layer 'hespotex_spread') and
their agreement per gene (var column 'hespotex_agreement').
"""
TRAIN_EPILOG = """examples:
  hespotex train --out my-model sampleA.zarr sampleB.zarr
  hespotex train --out my-model --genes 2000 --epochs 200 visium/A1/outs visium/B1/outs
  hespotex train --out her2st-model --genes genes_785.txt --her2st data/her2st --sections C2 C3 C4

exit codes: 0 model saved, 1 an error, 2 bad usage, a missing input or an existing --out without --overwrite
"""


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
        if is_zarr_store(path):
            samples.append(hx.io.read_zarr(path))
        elif is_visium_outs(path):
            samples.append(hx.io.read_visium(path, microns_per_pixel=args.mpp))
        else:
            msg = (
                f"{text!r} is neither a SpatialData zarr store (written by hx.io.write_zarr) nor a Space Ranger "
                "`outs` folder (filtered_feature_bc_matrix.h5 and spatial/). Convert it with an hx.io reader first."
            )
            raise ValueError(msg)
    return samples


def _context_argument(text: str) -> float | str | None:
    """``--context-um``: ``auto``, ``none`` or a context patch side in µm."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        msg = f"expected auto, none or a context patch side in µm such as 200, found {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


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
    problem = output_problem(out, "--out", kind="a model folder", beside=True)
    if problem:
        parser.error(problem)
    if out.exists():  # checked before training: a folder hespotex did not write is refused, --overwrite or not
        from hespotex import _ownership
        from hespotex.tl.model._model import SETUP_FILE, WEIGHTS_FILE

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
    from hespotex._constants import EMBEDDING_KEY
    from hespotex._sample import get_table

    fresh = [EMBEDDING_KEY not in get_table(sdata).obsm for sdata in samples]  # views only with new embeddings
    context = args.context_um
    if context == "auto":  # as hx.tl.train(..., context_um="auto"): twice the patch, or as the samples embedded
        from hespotex.pp._context import default_context_um

        context = default_context_um(dict(enumerate(samples)), EMBEDDING_KEY)
    reference = None
    if args.stain_norm != "none":
        reference = hx.pp.stain_reference(
            samples, method=args.stain_norm, patch_um=args.patch_um, input_size=args.input_size or 224
        )
    for sdata, new in zip(samples, fresh, strict=True):
        hx.pp.embed(
            sdata, encoder=args.encoder, weights=args.weights, patch_um=args.patch_um, input_size=args.input_size,
            context_um=context, stain_augment=args.stain_views if new else 0,
            scale_augment=args.scale_augment if new and args.stain_views else 0.0,
            dihedral_augment=bool(args.dihedral_augment and new and args.stain_views),
            stain_norm=None if reference is None else args.stain_norm, stain_reference=reference, tta=args.tta,
        )  # fmt: skip
    t0 = time.perf_counter()
    model = hx.tl.train(
        samples,
        genes=genes,
        n_top_genes=n_top,
        config=config,
        validation=validation,
        ensemble=_ensemble_choice(args.ensemble),
        seed=args.seed,
        device=args.device or "auto",
        tta=True if args.tta else None,
    )
    model.save(out, overwrite=args.overwrite)
    sys.stdout.write(
        f"hespotex train: {len(model.genes)} genes from {len(samples)} samples ({', '.join(model.train_samples_)}) "
        f"in {time.perf_counter() - t0:.0f} s; model saved to {out}\n"
    )
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``hespotex train`` and its options to the subcommands ``sub``; return its parser."""
    raw = argparse.RawDescriptionHelpFormatter
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
        default=DEFAULT_ENCODER,
        metavar="NAME",
        help=f"image encoder: a timm model name (default: {DEFAULT_ENCODER})",
    )
    p_train.add_argument(
        "--weights", metavar="FILE", help="encoder weights file (e.g. a histology foundation model checkpoint)"
    )
    p_train.add_argument(
        "--patch-um", type=positive_float, metavar="UM", help="patch side in µm (default: from the spot size)"
    )
    p_train.add_argument(
        "--context-um",
        type=_context_argument,
        default="auto",
        metavar="auto|none|UM",
        help="two-scale embeddings: also embed a context patch of this side in µm around each spot (default auto: "
        "twice the patch, e.g. 200 µm around 100 µm spots; two encoder passes per spot; samples already embedded "
        "keep their scales); none: the spot patch only",
    )
    p_train.add_argument(
        "--input-size", type=positive_int, metavar="PX", help="encoder input size in pixels (default: the encoder's)"
    )
    p_train.add_argument(
        "--stain-views",
        type=int,
        default=4,
        metavar="N",
        help="stain-augmented views per spot to train on, embedded once with samples not embedded yet (default: 4; "
        "0: clean patches only; 5 times the encoder work with 4)",
    )
    p_train.add_argument(
        "--scale-augment",
        type=float,
        default=DEFAULT_SCALE_AUGMENT,
        metavar="F",
        help=f"with stain views: each view also cut with its field of view scaled by up to this fraction (default: "
        f"{DEFAULT_SCALE_AUGMENT:g}, i.e. ±{round(100 * DEFAULT_SCALE_AUGMENT)} %%; 0: views at the patch's own scale)",
    )
    p_train.add_argument(
        "--dihedral-augment",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_DIHEDRAL_AUGMENT,
        help="with stain views: each view also flipped / turned by one of the 8 transforms of the square (default: on)",
    )
    p_train.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: embed each patch in its 8 flips/rotations, averaged (8 times the encoder work); "
        "recorded in the model, so `hespotex predict` embeds new slides the same way",
    )
    p_train.add_argument(
        "--stain-norm",
        default="none",
        choices=["none", "macenko"],
        help="stain normalisation of every patch to a reference fitted on the training samples (default: none)",
    )
    p_train.add_argument(
        "--preset",
        default="hespotex",
        choices=["hespotex", "paper"],
        help="model configuration preset (default: hespotex)",
    )
    p_train.add_argument("--epochs", type=positive_int, metavar="N", help="training epochs (default: the preset's)")
    p_train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a model setting, e.g. --set ae_epochs=200 --set lr=0.003 (repeatable; see "
        "hx.models.ModelConfig)",
    )
    p_train.add_argument(
        "--validation", default="auto", metavar="auto|none|FRACTION", help="early stopping split (default: auto)"
    )
    p_train.add_argument(
        "--ensemble", type=_ensemble_argument, default="auto", metavar="auto|yes|no|K",
        help="members per sample held out for early stopping (yes: 2, K: K), averaged, saved as one folder "
        "(default auto: yes with 3 or more samples and --validation auto)",
    )  # fmt: skip
    p_train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p_train.add_argument("--device", metavar="NAME", help="torch device (default: auto)")
    p_train.add_argument(
        "--mpp",
        type=positive_float,
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
    return p_train


def _ensemble_argument(text: str) -> str:
    """``--ensemble``: auto, yes, no or a positive number of members per held-out sample."""
    if text in ("auto", "yes", "no") or (text.isdigit() and int(text) >= 1):
        return text
    msg = f"expected auto, yes, no or a number of members per held-out sample (1 or more), found {text!r}"
    raise argparse.ArgumentTypeError(msg)


def _ensemble_choice(text: str) -> bool | int | str:
    """The ``ensemble`` of :func:`hespotex.tl.train` for a checked ``--ensemble``."""
    choices: dict[str, bool | str] = {"auto": "auto", "yes": True, "no": False}
    return choices[text] if text in choices else int(text)
