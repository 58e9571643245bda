"""``hx.tl.attention``: per-spot summaries of the decoder attention, checked against a direct computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp

import hespotex as hx

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture
def table(trained_synthetic):
    """A deep copy of the predicted test section's table (the session fixture stays read-only)."""
    return copy.deepcopy(trained_synthetic["test"].tables["table"])


def test_summaries_match_direct_computation(table):
    out = hx.tl.attention(table, top_k=3, copy=True)
    assert "hespotex_attention_stats_self" not in table.obs  # copy=True leaves the input alone
    att = table.obsp["hespotex_attention"].toarray()
    n = table.n_obs
    assert np.allclose(att.sum(axis=1), 1.0, atol=1e-5)
    for i in range(n):
        row = att[i]
        nz = np.flatnonzero(row)
        p = row[nz]
        assert out.obs["hespotex_attention_stats_entropy"].iloc[i] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-6)
        assert out.obs["hespotex_attention_stats_self"].iloc[i] == pytest.approx(row[i], abs=1e-7)
        assert out.obs["hespotex_attention_stats_neighbours"].iloc[i] == pytest.approx(1 - row[i], abs=1e-6)
        neigh = nz[nz != i]
        assert out.obs["hespotex_attention_stats_degree"].iloc[i] == len(neigh)
        assert out.obs["hespotex_attention_stats_entropy_normalised"].iloc[i] == pytest.approx(
            -(p * np.log(p)).sum() / np.log(len(neigh) + 1), abs=1e-6
        )
        strongest = neigh[np.argsort(-row[neigh], kind="stable")][:3]
        idx = out.obsm["hespotex_attention_stats_top_index"][i]
        assert list(idx[: len(strongest)]) == list(strongest)
        assert i not in idx  # the spot itself is never listed among its neighbours
        assert np.allclose(out.obsm["hespotex_attention_stats_top_weight"][i][: len(strongest)], row[strongest])
    # self and neighbour weights are different things: swapping them would break the checks above,
    # and on this model the self weight is not one half everywhere
    assert np.abs(out.obs["hespotex_attention_stats_self"] - 0.5).max() > 0.1
    assert out.uns["hespotex_attention_stats_summary"]["params"] == {
        "key": "hespotex", "attention_key": "hespotex_attention", "top_k": 3, "key_added": "hespotex_attention_stats",
        "n_spots": n,
    }  # fmt: skip


def test_in_place_padding_and_overwrite(table):
    # one spot keeps a single neighbour: top-k is padded with -1 / 0
    att = table.obsp["hespotex_attention"].tolil()
    row = att[0].toarray().ravel()
    keep = [0, int(np.flatnonzero((row > 0) & (np.arange(len(row)) != 0))[0])]
    att[0, :] = 0
    att[0, keep[0]], att[0, keep[1]] = 0.7, 0.3
    table.obsp["custom"] = att.tocsr()
    assert hx.tl.attention(table, key="custom", top_k=4, key_added="att") is None
    assert list(table.obsm["att_top_index"][0]) == [keep[1], -1, -1, -1]
    assert list(table.obsm["att_top_weight"][0]) == pytest.approx([0.3, 0, 0, 0])
    assert table.obs["att_degree"].iloc[0] == 1
    assert table.obs["att_self"].iloc[0] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="overwrite=True"):
        hx.tl.attention(table, key="custom", key_added="att")
    hx.tl.attention(table, key="custom", top_k=2, key_added="att", overwrite=True)
    assert table.obsm["att_top_index"].shape == (table.n_obs, 2)


def test_spatialdata_input_finds_the_table(trained_synthetic):
    sdata = trained_synthetic["test"]
    out = hx.tl.attention(sdata, copy=True)
    assert out is not sdata.tables["table"]
    assert "hespotex_attention_stats_entropy" in out.obs
    assert "hespotex_attention_stats_entropy" not in sdata.tables["table"].obs


def test_paper_preset_predictions_have_no_attention(table):
    # what hx.tl.predict records for a model without decoder attention (the "paper" preset's SAGE)
    table.uns["hespotex"] = copy.deepcopy(table.uns["hespotex"])
    table.uns["hespotex"]["params"]["attention_key"] = None
    table.uns["hespotex"]["params"]["config"]["decoder_conv"] = "sage"
    del table.obsp["hespotex_attention"]
    with pytest.raises(ValueError, match="'hespotex' preset"):
        hx.tl.attention(table)


def test_bad_inputs(table):
    with pytest.raises(KeyError, match=r"no prediction 'nope'.*obsp"):
        hx.tl.attention(table, key="nope")
    bad = copy.deepcopy(table)
    bad.obsp["hespotex_attention"] = bad.obsp["hespotex_attention"] * 2.0
    with pytest.raises(ValueError, match="sum to 1"):
        hx.tl.attention(bad)
    bad.obsp["hespotex_attention"] = sp.csr_matrix(table.obsp["hespotex_attention"].T)  # columns, not rows, sum to 1
    with pytest.raises(ValueError, match="sum to 1"):
        hx.tl.attention(bad)
    bare = copy.deepcopy(table)
    del bare.uns["hespotex"], bare.layers["hespotex"]  # no prediction "hespotex" at all
    with pytest.raises(KeyError, match=r"hx\.tl\.predict"):
        hx.tl.attention(bare)
    with pytest.raises(ValueError, match="top_k"):
        hx.tl.attention(table, top_k=-1)
