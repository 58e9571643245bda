"""The her2st data set (Andersson et al. 2021): HER2-positive breast cancer, legacy ST, read from disk.

The data is not shipped with hespotex (it was published without a licence file). Download it from
the authors (https://github.com/almaan/her2st, Zenodo record 4751624) and point ``HESPOTEX_DATA``
at the folder holding ``her2st/``, laid out as::

    her2st/images/C2.jpg  her2st/counts/C2.tsv.gz  her2st/spots/C2_selection.tsv  her2st/genes_785.txt
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hespotex.io._st import read_st

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData

logger = logging.getLogger("hespotex")

CITATION = (
    "Andersson A, Larsson L, Stenbeck L, et al. Spatial deconvolution of HER2-positive breast cancer "
    "delineates tumor-associated cell type interactions. Nat Commun 12, 6012 (2021). "
    "https://doi.org/10.1038/s41467-021-26271-2"
)
SOURCE = "https://github.com/almaan/her2st (data: https://doi.org/10.5281/zenodo.4751624)"
GENE_PANEL_FILE = "genes_785.txt"


def her2st_path(path: str | Path | None = None) -> Path:
    """Locate the her2st folder.

    Looks at ``path`` when given, else ``$HESPOTEX_DATA/her2st``, else ``../shared/data/her2st``
    beside the hespotex source tree. Reads nothing but the file system.

    Raises
    ------
    FileNotFoundError
        When no such folder exists; the message says where to get the data.

    Writes nothing.
    """
    tried: list[Path] = []
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = []
        env = os.environ.get("HESPOTEX_DATA")
        if env:
            candidates.append(Path(env) / "her2st")
        candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "her2st")
    for candidate in candidates:
        tried.append(candidate)
        if (candidate / "counts").is_dir() and (candidate / "spots").is_dir() and (candidate / "images").is_dir():
            return candidate
    msg = (
        f"Could not find the her2st data (looked in {[str(p) for p in tried]}; expected images/, counts/ and "
        f"spots/ folders there). It is not shipped with hespotex: download it from {SOURCE} "
        "(Andersson et al., Nat Commun 2021), then set HESPOTEX_DATA to the folder holding her2st/ "
        "or pass `path=`."
    )
    raise FileNotFoundError(msg)


def her2st_sections(path: str | Path | None = None) -> list[str]:
    """Section ids with a count table, a spot table and an image in the her2st folder (e.g. C2-C6).

    Reads the folder listing; writes nothing.
    """
    root = her2st_path(path)
    found = []
    for counts in sorted((root / "counts").glob("*.tsv.gz")):
        sid = counts.name[: -len(".tsv.gz")]
        if (root / "spots" / f"{sid}_selection.tsv").is_file() and (root / "images" / f"{sid}.jpg").is_file():
            found.append(sid)
    return found


def her2st(path: str | Path | None = None, *, sections: Sequence[str] | None = None) -> dict[str, SpatialData]:
    """Load her2st sections as samples, one per section id.

    Reads ``images/{id}.jpg``, ``counts/{id}.tsv.gz`` and ``spots/{id}_selection.tsv`` with
    :func:`hespotex.io.read_st` (``join="inner"``: the public files list a few selected spots without
    a count row, dropped and recorded in ``uns["hespotex_io"]``). Microns per pixel is fitted from the
    spot grid (200 µm pitch); spots are 100 µm wide.

    Parameters
    ----------
    path
        The her2st folder; default :func:`her2st_path`.
    sections
        Section ids to load (e.g. ``["C2", "C3"]``); default all found.

    Returns
    -------
    ``{section id: sample}``. Each table also holds ``uns["hespotex_dataset"]`` (name, section,
    citation, source, licence note).

    Reads the her2st folder; writes nothing there.
    """
    root = her2st_path(path)
    available = her2st_sections(root)
    if not available:
        msg = (
            "Found no complete her2st section (counts/ID.tsv.gz + spots/ID_selection.tsv + images/ID.jpg) in "
            f"{str(root)!r}."
        )
        raise FileNotFoundError(msg)
    wanted = (
        list(available)
        if sections is None
        else [str(s) for s in ([sections] if isinstance(sections, str) else sections)]
    )
    unknown = [s for s in wanted if s not in available]
    if unknown:
        msg = f"Expected her2st sections among {available}, found unknown {unknown}."
        raise ValueError(msg)
    out: dict[str, SpatialData] = {}
    for sid in wanted:
        sdata = read_st(
            root / "counts" / f"{sid}.tsv.gz",
            root / "spots" / f"{sid}_selection.tsv",
            root / "images" / f"{sid}.jpg",
            sample_id=sid,
            join="inner",
        )
        sdata.tables["table"].uns["hespotex_dataset"] = {
            "name": "her2st",
            "section": sid,
            "citation": CITATION,
            "source": SOURCE,
            "licence": "published without a licence file; use for testing and benchmarking, cite the paper",
        }
        out[sid] = sdata
    return out


def her2st_genes(path: str | Path | None = None) -> list[str]:
    """The 785-gene panel that HisToGene, Hist2ST and THItoGene report on (``genes_785.txt``, one per line).

    Reads ``genes_785.txt`` of the her2st folder; writes nothing.
    """
    file = her2st_path(path) / GENE_PANEL_FILE
    if not file.is_file():
        msg = f"Expected the gene panel {GENE_PANEL_FILE!r} in {str(file.parent)!r}, found no such file."
        raise FileNotFoundError(msg)
    genes = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    dup = sorted({g for g in genes if genes.count(g) > 1})
    if dup:
        msg = f"Expected unique genes in {file.name}, found duplicates {dup[:5]}."
        raise ValueError(msg)
    return genes
