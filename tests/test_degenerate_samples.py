"""Degenerate samples (no counts, one spot, too few spots for the graphs) get a clear error naming the
sample before scanpy's seurat_v3 loess can crash the interpreter.

Each case runs in a forked child process: with the guard missing, the child dies of a segmentation
fault, and the test run survives to report it.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import scanpy  # noqa: F401  (imported once here, so each forked child starts quickly)
import scipy.sparse as sp
import torch
from conftest import make_sample

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.tl.model._data import EMBEDDING_KEY

TINY = ModelConfig.preset(
    "hespotex",
    epochs=1,
    ae_epochs=1,
    ae_hidden_dim=16,
    latent_dim=8,
    projection_hidden_dim=16,
    head_hidden_dim=16,
    decoder_heads=2,
)


def _sample(name: str, n_spots: int, *, seed: int = 0, zero: bool = False, n_varying: int | None = None):
    """A sample's table with counts and (random) embeddings; ``zero``: every count 0; ``n_varying``:
    only that many genes vary across spots (the others are 1 everywhere)."""
    table = make_sample(n_spots=n_spots, n_genes=40, seed=seed, sample_id=name, image_shape=None)
    table = table.tables["table"] if hasattr(table, "tables") else table
    for key in ("counts", None):
        x = table.layers.get(key) if key else table.X
        if x is None:
            continue
        x = sp.lil_matrix(x, dtype=np.float32)
        if zero:
            x[:, :] = 0
        if n_varying is not None:
            x[:, n_varying:] = 1
            x[:, :n_varying] = np.arange(n_spots)[:, None] % 7 + np.arange(n_varying)
        if key:
            table.layers[key] = x.tocsr()
        else:
            table.X = x.tocsr()
    table.obsm[EMBEDDING_KEY] = np.random.default_rng(seed).normal(size=(table.n_obs, 8)).astype(np.float32)
    return table


CASES = {
    "all-zero sample": (
        lambda: hx.pp.select_genes(
            {"a": _sample("a", 80), "b": _sample("b", 60, seed=1, zero=True)}, n_top=10, key_added=None
        ),
        "Sample 'b' has no counts: all 60 spots are zero in the 40 genes used for gene selection",
    ),
    "one-spot sample": (
        lambda: hx.pp.select_genes({"a": _sample("a", 80), "b": _sample("b", 1, seed=1)}, n_top=10, key_added=None),
        "Sample 'b' has 1 spot; gene selection needs at least 2 per sample",
    ),
    "the only sample all zero": (
        lambda: hx.pp.select_genes({"a": _sample("a", 80, zero=True)}, n_top=10, key_added=None),
        "Sample 'a' has no counts: all 80 spots are zero",
    ),
    "three genes vary": (
        lambda: hx.pp.select_genes(
            {"a": _sample("a", 80), "b": _sample("b", 30, seed=1, n_varying=3)}, n_top=10, key_added=None
        ),
        "Sample 'b' has only 3 genes that vary across its 30 spots; seurat_v3 gene selection fits a mean-variance "
        "curve per sample and needs at least 14",
    ),
    "train: one-spot sample": (
        lambda: hx.tl.train(
            {"a": _sample("a", 80), "b": _sample("b", 1, seed=1)}, n_top_genes=10, config=TINY, device="cpu"
        ),
        "Sample 'b' has 1 spots, too few for the 8-neighbour graphs",
    ),
    "cross_validate: all-zero sample": (
        lambda: hx.tl.cross_validate(
            {"a": _sample("a", 80), "b": _sample("b", 80, seed=1), "c": _sample("c", 60, seed=2, zero=True)},
            methods=("ridge",),
            n_top_genes=10,
            device="cpu",
        ),
        "Sample 'c' has no counts: all 60 spots are zero in the 40 genes used for cross-validation",
    ),
    "cross_validate: too few spots": (
        lambda: hx.tl.cross_validate(
            {"a": _sample("a", 80), "b": _sample("b", 80, seed=1), "c": _sample("c", 5, seed=2)},
            methods=("hespotex", "ridge"),
            config=TINY,
            n_top_genes=10,
            device="cpu",
        ),
        "Sample 'c' has 5 spots; cross-validation (the 8-neighbour spatial graphs) needs at least 9 per sample",
    ),
}


def _child(case: str, conn) -> None:
    torch.set_num_threads(1)
    try:
        CASES[case][0]()
        conn.send("no error")
    except Exception as err:  # reported to the parent, which asserts on it
        conn.send(f"{type(err).__name__}: {err}")


@pytest.mark.parametrize("case", list(CASES))
def test_degenerate_sample_is_a_clear_error_not_a_crash(case):
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(case, child))
    proc.start()
    child.close()
    proc.join(600)
    assert proc.exitcode == 0, f"{case}: the process died with exit code {proc.exitcode} (-11: segmentation fault)"
    result = parent.recv()
    assert result.startswith("ValueError: "), result
    assert CASES[case][1] in result, result
