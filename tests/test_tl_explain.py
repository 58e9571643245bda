"""``hx.tl.explain`` / ``patch_saliency``: integrated gradients to pixels and to neighbouring spots.

The synthetic sections (:func:`hespotex.datasets.synthetic`) make expression a known function of
what the image shows under each spot (nuclear density, size, type, stain: fine detail), so the
model must read the patch's detail: removing the most salient detail must change its prediction
more than removing the same area at random.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import hespotex as hx
from hespotex.pp._encoders import load_encoder
from hespotex.pp._graph import knn_graph
from hespotex.tl.explanation._attributions import _baseline_patch
from hespotex.tl.explanation._explain import Explanation, patch_saliency
from hespotex.tl.model._data import GraphData, graph_data

pytestmark = pytest.mark.usefixtures("single_threaded")

GENE = "gene_0019"  # image-driven and the best predicted gene of the fixture's test section (Pearson 0.84)
SIGNATURE = {"gene_0019": 2.0, "gene_0032": 1.0, "gene_0007": -1.0}


@pytest.fixture(scope="module")
def explained(trained_synthetic):
    """Pixel (blur baseline) and neighbour attributions of GENE at the five spots where it is predicted highest."""
    return hx.tl.explain(
        trained_synthetic["test"], trained_synthetic["model"], genes=GENE, n_spots=5, baseline="blur", n_steps=64
    )


@pytest.fixture(scope="module")
def rescore(trained_synthetic):
    """``rescore(spot, patch=None, emb=None, smooth=0.5)``: the model's GENE prediction at ``spot`` (smoothed as
    ``hx.tl.predict`` smooths it by default) with its patch (float (1, 3, h, w) in [0, 1]) re-encoded by the public
    encoder, or with other embeddings: an independent path."""
    model, table = trained_synthetic["model"], trained_synthetic["test"].tables["table"]
    enc = load_encoder(model.embedding["encoder"], input_size=model.embedding["input_size"])
    sample = graph_data(table, "t", genes=None)
    g = model.genes.index(GENE)

    def score(spot: str, patch=None, emb=None, smooth=0.5) -> float:
        t = table.obs_names.get_loc(spot)
        emb = sample.emb.copy() if emb is None else emb
        if patch is not None:
            with torch.no_grad():
                emb[t] = enc.encode(patch)[0].numpy()
        expr = model.predict_graph(GraphData("t", emb, sample.coords_um), device="cpu")["expression"][:, g]
        if smooth is None:
            return float(expr[t])
        # hx.tl.predict's smoothing, written out: the spot at weight `smooth`, its 6 nearest spots sharing the rest
        A = knn_graph(sample.coords_um, 6)[0].toarray()
        row = (1 - smooth) * A[t] / A[t].sum()
        row[t] = smooth
        return float(row @ expr.astype(np.float64))

    score.emb = sample.emb
    return score


def test_default_spots_scores_and_patches(explained, trained_synthetic):
    table = trained_synthetic["test"].tables["table"]
    pred = table.layers["hespotex"][:, table.var_names.get_loc(GENE)]
    assert isinstance(explained, Explanation)
    assert explained.spots == list(table.obs_names[np.argsort(-pred)[:5]])  # the top spots by the score
    assert np.allclose(explained.score, np.sort(pred)[::-1][:5], atol=1e-4)
    # the patches are exactly the crops the stored embeddings were computed from
    size = trained_synthetic["input_size"]
    assert explained.patches.shape == (5, size, size, 3) and explained.patches.dtype == np.uint8
    expected = hx.pp.extract_patches(
        trained_synthetic["test"],
        patch_um=trained_synthetic["model"].embedding["patch_um"],
        size=size,
        spots=explained.spots,
    )
    assert np.array_equal(explained.patches, expected)
    assert np.allclose(explained.pixel_score, explained.score, atol=1e-3)  # re-encoding gives the stored embedding
    assert explained.saliency.shape == (5, size, size) and explained.saliency.dtype == np.float32
    assert (explained.saliency >= 0).all() and (explained.saliency.reshape(5, -1).max(1) > 0).all()
    assert explained.params["baseline"] == "blur" and explained.params["genes"] == [GENE]
    assert explained.params["smooth"] == 0.5  # hx.tl.predict's default smoothing, as the layer was predicted


def test_pixel_completeness(explained, rescore, trained_synthetic):
    # integrated gradients sum to f(x) - f(baseline) up to captum's convergence delta ...
    gap = explained.pixel_attribution_sum - (explained.pixel_score - explained.pixel_baseline_score)
    assert np.allclose(gap, explained.pixel_delta, atol=1e-3)
    # ... where f(baseline) is the model's prediction with the baseline patch, computed independently
    # (the blur of the uint8 patch differs from the blur of the float crop by quantisation only)
    for i, spot in enumerate(explained.spots):
        x = torch.from_numpy(explained.patches[i]).permute(2, 0, 1)[None].float() / 255
        assert rescore(spot, _baseline_patch(x, "blur")) == pytest.approx(explained.pixel_baseline_score[i], abs=0.03)
    spot = explained.spots[0]
    white = hx.tl.explain(
        trained_synthetic["test"], trained_synthetic["model"], genes=GENE, spots=[spot], n_steps=4, neighbours=False
    )
    assert white.params["baseline"] == "white"
    assert rescore(spot, torch.ones(1, 3, 64, 64)) == pytest.approx(white.pixel_baseline_score[0], abs=1e-4)
    assert white.pixel_attribution_sum[0] - white.pixel_delta[0] == pytest.approx(
        white.pixel_score[0] - white.pixel_baseline_score[0], abs=1e-3
    )


def test_saliency_marks_what_drives_the_gene(explained, rescore):
    """Blurring the most salient pixels changes the prediction more than blurring the least salient ones or
    random ones of the same area (5 spots x 3 areas; the blur removes the nuclear detail the law reads)."""
    rng = np.random.default_rng(0)
    top, rand, bottom = [], [], []
    for i, spot in enumerate(explained.spots):
        x = torch.from_numpy(explained.patches[i]).permute(2, 0, 1)[None].float() / 255
        blurred = _baseline_patch(x, "blur")
        sal = explained.saliency[i].ravel()
        f0 = rescore(spot, x)

        def change(idx, x=x, blurred=blurred, sal=sal, spot=spot, f0=f0) -> float:
            mask = torch.zeros(sal.size, dtype=torch.bool)
            mask[idx] = True
            return abs(rescore(spot, torch.where(mask.view(1, 1, *explained.saliency.shape[1:]), blurred, x)) - f0)

        order = np.argsort(-sal)
        for frac in (0.05, 0.1, 0.2):
            k = int(sal.size * frac)
            top.append(change(order[:k]))
            bottom.append(change(order[-k:]))
            rand.append(np.mean([change(rng.choice(sal.size, k, replace=False)) for _ in range(3)]))
    top, rand, bottom = map(np.array, (top, rand, bottom))
    assert (top > bottom).mean() >= 0.8, (top, bottom)
    assert np.median(top / rand) > 1.0 and top.mean() > rand.mean(), (top, rand)


def test_neighbour_attribution(explained, rescore, trained_synthetic):
    nb, agree = explained.neighbours, explained.agreement
    assert list(nb.columns) == ["target", "source", "hop", "attribution", "share", "attention"]
    assert set(nb["target"]) == set(explained.spots) == set(agree.index)
    n_hops = trained_synthetic["model"].config.n_hops
    for spot in explained.spots:
        rows = nb[nb["target"] == spot]
        # the smoothed score reads the target's 6 nearest spots too: its sources reach one ring further
        assert (rows.loc[rows["source"] == spot, "hop"] == 0).all() and rows["hop"].between(0, n_hops + 1).all()
        assert rows["hop"].max() == n_hops + 1
        assert rows["share"].sum() == pytest.approx(1.0)
        # completeness: attributions sum to f(E) - f(all spots at the training mean)
        model = trained_synthetic["model"]
        at_mean = np.broadcast_to(model.embedding_mean_, rescore.emb.shape).copy()
        total = rescore(spot) - rescore(spot, emb=at_mean)
        assert rows["attribution"].sum() - agree.loc[spot, "delta"] == pytest.approx(total, abs=2e-3)
        assert abs(agree.loc[spot, "delta"]) < 0.15 * rows["attribution"].abs().sum()
        # attention is given for the one-hop sources (self included) and sums to 1 over them
        one = rows[rows["hop"] <= 1]
        assert one["attention"].notna().all() and rows.loc[rows["hop"] > 1, "attention"].isna().all()
        assert one["attention"].sum() == pytest.approx(1.0, abs=1e-4)
    assert agree["spearman"].between(-1, 1).all()


def test_unsmoothed_explanation(trained_synthetic, rescore):
    """``smooth=None`` explains the network's output at the spot alone: its score, its neighbourhood (``n_hops``),
    completeness against the unsmoothed prediction."""
    sdata, model = trained_synthetic["test"], trained_synthetic["model"]
    table = sdata.tables["table"]
    spot = table.obs_names[7]
    ex = hx.tl.explain(sdata, model, genes=GENE, spots=[spot], n_steps=32, pixels=False, smooth=None)
    raw = hx.tl.predict(copy.deepcopy(sdata), model, device="cpu", smooth=None, key_added="raw")
    assert ex.score[0] == pytest.approx(float(raw.layers["raw"][7, raw.var_names.get_loc(GENE)]), abs=1e-4)
    assert ex.score[0] == pytest.approx(rescore(spot, smooth=None), abs=1e-4)
    assert ex.score[0] != pytest.approx(rescore(spot), abs=1e-4)  # the default (smoothed) score differs
    assert ex.params["smooth"] is None
    assert ex.neighbours["hop"].between(0, model.config.n_hops).all()
    at_mean = np.broadcast_to(model.embedding_mean_, rescore.emb.shape).copy()
    total = rescore(spot, smooth=None) - rescore(spot, emb=at_mean, smooth=None)
    assert ex.neighbours["attribution"].sum() - ex.agreement.loc[spot, "delta"] == pytest.approx(total, abs=2e-3)


def test_top_attributed_neighbour_matters_more(explained, rescore, trained_synthetic):
    """Moving the top-attributed neighbour's embedding to the training mean changes the target more than moving the
    least one."""
    table = trained_synthetic["test"].tables["table"]
    mean = trained_synthetic["model"].embedding_mean_
    big, small = [], []
    for spot in explained.spots:
        rows = explained.neighbours[(explained.neighbours["target"] == spot) & (explained.neighbours["hop"] > 0)]
        order = rows["attribution"].abs().sort_values(ascending=False).index
        f0 = rescore(spot)
        for source, out in ((rows.loc[order[0], "source"], big), (rows.loc[order[-1], "source"], small)):
            emb = rescore.emb.copy()
            emb[table.obs_names.get_loc(source)] = mean
            out.append(abs(rescore(spot, emb=emb) - f0))
    assert all(b > s for b, s in zip(big, small, strict=True)), (big, small)


def test_signature_and_patch_saliency(trained_synthetic):
    sdata, model = trained_synthetic["test"], trained_synthetic["model"]
    table = sdata.tables["table"]
    spots = list(table.obs_names[[5, 40]])
    ex = hx.tl.explain(sdata, model, signature=SIGNATURE, spots=spots, n_steps=8, pixels=False)
    w = np.array(list(SIGNATURE.values())) / 4.0
    pred = table.layers["hespotex"][:, table.var_names.get_indexer(list(SIGNATURE))]
    assert np.allclose(ex.weights, w) and np.allclose(ex.score, pred[[5, 40]] @ w, atol=1e-4)
    assert ex.patches is None and ex.spots == spots
    patches, sal = patch_saliency(sdata, model, spots=spots[:1], genes=[GENE], n_steps=8)
    assert patches.shape == (1, 64, 64, 3) and patches.dtype == np.uint8
    assert sal.dtype == np.float32 and sal.max() == pytest.approx(1.0) and sal.min() >= 0


def test_table_only_explains_neighbours(trained_synthetic):
    table = copy.deepcopy(trained_synthetic["test"].tables["table"])
    ex = hx.tl.explain(table, trained_synthetic["model"], genes=GENE, spots=[table.obs_names[3]], n_steps=8)
    assert ex.saliency is None and ex.patches is None and len(ex.neighbours)
    with pytest.raises(ValueError, match="image"):
        hx.tl.explain(table, trained_synthetic["model"], genes=GENE, pixels=True)
    with pytest.raises(ValueError, match="image"):
        patch_saliency(table, trained_synthetic["model"], spots=[table.obs_names[3]], genes=GENE)


def test_bad_input(trained_synthetic):
    sdata, model = trained_synthetic["test"], trained_synthetic["model"]
    with pytest.raises(KeyError, match="does not predict"):
        hx.tl.explain(sdata, model, genes=["gene_0019", "NOT_A_GENE"])
    with pytest.raises(ValueError, match="exactly one"):
        hx.tl.explain(sdata, model, genes=GENE, signature=[GENE])
    with pytest.raises(ValueError, match="exactly one"):
        hx.tl.explain(sdata, model)
    with pytest.raises(KeyError, match="not in the table"):
        hx.tl.explain(sdata, model, genes=GENE, spots=["spot_00001", "nowhere"])
    with pytest.raises(ValueError, match="baseline"):
        hx.tl.explain(sdata, model, genes=GENE, baseline="grey")
    with pytest.raises(ValueError, match="not all zero"):
        hx.tl.explain(sdata, model, signature={GENE: 0.0})
