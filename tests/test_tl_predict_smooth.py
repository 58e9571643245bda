"""``hx.tl.predict(..., smooth=w)``: each spot keeps weight ``w`` of its prediction and takes the rest from its 6
nearest spots; the same in memory and streaming, for single models and ensembles (members smoothed before their
mean and spread), recorded, and refused when a streamed run would mix two smoothings."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import hespotex as hx

pytestmark = pytest.mark.usefixtures("single_threaded")
CHUNK = 96  # several graph blocks and expression steps on the 300-spot slide


@pytest.fixture(scope="module")
def slide():
    return hx.datasets.synthetic(
        n_spots=300, n_genes=40, seed=7, program_seed=0, microns_per_pixel=1.0, sample_id="smooth"
    )


def _coords_um(table):
    from hespotex._sample import SAMPLE_KEY

    return np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2] * float(
        table.uns[SAMPLE_KEY]["microns_per_pixel"]
    )


def test_smoothed_prediction_is_the_spot_and_its_six_neighbours(slide, trained_synthetic):
    from hespotex.pp._graph import knn_graph

    model = trained_synthetic["model"]
    raw = hx.tl.predict(copy.deepcopy(slide), model, device="cpu", smooth=None)
    half = hx.tl.predict(copy.deepcopy(slide), model, device="cpu")  # the default: the spot at weight 0.5
    P = np.asarray(raw.layers["hespotex"], dtype=np.float64)
    A = knn_graph(_coords_um(raw), 6)[0].toarray()  # symmetric 6-NN graph of the spot centres
    want = 0.5 * P + 0.5 * (A @ P) / A.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(half.layers["hespotex"], want, rtol=1e-4, atol=1e-5)
    assert half.uns["hespotex"]["params"]["smooth"] == 0.5
    assert raw.uns["hespotex"]["params"]["smooth"] is None
    same = hx.tl.predict(copy.deepcopy(slide), model, device="cpu", smooth=1.0)  # the spot alone: unchanged
    np.testing.assert_allclose(same.layers["hespotex"], raw.layers["hespotex"], rtol=1e-5, atol=1e-6)


def test_streamed_smoothing_equals_in_memory(slide, trained_synthetic, tmp_path):
    model = trained_synthetic["model"]
    memory = hx.tl.predict(copy.deepcopy(slide), model, device="cpu", smooth=0.5)
    out = tmp_path / "s.zarr"
    streamed = hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=out, chunk_size=CHUNK, smooth=0.5)
    np.testing.assert_allclose(np.asarray(streamed.layers["hespotex"]), memory.layers["hespotex"], atol=2e-5)
    assert streamed.uns["hespotex"]["params"]["smooth"] == 0.5
    # resuming or reusing that store with another smoothing would mix rows: refused, with what to do
    with pytest.raises(ValueError, match=r"smooth=0.5, not smooth=None.*overwrite=True"):
        hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=out, chunk_size=CHUNK, smooth=None)
    again = hx.tl.predict(
        copy.deepcopy(slide), model, device="cpu", out=out, chunk_size=CHUNK, overwrite=True, smooth=None
    )
    raw = hx.tl.predict(copy.deepcopy(slide), model, device="cpu", smooth=None)
    np.testing.assert_allclose(np.asarray(again.layers["hespotex"]), raw.layers["hespotex"], atol=2e-5)


def test_ensemble_members_are_smoothed_before_mean_and_spread(trained_ensemble, tmp_path):
    from hespotex.pp._graph import knn_graph
    from hespotex.tl.evaluation._baselines import smooth

    model = trained_ensemble["model"]
    raw = hx.tl.predict(copy.deepcopy(trained_ensemble["test"]), model, device="cpu", smooth=None)
    half = hx.tl.predict(copy.deepcopy(trained_ensemble["test"]), model, device="cpu", smooth=0.5)
    want = smooth(raw.layers["hespotex"], knn_graph(_coords_um(raw), 6)[0], self_weight=0.5)  # linear: mean commutes
    np.testing.assert_allclose(half.layers["hespotex"], want, rtol=1e-4, atol=1e-5)
    # the spread is the members' spread after smoothing: smaller than before on average (neighbours agree more)
    assert float(np.mean(half.layers["hespotex_spread"])) < float(np.mean(raw.layers["hespotex_spread"]))
    streamed = hx.tl.predict(
        copy.deepcopy(trained_ensemble["test"]), model, device="cpu", out=tmp_path / "e.zarr", chunk_size=CHUNK,
        smooth=0.5,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(streamed.layers["hespotex"]), half.layers["hespotex"], atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(streamed.layers["hespotex_spread"]), half.layers["hespotex_spread"], atol=2e-5
    )


@pytest.mark.parametrize(("value", "error"), [(1.5, ValueError), (-0.1, ValueError), ("half", TypeError)])
def test_bad_smooth_is_refused(slide, trained_synthetic, value, error):
    with pytest.raises(error, match="smooth"):
        hx.tl.predict(copy.deepcopy(slide), trained_synthetic["model"], device="cpu", smooth=value)
