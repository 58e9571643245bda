"""``hx.tl.explain`` explains the prediction ``hx.tl.predict`` makes, also for a model that standardises each
slide's embeddings by the slide's own statistics (``embedding_norm="slide"``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import hespotex as hx
from hespotex.pp._stain import slide_statistics
from hespotex.tl.model._data import GraphData, graph_data

pytestmark = pytest.mark.usefixtures("single_threaded")

GENE = "gene_0019"


@pytest.fixture(scope="module")
def slide_normalised(trained_synthetic):
    """The fixture's model set to standardise per slide, and the test section predicted by it."""
    model = copy.deepcopy(trained_synthetic["model"])
    model.embedding_norm = "slide"
    sdata = copy.deepcopy(trained_synthetic["test"])
    hx.tl.predict(sdata, model, device="cpu", key_added="slide_norm")
    table = sdata.tables["table"]
    stats = slide_statistics(graph_data(table, "t", genes=None).emb)
    assert np.abs(stats[0] - model.embedding_mean_).max() > 0.05  # the two standardisations differ on this slide
    return model, sdata


def test_explain_forward_equals_predict_for_slide_norm(slide_normalised):
    model, sdata = slide_normalised
    table = sdata.tables["table"]
    pred = np.asarray(table.layers["slide_norm"][:, table.var_names.get_loc(GENE)])
    ex = hx.tl.explain(sdata, model, genes=GENE, n_spots=3, n_steps=16)
    rows = table.obs_names.get_indexer(ex.spots)
    assert np.allclose(ex.score, pred[rows], atol=1e-4)
    # the attribution forward on the re-encoded patch is the prediction predict made (not the one under the
    # training statistics)
    assert np.allclose(ex.pixel_score, pred[rows], atol=1e-3)
    assert ex.params["neighbour_baseline"] == "slide mean embedding (standardised zero)"
    # neighbours: completeness from the slide's mean embedding, through predict_graph (the prediction path)
    sample = graph_data(table, "t", genes=None)
    mean, scale = slide_statistics(sample.emb)
    at_mean = np.broadcast_to(mean, sample.emb.shape).copy()  # every spot at the slide's mean (standardised zero)
    fixed = copy.deepcopy(model)  # the slide's statistics, fixed (a constant slide has no statistics of its own)
    fixed.embedding_norm, fixed.embedding_mean_, fixed.embedding_scale_ = "training", mean, scale
    base = fixed.predict_graph(GraphData("t", at_mean, sample.coords_um), device="cpu", smooth=0.5)["expression"]
    base = base[:, model.genes.index(GENE)]
    for i, spot in enumerate(ex.spots):
        nb = ex.neighbours[ex.neighbours["target"] == spot]
        total = pred[rows[i]] - base[rows[i]]
        assert nb["attribution"].sum() - ex.agreement.loc[spot, "delta"] == pytest.approx(total, abs=2e-3)
