"""Array-level evaluation metrics: per-gene Pearson, p-values, significance counts, rankings, summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse, stats

from hespotex.tl.evaluation._metrics import (
    gene_scores,
    n_significant,
    pearson_per_gene,
    pearson_pvalues,
    summarize,
    summarize_samples,
    top_genes,
)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(120, 40))
    pred = truth * np.linspace(-1, 2, 40) + rng.normal(size=truth.shape)
    return truth, pred


def test_pearson_matches_scipy(pair):
    truth, pred = pair
    r = pearson_per_gene(truth, pred)
    expected = np.array([stats.pearsonr(truth[:, j], pred[:, j])[0] for j in range(truth.shape[1])])
    np.testing.assert_allclose(r, expected, rtol=1e-12, atol=1e-12)
    # sparse truth gives the same numbers as its dense form
    sp_truth = np.where(truth > 0.5, truth, 0.0)
    np.testing.assert_allclose(
        pearson_per_gene(sparse.csr_matrix(sp_truth), pred), pearson_per_gene(sp_truth, pred), rtol=1e-12
    )


def test_pearson_many_genes_in_blocks(monkeypatch):
    """Blocks of genes (bounded memory) give the same result as one block."""
    import hespotex.tl.evaluation._correlation as m

    rng = np.random.default_rng(1)
    truth, pred = rng.normal(size=(50, 300)), rng.normal(size=(50, 300))
    whole = pearson_per_gene(truth, pred)
    monkeypatch.setattr(m, "_BLOCK_BYTES", 50 * 8 * 7)  # 7 genes per block
    np.testing.assert_array_equal(pearson_per_gene(truth, pred), whole)


def test_pearson_nan_for_constant_truth_zero_for_constant_prediction(pair):
    truth, pred = pair[0].copy(), pair[1].copy()
    truth[:, 0] = 3.0
    truth[:, 1] = 0.1  # float constant whose mean is not exactly 0.1
    pred[:, 2] = -7.0
    r = pearson_per_gene(truth, pred)
    assert np.isnan(r[:2]).all()
    assert r[2] == 0.0  # a constant prediction says nothing: it scores 0, it is not dropped
    assert np.isfinite(r[2:]).all()


def test_pearson_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        pearson_per_gene(np.zeros((5, 3)), np.zeros((5, 4)))


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_pvalues_match_scipy(pair, alternative):
    truth, pred = pair[0][:15], pair[1][:15]  # few spots: p-values far from 0 and 1
    r = pearson_per_gene(truth, pred)
    p = pearson_pvalues(r, truth.shape[0], alternative=alternative)
    expected = [stats.pearsonr(truth[:, j], pred[:, j], alternative=alternative)[1] for j in range(truth.shape[1])]
    np.testing.assert_allclose(p, expected, rtol=1e-9, atol=1e-14)
    assert np.isnan(pearson_pvalues([np.nan], 10)).all()


def test_n_significant_counts_planted_positive_genes():
    rng = np.random.default_rng(2)
    n, n_pos, n_neg, n_null = 80, 20, 15, 300
    truth = rng.normal(size=(n, n_pos + n_neg + n_null))
    pred = rng.normal(size=truth.shape)
    pred[:, :n_pos] = truth[:, :n_pos] + 0.8 * rng.normal(size=(n, n_pos))
    pred[:, n_pos : n_pos + n_neg] = -truth[:, n_pos : n_pos + n_neg]  # strong but negative: not counted
    r = pearson_per_gene(truth, pred)
    count = n_significant(r, n)
    assert n_pos <= count <= n_pos + 3
    assert n_significant(r, n, correction="bonferroni") <= count <= n_significant(r, n, correction=None)
    # uncorrected testing of the null genes alone finds about alpha of them; BH finds (almost) none
    null = r[n_pos + n_neg :]
    assert 0.01 * n_null < n_significant(null, n, correction=None) < 0.12 * n_null
    assert n_significant(null, n) <= 2
    assert n_significant(np.array([np.nan, np.nan]), n) == 0


def test_top_genes_finds_planted_variable_and_expressed_genes():
    rng = np.random.default_rng(3)
    y = rng.normal(1.0, 0.1, size=(200, 60))
    hv, he = [7, 31, 50], [2, 19, 44]
    y[:, hv] = rng.normal(1.0, 2.0, size=(200, 3))
    y[:, he] += np.array([5.0, 6.0, 4.0])
    before = y.copy()
    assert list(top_genes(y, 3, by="hvg")) == sorted(hv, key=lambda j: -y[:, j].var())
    assert list(top_genes(y, 3, by="mean")) == [19, 2, 44]
    names = [f"g{j}" for j in range(60)]
    assert set(top_genes(sparse.csr_matrix(y), 3, by="mean", gene_names=names)) == {"g2", "g19", "g44"}
    assert set(top_genes(sparse.csr_matrix(y), 3, by="hvg")) == set(hv)
    assert len(top_genes(y, 1000)) == 60
    np.testing.assert_array_equal(y, before)  # the input is not modified
    with pytest.raises(ValueError, match="by"):
        top_genes(y, 3, by="variance")


def test_top_genes_dispersion_matches_scanpy_seurat():
    import anndata as ad
    import scanpy as sc

    rng = np.random.default_rng(4)
    rates = rng.gamma(0.6, 2.0, size=300)
    counts = rng.poisson(rates * rng.gamma(2.0, 0.5, size=(150, 1)) * rng.gamma(1.0, 1.0, size=(150, 300)))
    counts[:, 5] = 0  # never expressed: ranks last
    y = np.log1p(counts.astype(float))
    k = 30
    expected = sc.pp.highly_variable_genes(ad.AnnData(y), flavor="seurat", n_top_genes=k, inplace=False)
    ours = top_genes(y, k, by="hvg", hvg_method="dispersion")
    assert set(ours) == set(np.flatnonzero(expected["highly_variable"].to_numpy()))
    never = np.flatnonzero(counts.sum(axis=0) == 0)
    assert 5 in never
    assert set(top_genes(y, 300, by="hvg", hvg_method="dispersion")[-len(never) :]) == set(never)


def test_gene_scores_table(pair):
    truth, pred = pair
    names = [f"g{j}" for j in range(truth.shape[1])]
    df = gene_scores(truth, pred, names)
    assert list(df.columns) == [
        "pearson", "pvalue", "mse", "mean_true", "var_true", "n_spots", "truth_constant", "prediction_constant"
    ]  # fmt: skip
    assert not df["truth_constant"].any() and not df["prediction_constant"].any()
    assert list(df.index) == names
    np.testing.assert_allclose(df["pearson"], pearson_per_gene(truth, pred))
    np.testing.assert_allclose(df["mse"], ((truth - pred) ** 2).mean(axis=0))
    np.testing.assert_allclose(df["mean_true"], truth.mean(axis=0))
    np.testing.assert_allclose(df["var_true"], truth.var(axis=0, ddof=1))
    np.testing.assert_allclose(df["pvalue"], pearson_pvalues(df["pearson"], truth.shape[0]))
    assert (df["n_spots"] == truth.shape[0]).all()


def test_gene_scores_per_sample_and_pooled(pair):
    truth, pred = pair
    groups = np.array(["B"] * 50 + ["A"] * 70)
    df = gene_scores(truth, pred, groups=groups)
    assert list(df["sample"].unique()) == ["B", "A", "pooled"]
    assert len(df) == 3 * truth.shape[1]
    a = df[df["sample"] == "A"].set_index("gene")
    np.testing.assert_allclose(a["pearson"], pearson_per_gene(truth[50:], pred[50:]))
    assert (a["n_spots"] == 70).all()
    pooled = df[df["sample"] == "pooled"].set_index("gene")
    np.testing.assert_allclose(pooled["pearson"], pearson_per_gene(truth, pred))
    table = summarize_samples(df, hvg=["0", "1"])
    assert list(table.index) == ["B", "A", "pooled"]
    assert table.loc["A", "pearson_mean"] == pytest.approx(np.nanmean(a["pearson"]))
    with pytest.raises(ValueError, match="reserved"):
        gene_scores(truth, pred, groups=["pooled"] * truth.shape[0])
    with pytest.raises(ValueError, match="summarize_samples"):
        summarize(df)


def test_summarize(pair):
    truth, pred = pair[0].copy(), pair[1]
    truth[:, 0] = 1.0  # undefined correlation
    names = [f"g{j}" for j in range(truth.shape[1])]
    df = gene_scores(truth, pred, names)
    out = summarize(df, hvg=["g1", "g2", "g3"], heg=["g39", "g0"])
    r = df["pearson"]
    assert out["pearson_mean"] == pytest.approx(r.iloc[1:].mean())
    assert out["pearson_mean_hvg"] == pytest.approx(r.iloc[1:4].mean())
    assert out["pearson_mean_heg"] == pytest.approx(r.iloc[39])
    assert out["mse"] == pytest.approx(df["mse"].mean())
    assert out["n_significant"] == n_significant(r.to_numpy(), truth.shape[0])
    assert out["n_significant"] > 0
    assert (out["n_genes"], out["n_nan"]) == (40, 1)
    assert "pearson_mean_hvg" not in summarize(df)
    with pytest.raises(KeyError, match="not in the score table"):
        summarize(df, hvg=["nope"])


def test_dense_many_genes():
    """A 1,000 x 5,457 evaluation in one vectorised call (its speed is measured in benchmarks, not here)."""
    rng = np.random.default_rng(5)
    truth = rng.normal(size=(1000, 5457)).astype(np.float32)
    pred = truth + rng.normal(size=truth.shape).astype(np.float32)
    df = gene_scores(truth, pred)
    assert isinstance(df, pd.DataFrame)
    assert df["pearson"].between(0.6, 0.8).all()
