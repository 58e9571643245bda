"""``hx.tl.consistency``: agreement of expression statistics between serial sections.

Synthetic serial sections share one image -> expression law (same ``program_seed``) and differ in
tissue (``seed``). No model is trained here: the "predicted" layer is the generator's noiseless
expected expression (log1p CP10k), the "measured" layer the log-normalised sampled counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

# loaded now, before `single_threaded` limits BLAS threads: libraries loaded later escape the limit
from sklearn import cluster  # noqa: F401

import hespotex as hx
from hespotex.pp._normalize import log_expression
from hespotex.tl.evaluation._consistency import morans_i

pytestmark = pytest.mark.usefixtures("single_threaded")


def _with_layers(table):
    t = table.copy()
    e = np.asarray(t.layers["expected"], dtype=np.float64)
    t.layers["hespotex"] = np.log1p(e / e.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)
    t.layers["measured"] = log_expression(t, None)
    return t


@pytest.fixture(scope="module")
def serial():
    """Three serial sections (tables holding layers "hespotex" and "measured")."""
    out = {}
    for seed in (1, 2, 3):
        sdata = hx.datasets.synthetic(
            n_spots=150, n_genes=30, seed=seed, program_seed=0, microns_per_pixel=4.0, sample_id=f"s{seed}"
        )
        out[f"s{seed}"] = _with_layers(sdata.tables["table"])
    return out


def _shuffled(table, seed=0):
    t = table.copy()
    perm = np.random.default_rng(seed).permutation(t.n_obs)
    for key in ("hespotex", "measured"):
        t.layers[key] = np.asarray(t.layers[key])[perm]
    return t


def _value(df, stat, a, b, kind="predicted"):
    row = df[(df.statistic == stat) & (df.section_a == a) & (df.section_b == b)]
    assert len(row) == 1
    return float(row[kind].iloc[0])


def test_serial_sections_agree(serial):
    df = hx.tl.consistency(serial)
    assert list(df.columns) == ["statistic", "measure", "section_a", "section_b", "predicted", "measured", "n"]
    assert len(df) == 3 * 3  # three statistics x three pairs
    assert df.groupby("statistic", sort=False)["measure"].first().to_dict() == {
        "mean": "pearson",
        "morans_i": "pearson",
        "domains": "js_distance",
    }
    mean = df[df.statistic == "mean"]
    assert (mean[["predicted", "measured"]] > 0.85).all().all() and (mean["n"] == 30).all()
    moran = df[df.statistic == "morans_i"]
    assert (moran[["predicted", "measured"]] > 0.2).all().all()  # the same genes are spatially patterned
    dom = df[df.statistic == "domains"]
    assert dom[["predicted", "measured"]].apply(lambda c: c.between(0, 1)).all().all() and (dom["n"] == 5).all()
    assert (dom[["predicted", "measured"]] < 0.4).all().all()
    per = df.attrs["per_section"]
    # the reported agreement is the Pearson of the per-section statistics
    a = per[(per.statistic == "mean") & (per.section == "s1")]["predicted"].to_numpy()
    b = per[(per.statistic == "mean") & (per.section == "s2")]["predicted"].to_numpy()
    assert _value(df, "mean", "s1", "s2") == pytest.approx(np.corrcoef(a, b)[0, 1])
    np.testing.assert_allclose(a, np.asarray(serial["s1"].layers["hespotex"]).mean(axis=0), rtol=1e-6)
    comp = per[(per.statistic == "domains")].groupby("section")["predicted"].sum()
    np.testing.assert_allclose(comp, 1.0)
    assert df.attrs["params"]["graphs"]["s1"].startswith("6-nearest")
    # same input, same output
    pd.testing.assert_frame_equal(df, hx.tl.consistency(serial))


def test_shuffled_section_loses_autocorrelation(serial):
    sections = {**serial, "shuffled": _shuffled(serial["s3"])}
    df = hx.tl.consistency(sections, statistics=("mean", "morans_i"))
    for kind in ("predicted", "measured"):
        for other in ("s1", "s2"):
            assert _value(df, "morans_i", other, "shuffled", kind) < _value(df, "morans_i", other, "s3", kind) - 0.2
            # shuffling spots keeps every mean: mean agreement is unchanged
            assert _value(df, "mean", other, "shuffled", kind) == pytest.approx(_value(df, "mean", other, "s3", kind))
    per = df.attrs["per_section"]
    shuffled = per[(per.statistic == "morans_i") & (per.section == "shuffled")]["predicted"]
    intact = per[(per.statistic == "morans_i") & (per.section == "s3")]["predicted"]
    assert shuffled.abs().mean() < 0.15 < intact.mean()


def test_domain_composition_detects_a_different_section(serial):
    # a "section" made of the tumour-dominated spots of s1 only has another domain composition
    s1 = serial["s1"]
    tumour = s1[s1.obs["synthetic_domain"] == "tumour"].copy()
    assert 20 < tumour.n_obs < s1.n_obs
    df = hx.tl.consistency({**serial, "tumour_only": tumour}, statistics="domains")
    for kind in ("predicted", "measured"):
        serial_pairs = [_value(df, "domains", a, b, kind) for a, b in (("s1", "s2"), ("s1", "s3"), ("s2", "s3"))]
        odd = [_value(df, "domains", a, "tumour_only", kind) for a in ("s1", "s2", "s3")]
        assert min(odd) > max(serial_pairs)


def test_morans_i_matches_a_dense_computation():
    rng = np.random.default_rng(0)
    n = 12
    w = (rng.random((n, n)) < 0.3).astype(float) * rng.uniform(0.5, 2.0, (n, n))
    np.fill_diagonal(w, 0)
    w[5] = 0  # a spot without neighbours
    x = rng.standard_normal((n, 4))
    x[:, 2] = 3.0  # constant gene
    got = morans_i(x, sp.csr_matrix(w))
    wr = w / np.where(w.sum(1, keepdims=True) > 0, w.sum(1, keepdims=True), 1)
    for j in range(x.shape[1]):
        z = x[:, j] - x[:, j].mean()
        num = sum(wr[a, b] * z[a] * z[b] for a in range(n) for b in range(n))
        den = (z**2).sum()
        expected = n / wr.sum() * num / den if den > 0 else np.nan
        if j == 2:
            assert np.isnan(got[j])
        else:
            assert got[j] == pytest.approx(expected, rel=1e-10)
    # a smooth gradient is strongly autocorrelated on a chain graph, alternating values anti-correlated
    chain = sp.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1])
    assert morans_i(np.arange(n, dtype=float), chain)[0] > 0.7
    assert morans_i((-1.0) ** np.arange(n), chain)[0] == pytest.approx(-1.0)


def test_inputs(serial, sample_factory):
    # lists of SpatialData, a stored graph, predictions only
    samples = [sample_factory(n_spots=40, n_genes=10, seed=s, sample_id=f"r{s}", image_shape=None) for s in (0, 1)]
    for s in samples:
        t = s.tables["table"]
        t.layers["pred"] = log_expression(t, None)
    hx.pp.spatial_graph(samples[0])
    df = hx.tl.consistency(samples, key="pred", truth="X")
    assert set(df.section_a) == {"r0"} and set(df.section_b) == {"r1"}
    assert df["predicted"].to_numpy() == pytest.approx(df["measured"].to_numpy(), nan_ok=True)
    assert df.attrs["params"]["graphs"] == {
        "r0": "obsp['spatial_connectivities']",
        "r1": "6-nearest-neighbour graph of the spot centres",
    }
    only = hx.tl.consistency(
        serial, truth=None, genes=["gene_0000", "gene_0001", "gene_0002", "gene_0003"], statistics=["mean"]
    )
    assert only["measured"].isna().all() and only["predicted"].notna().all() and (only["n"] == 4).all()


def test_bad_input(serial):
    with pytest.raises(ValueError, match="two or more"):
        hx.tl.consistency({"s1": serial["s1"]})
    with pytest.raises(KeyError, match="layers\\['nope'\\]"):
        hx.tl.consistency(serial, key="nope")
    with pytest.raises(KeyError, match="predicted expression"):
        hx.tl.consistency({"a": serial["s1"], "b": serial["s2"].copy()}, key="hespotex2")
    with pytest.raises(ValueError, match="statistics among"):
        hx.tl.consistency(serial, statistics=["variance"])
    with pytest.raises(KeyError, match="lacks 1 of the requested genes"):
        hx.tl.consistency(serial, genes=["gene_0000", "NOPE"])
    with pytest.raises(ValueError, match="n_domains"):
        hx.tl.consistency(serial, n_domains=1)
    with pytest.raises(ValueError, match="lower `n_domains`"):
        hx.tl.consistency(serial, n_domains=1000)


@pytest.mark.realdata
def test_her2st_serial_sections(shared_data):
    """her2st C2-C6, no model: "predicted" is the measured expression smoothed over each spot's graph
    neighbours (a stand-in with known properties), "measured" the log-normalised counts themselves.

    Asserted: per-gene means agree strongly across these serial sections (they do for any sensible
    expression table); Moran's I profiles agree positively; smoothing raises Moran's I; domain
    compositions are proper distances. Nothing here says anything about a trained model."""
    from hespotex._sample import spot_centres_um
    from hespotex.pp._genes import shared_genes
    from hespotex.pp._graph import knn_graph
    from hespotex.tl.evaluation._baselines import smooth

    samples = hx.datasets.her2st(shared_data / "her2st")
    assert list(samples) == ["C2", "C3", "C4", "C5", "C6"]
    tables = {k: s.tables["table"] for k, s in samples.items()}
    common = shared_genes(list(tables.values()))
    panel = [g for g in hx.datasets.her2st_genes(shared_data / "her2st") if g in set(common)]
    y = np.concatenate([log_expression(t, panel) for t in tables.values()])
    genes = [panel[i] for i in np.argsort(-y.mean(axis=0), kind="stable")[:100]]
    subset = {}
    for name, t in tables.items():
        sub = t[:, genes].copy()
        sub.layers["measured"] = log_expression(t, genes)
        conn, _ = knn_graph(spot_centres_um(t), 6)
        sub.layers["smoothed"] = smooth(sub.layers["measured"], conn)
        subset[name] = sub
    df = hx.tl.consistency(subset, key="smoothed", truth="measured", n_domains=4)
    assert len(df) == 3 * 10
    mean = df[df.statistic == "mean"]
    assert (mean[["predicted", "measured"]] > 0.9).all().all()
    moran = df[df.statistic == "morans_i"]
    assert (moran["measured"] > 0).all() and moran["measured"].median() > 0.3
    assert (moran["predicted"] > 0).all()
    per = df.attrs["per_section"]
    mi = per[per.statistic == "morans_i"].groupby("section")[["predicted", "measured"]].mean()
    assert (mi["predicted"] > mi["measured"]).all()  # smoothing raises spatial autocorrelation
    dom = df[df.statistic == "domains"]
    assert dom[["predicted", "measured"]].apply(lambda c: c.between(0, 1)).all().all()
