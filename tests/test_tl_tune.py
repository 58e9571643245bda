"""Baselines tuned by leave-one-training-section-out (issue 9, item 7)."""

from __future__ import annotations

import numpy as np
import pytest

from hespotex.tl.evaluation._baselines import RetrievalBaseline, RidgeBaseline
from hespotex.tl.training._tune import _ridge_path, tune_baseline


def _sections(signal: float, seed: int = 0, n: int = 60):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(20, 6))
    out = {}
    for i in range(3):
        X = rng.normal(size=(n, 20))
        y = signal * X @ w + rng.normal(size=(n, 6))
        out[f"s{i}"] = (X, y, rng.uniform(0, 1000, size=(n, 2)))
    return out


def test_ridge_path_is_the_ridge_baseline():
    secs = _sections(1.0)
    X, y, _ = secs["s0"]
    Xh = secs["s1"][0]
    preds = list(_ridge_path(X, y, Xh, (1.0, 100.0), n_components=10, seed=0))
    for alpha, pred in zip((1.0, 100.0), preds, strict=True):
        ref = RidgeBaseline(n_components=10, alpha=alpha).fit(X, y).predict(Xh)
        # the baseline's lsqr solver stops at sklearn's tol=1e-4: agreement to ~1e-3 on values of order 1
        np.testing.assert_allclose(pred, ref, atol=1e-2)
    assert np.abs(preds[0] - preds[1]).max() > 0.1  # and α matters


def test_tuning_follows_the_signal():
    strong = tune_baseline("ridge", _sections(1.0), grid=(0.1, 1e5), n_components=10)
    noise = tune_baseline("ridge", _sections(0.0), grid=(0.1, 1e5), n_components=10)
    assert strong.tuning_["value"] == 0.1  # a real linear signal: little shrinkage wins
    assert strong.alpha_ == 0.1 and strong.tuning_["inner_folds"] == ["s0", "s1", "s2"]
    assert np.argmax(noise.tuning_["scores"]) == noise.tuning_["grid"].index(noise.tuning_["value"])
    ret = tune_baseline("retrieval", _sections(1.0), grid=(1, 30), smoothed=True)
    assert isinstance(ret, RetrievalBaseline) and ret.k in (1, 30) and ret.tuning_["smoothed"]
    assert ret.tuning_["value"] == 30  # averaging many neighbours beats copying one noisy spot


def _spatial_sections(smooth_truth: bool, seed: int = 0):
    """Spots on a grid; ``smooth_truth``: the targets are smooth fields of the position that each spot's features
    read with heavy noise (averaging neighbours' predictions removes the noise), else the targets follow each spot's
    own independent features (averaging blurs them)."""
    rng = np.random.default_rng(seed)
    gx, gy = np.meshgrid(np.arange(12), np.arange(12))
    xy = np.column_stack([gx.ravel(), gy.ravel()]) * 100.0
    out = {}
    for i in range(3):
        if smooth_truth:
            fields = np.column_stack([np.sin(xy[:, 0] / 300 + k) + np.cos(xy[:, 1] / 250 - k) for k in range(4)])
            X = np.hstack([fields, np.zeros((len(xy), 6))]) + rng.normal(scale=1.5, size=(len(xy), 10))
            y = fields
        else:
            X = rng.normal(size=(len(xy), 10))
            y = X[:, :4] + 0.1 * rng.normal(size=(len(xy), 4))
        out[f"s{i}"] = (X, y, xy)
    return out


def test_smoothing_weight_is_tuned_with_the_parameter():
    def weight(model):
        w = model.tuning_["smooth_weight"]
        return 1 / 7 if w is None else w

    noisy = tune_baseline("ridge", _spatial_sections(True), grid=(1.0, 100.0), smoothed=True, n_components=None)
    sharp = tune_baseline("ridge", _spatial_sections(False), grid=(1.0, 100.0), smoothed=True, n_components=None)
    assert noisy.tuning_["smooth_weights"] == [None, 0.25, 0.5, 0.75]
    assert weight(noisy) < 0.5 < weight(sharp)  # smooth where neighbours share the truth, keep the spot where not
    fixed = tune_baseline("ridge", _spatial_sections(True), grid=(1.0, 100.0), smoothed=True, n_components=None,
                          smooth_weights=[0.75])  # fmt: skip
    assert fixed.tuning_["smooth_weight"] == 0.75 and max(fixed.tuning_["scores"]) < max(noisy.tuning_["scores"])
    raw = tune_baseline("ridge", _spatial_sections(True), grid=(1.0, 100.0), n_components=None)
    assert raw.tuning_["smooth_weight"] is None and raw.tuning_["smooth_weights"] is None
    with pytest.raises(ValueError, match=r"smooth_weights.*found 1\.5"):
        tune_baseline("ridge", _spatial_sections(True), smoothed=True, smooth_weights=[1.5])
    with pytest.raises(ValueError, match=r"smooth_weights.*found none"):
        tune_baseline("ridge", _spatial_sections(True), smoothed=True, smooth_weights=[])


def test_tuning_bad_input():
    with pytest.raises(ValueError, match="Cannot tune baseline"):
        tune_baseline("mlp", _sections(1.0))
    with pytest.raises(ValueError, match="at least 2"):
        tune_baseline("ridge", {"a": _sections(1.0)["s0"]})


def test_cross_validate_tunes_baselines_on_the_training_folds():
    import hespotex as hx
    from hespotex.tl.model._data import graph_data

    hx.settings.progress = False
    samples = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        sdata = hx.datasets.synthetic(
            n_spots=60, n_genes=8, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=name
        )
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32)
        samples[name] = sdata.tables["table"]
    genes = list(samples["a"].var_names)
    table = hx.tl.cross_validate(
        samples, methods=["ridge", "retrieval"], genes=genes, tune_baselines=True, target_norm="library_modelled", k=4
    )
    assert set(table["method"]) == {"ridge", "ridge+smooth", "retrieval", "retrieval+smooth"}
    row = table[(table["fold"] == "c") & (table["method"] == "retrieval+smooth")].iloc[0]
    # the same choice as tuning by hand on the fold's training sections, with the model's targets
    data = {n: graph_data(samples[n], n, genes=genes, target_norm="library_modelled") for n in ("a", "b")}
    ref = tune_baseline("retrieval", {n: (d.emb, d.expr, d.coords_um) for n, d in data.items()}, smoothed=True)
    weight = ref.tuning_["smooth_weight"]  # the smoothing weight is tuned with k, on the training folds too
    assert row["chosen"] == f"k={ref.tuning_['value']}, smooth={'mean' if weight is None else f'{weight:g}'}"
