"""Normalisation and gene selection: definitions, records, training-only fitting, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import hespotex as hx
from hespotex.io import build_sample


def _planted(seed: int, sid: str, n: int = 200, g: int = 300):
    """Poisson counts (means spread over 0.1-20) where genes 0-4 are bimodal, far more variable than
    their mean predicts, and genes 5-9 are the most expressed but flat."""
    rng = np.random.default_rng(seed)
    mean = np.exp(np.random.default_rng(99).uniform(np.log(0.1), np.log(20.0), g))
    mean[5:10] = 200.0
    lam = np.tile(mean, (n, 1))
    lam[:, :5] = rng.choice([0.05, 30.0], size=(n, 5))
    counts = rng.poisson(lam)
    return build_sample(
        None,
        rng.uniform(0, 1000, (n, 2)),
        counts,
        obs=pd.DataFrame(index=[f"{sid}{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(g)]),
        sample_id=sid,
        microns_per_pixel=1.0,
        spot_diameter_um=55.0,
    )


def test_normalize_library_over_all_genes_and_keeps_counts():
    sdata = _planted(0, "A")
    table = sdata["table"]
    raw = table.X.copy()
    hx.pp.normalize(sdata)
    np.testing.assert_array_equal(table.layers["counts"].toarray(), raw.toarray())
    per_spot = np.expm1(table.X.toarray()).sum(axis=1)
    np.testing.assert_allclose(per_spot[raw.sum(axis=1).A1 > 0], 1e4, rtol=1e-4)
    assert table.uns["hespotex_normalize"]["params"]["library"] == "all genes"
    with pytest.raises(ValueError, match="already log-normalised"):
        hx.pp.normalize(sdata)
    hx.pp.normalize(sdata, overwrite=True, target_sum=1e6)  # renormalises from the kept counts
    np.testing.assert_allclose(np.expm1(table.X.toarray()).sum(axis=1)[raw.sum(axis=1).A1 > 0], 1e6, rtol=1e-4)


def test_normalize_refuses_non_counts():
    table = _planted(0, "A")["table"]
    table.X = table.X * 0.5
    with pytest.raises(ValueError, match="raw integer counts"):
        hx.pp.normalize(table)


def test_seurat_v3_finds_planted_variable_genes_on_training_samples_only():
    train = [_planted(0, "A"), _planted(1, "B")]
    test = _planted(2, "C")
    genes = hx.pp.select_genes(train, n_top_genes=5)
    assert set(genes) == {f"g{i}" for i in range(5)}
    for s in train:
        record = s["table"].uns["hespotex_genes"]
        assert record["fitted_on"] == ["A", "B"] and record["genes"] == genes
        assert s["table"].var["hespotex_genes"].sum() == 5
    assert "hespotex_genes" not in test["table"].var  # the test sample is never looked at


def test_mean_flavor_and_given_list():
    train = [_planted(0, "A")]
    genes = hx.pp.select_genes(train, n_top_genes=5, flavor="mean")
    assert set(genes) == {f"g{i}" for i in range(5, 10)}
    with pytest.raises(ValueError, match="overwrite=True"):
        hx.pp.select_genes(train, genes=["g1", "g2"])
    assert hx.pp.select_genes(train, genes=["g1", "g2"], overwrite=True) == ["g1", "g2"]
    with pytest.raises(ValueError, match="absent from at least one sample"):
        hx.pp.select_genes(train, genes=["g1", "NOPE"], overwrite=True)
    with pytest.raises(ValueError, match="share only 300"):
        hx.pp.select_genes(train, n_top_genes=301, overwrite=True)


def test_selection_is_restricted_to_shared_genes():
    a, b = _planted(0, "A"), _planted(1, "B")
    b["table"].var_names = [f"x{i}" if i < 5 else f"g{i}" for i in range(300)]
    genes = hx.pp.select_genes([a, b], n_top_genes=10, flavor="mean")
    assert not {f"g{i}" for i in range(5)} & set(genes)
