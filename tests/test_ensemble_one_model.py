"""An ensemble is one model everywhere (issue 9, item 4): streamed prediction, cohort prediction, the command
line, attention and ``explain`` give what in-memory prediction gives, spread layer included."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import hespotex as hx
from hespotex.tl.model._data import GraphData, graph_data

pytestmark = pytest.mark.usefixtures("single_threaded")

CHUNK = 40  # several graph blocks and expression steps for a 90-spot section


def _dense(x) -> np.ndarray:
    return np.asarray(x.compute() if hasattr(x, "compute") else x)


@pytest.fixture(scope="module")
def in_memory(trained_ensemble):
    sdata = copy.deepcopy(trained_ensemble["test"])
    hx.tl.predict(sdata, trained_ensemble["model"], device="cpu")
    return sdata.tables["table"]


@pytest.fixture(scope="module")
def streamed(trained_ensemble, tmp_path_factory):
    sdata = copy.deepcopy(trained_ensemble["test"])
    out = tmp_path_factory.mktemp("ens_stream") / "slide.zarr"
    table = hx.tl.predict(sdata, trained_ensemble["model_dir"], device="cpu", out=out, chunk_size=CHUNK)
    return sdata, table, out


def test_streamed_ensemble_equals_in_memory(in_memory, streamed, trained_ensemble):
    _, table, out = streamed
    ref, model = in_memory, trained_ensemble["model"]
    assert set(table.layers) == {"hespotex", "hespotex_spread"}
    assert {"hespotex", "hespotex_spread"} <= set(ref.layers)
    assert hasattr(table.layers["hespotex_spread"], "dask")  # read lazily from the store, like the mean
    assert list(table.var_names) == list(ref.var_names) == model.genes
    np.testing.assert_allclose(_dense(table.layers["hespotex"]), np.asarray(ref.layers["hespotex"]), atol=1e-5)
    spread = _dense(table.layers["hespotex_spread"])
    np.testing.assert_allclose(spread, np.asarray(ref.layers["hespotex_spread"]), atol=1e-5)
    assert (spread > 1e-4).mean() > 0.5  # the members disagree: a real spread, not zeros
    np.testing.assert_allclose(table.obsm["X_hespotex"], ref.obsm["X_hespotex"], atol=1e-5)
    diff = table.obsp["hespotex_attention"] - ref.obsp["hespotex_attention"]
    assert abs(diff).max() < 1e-5
    params, ref_params = table.uns["hespotex"]["params"], ref.uns["hespotex"]["params"]
    assert params["spread_layer"] == ref_params["spread_layer"] == "hespotex_spread"
    assert params["ensemble_members"] == ref_params["ensemble_members"] == 3
    # the members' agreement per gene: streamed over every spot here (fewer than AGREEMENT_SPOTS), as in memory
    assert params["agreement_spots"] == ref_params["agreement_spots"] == table.n_obs
    np.testing.assert_allclose(table.var["hespotex_agreement"], ref.var["hespotex_agreement"], atol=1e-5)
    assert params["model_id"] == ref_params["model_id"] == model.model_id
    assert params["target_norm"] == ref_params["target_norm"]
    # the store holds them too, and no progress arrays are left
    back = hx.io.read_zarr(out).tables["hespotex"]
    np.testing.assert_allclose(np.asarray(back.layers["hespotex_spread"]), spread, atol=0)
    np.testing.assert_array_equal(back.var["hespotex_agreement"], table.var["hespotex_agreement"])
    import zarr

    progress = zarr.open_group(out, mode="r")["hespotex_progress"]["hespotex"]
    assert not list(progress.group_keys()) and not list(progress.array_keys())


def test_streamed_ensemble_rerun_and_attention(streamed, in_memory, trained_ensemble, caplog):
    import logging

    sdata, table, out = streamed
    with caplog.at_level(logging.INFO, logger="hespotex"):
        again = hx.tl.predict(
            copy.deepcopy(trained_ensemble["test"]), trained_ensemble["model"], device="cpu", out=out, chunk_size=CHUNK
        )
    assert "nothing to do" in caplog.text
    np.testing.assert_array_equal(_dense(again.layers["hespotex_spread"]), _dense(table.layers["hespotex_spread"]))
    # hx.tl.attention reads the members' mean attention of the streamed table as of the in-memory one
    streamed_stats = hx.tl.attention(sdata, key="hespotex", copy=True)
    memory_stats = hx.tl.attention(in_memory, key="hespotex", copy=True)
    for col in ("entropy", "self", "neighbours"):
        np.testing.assert_allclose(
            streamed_stats.obs[f"hespotex_attention_stats_{col}"].to_numpy(float),
            memory_stats.obs[f"hespotex_attention_stats_{col}"].to_numpy(float),
            atol=1e-5,
        )


def test_interrupted_ensemble_stream_resumes(trained_ensemble, streamed, tmp_path, monkeypatch):
    from hespotex.tl.prediction import _stream_stages

    real, calls = _stream_stages.expression_stage, []

    def stop_in_second_member(group, member, *args, **kwargs):
        calls.append(member)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted in member 2")
        return real(group, member, *args, **kwargs)

    monkeypatch.setattr(_stream_stages, "expression_stage", stop_in_second_member)
    out = tmp_path / "r.zarr"
    with pytest.raises(KeyboardInterrupt):
        hx.tl.predict(copy.deepcopy(trained_ensemble["test"]), trained_ensemble["model"], out=out, chunk_size=CHUNK)
    monkeypatch.setattr(_stream_stages, "expression_stage", real)
    table = hx.tl.predict(
        copy.deepcopy(trained_ensemble["test"]), trained_ensemble["model"], device="cpu", out=out, chunk_size=CHUNK
    )
    for layer in ("hespotex", "hespotex_spread"):
        np.testing.assert_allclose(_dense(table.layers[layer]), _dense(streamed[1].layers[layer]), atol=1e-6)


def test_ensemble_hands_each_member_block_over(trained_ensemble):
    model = trained_ensemble["model"]
    table = trained_ensemble["test"].tables["table"]
    sample = graph_data(table, "t", genes=None)
    blocks = [np.arange(0, 45), np.arange(45, table.n_obs)]
    seen = []
    returned = model.predict_graph(sample, device="cpu", blocks=blocks, on_block=lambda i, c, r: seen.append((i, r)))
    assert returned is None
    assert [(i, r["member"]) for i, r in seen] == [(i, k) for k in range(3) for i in range(2)]
    # each member's block results are that member's own (its latent)
    first = model.members[1].predict_graph(sample, device="cpu")["latent"]
    np.testing.assert_allclose(seen[2][1]["latent"], first[blocks[0]], atol=1e-5)


@pytest.fixture(scope="module")
def wsis(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ens_slides")
    return [
        hx.datasets.synthetic_wsi(folder / f"wsi_{i}.ome.tif", width=1200, height=1000, microns_per_pixel=1.0,
                                  tile=256, seed=i, n_blobs=4)
        for i in range(2)
    ]  # fmt: skip


def _check_store(path, model):
    import spatialdata

    table = spatialdata.read_zarr(path).tables["hespotex"]
    params = table.uns["hespotex"]["params"]
    assert params["ensemble_members"] == 3 and params["model_id"] == model.model_id
    mean, spread = np.asarray(table.layers["hespotex"]), np.asarray(table.layers["hespotex_spread"])
    assert mean.shape == spread.shape == (table.n_obs, len(model.genes)) and table.n_obs > 20
    assert np.isfinite(spread).all() and (spread >= 0).all() and (spread > 1e-4).any()
    return table


def test_cohort_of_two_slides_with_an_ensemble(wsis, trained_ensemble, tmp_path):
    from distributed import Client, LocalCluster

    model = trained_ensemble["model"]
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        result = hx.tl.predict_slides(wsis, model, out=tmp_path / "out", client=client, progress=False)
    assert list(result["status"]) == ["finished", "finished"], result["error"].tolist()
    assert (tmp_path / "out" / ".model" / "ensemble.json").is_file()  # the object saved once, as one folder
    for output in result["output"]:
        _check_store(output, model)


def test_cli_predict_with_an_ensemble_folder(wsis, trained_ensemble, tmp_path):
    from hespotex.cli import main

    out = tmp_path / "pred"
    assert main(["predict", "--model", str(trained_ensemble["model_dir"]), "--out", str(out), str(wsis[0])]) == 0
    table = _check_store(out / "wsi_0.zarr", trained_ensemble["model"])
    assert table.uns["hespotex"]["params"]["spread_layer"] == "hespotex_spread"


def test_explain_ensemble_is_complete_for_the_ensemble_mean(trained_ensemble):
    from hespotex.pp._encoders import load_encoder

    model, sdata = trained_ensemble["model"], copy.deepcopy(trained_ensemble["test"])
    table = sdata.tables["table"]
    gene = model.genes[0]
    g = model.genes.index(gene)
    res = hx.tl.explain(sdata, model, genes=gene, n_spots=2, n_steps=48, device="cpu")
    sample = graph_data(table, "t", genes=None)
    mean = model.predict_graph(sample, device="cpu", smooth=0.5)["expression"][:, g]
    members = np.stack([m.predict_graph(sample, device="cpu", smooth=0.5)["expression"][:, g] for m in model.members])
    np.testing.assert_allclose(members.mean(0), mean, atol=1e-6)
    t = [table.obs_names.get_loc(s) for s in res.spots]
    assert res.spots == list(table.obs_names[np.argsort(-mean)[:2]])
    np.testing.assert_allclose(res.score, mean[t], atol=1e-5)  # the score explained is the ensemble mean
    # pixels: sum - delta == f(x) - f(white patch), f the ensemble mean, f(white) computed independently
    np.testing.assert_allclose(res.pixel_score, mean[t], atol=1e-3)
    enc = load_encoder(model.embedding["encoder"], input_size=model.embedding["input_size"])
    for i, ti in enumerate(t):
        emb = sample.emb.copy()
        with torch.no_grad():
            emb[ti] = enc.encode(torch.ones(1, 3, 32, 32))[0].numpy()
        white = model.predict_graph(GraphData("t", emb, sample.coords_um), device="cpu", smooth=0.5)["expression"][
            ti, g
        ]
        assert res.pixel_baseline_score[i] == pytest.approx(white, abs=1e-4)
        assert res.pixel_attribution_sum[i] - res.pixel_delta[i] == pytest.approx(mean[ti] - white, abs=1e-3)
    # neighbours: sum - delta == f(x) - f(every spot at the ensemble's mean training embedding)
    base = np.tile(np.mean([m.embedding_mean_ for m in model.members], axis=0), (table.n_obs, 1)).astype(np.float32)
    f_base = model.predict_graph(GraphData("t", base, sample.coords_um), device="cpu", smooth=0.5)["expression"][:, g]
    for spot, ti in zip(res.spots, t, strict=True):
        total = res.neighbours.loc[res.neighbours["target"] == spot, "attribution"].sum()
        delta = res.agreement.loc[spot, "delta"]
        assert total - delta == pytest.approx(mean[ti] - f_base[ti], abs=1e-3)
    rows = res.neighbours[res.neighbours["hop"] == 1]
    assert rows["attention"].notna().all()  # the members' mean attention is compared too
    assert res.params["model_id"] == model.model_id
