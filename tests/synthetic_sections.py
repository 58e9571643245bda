"""Synthetic sections shared by the tests: a train/train/test trio, and samples written as zarr stores for the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hespotex as hx

TRIO = (("a", 1), ("b", 2), ("t", 3))


def trio(prefix: str = "s", *, n_spots: int = 60, n_genes: int = 10) -> dict:
    """Two training sections ``a``, ``b`` and a test section ``t`` (one expression programme, 1 µm per pixel), never
    embedded; sample ids ``f"{prefix}{name}"``."""
    return {
        name: hx.datasets.synthetic(
            n_spots=n_spots,
            n_genes=n_genes,
            seed=seed,
            program_seed=0,
            microns_per_pixel=1.0,
            sample_id=f"{prefix}{name}",
        )
        for name, seed in TRIO
    }


def cli_samples(
    tmp_path: Path, make: Callable[[str, int], object], first_seed: int, n: int = 2
) -> tuple[list[str], Path]:
    """``n`` sections ``make(f"z{i}", first_seed + i)`` written to ``tmp_path/z{i}.zarr``, and ``tmp_path/genes.txt``
    with their genes: the sample paths and the genes file, as ``hespotex train`` takes them."""
    samples = []
    for i in range(n):
        sdata = make(f"z{i}", first_seed + i)
        hx.io.write_zarr(sdata, tmp_path / f"z{i}.zarr")
        samples.append(str(tmp_path / f"z{i}.zarr"))
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(sdata.tables["table"].var_names) + "\n")
    return samples, genes
