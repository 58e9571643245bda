"""hx.tl.predict keeps its results in the object passed, whatever the table's genes (predict's "Where the predictions
go").

Every gene-set case (the model's genes identical to the table's, reordered, a subset or a superset of them, a
partial overlap, no shared gene, an image-only table) for an AnnData carrying embeddings, a SpatialData and a
scanpy-convention AnnData (image in ``uns["spatial"]``, embedded on the fly through ``accepts_anndata``): the
predictions found in the passed object equal the model's (per gene, by name), nothing the user had changes,
``copy=True`` leaves the input bit-identical, the overwrite guard holds, and evaluate / pl.spatial / io.write_csv
find them.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import hespotex as hx
from hespotex._sample import SAMPLE_KEY, get_table
from hespotex.pp._targets import target_expression

pytestmark = pytest.mark.usefixtures("single_threaded")

EMB = "X_hespotex_image"
KEY = "hespotex"
CASES = ["identical", "reordered", "subset", "superset", "partial", "disjoint", "image_only"]
KINDS = ["anndata", "spatialdata", "scanpy"]
EXTRA = [f"extra_{i}" for i in range(6)]


def _genes(case: str, model_genes: list[str]) -> list[str]:
    return {
        "identical": list(model_genes),
        "reordered": list(model_genes)[::-1],
        "subset": list(model_genes) + EXTRA,  # the model predicts a subset of the table's genes
        "superset": list(model_genes)[:25],  # the model predicts more genes than the table has
        "partial": list(model_genes)[:20] + EXTRA,
        "disjoint": EXTRA,
        "image_only": [],
    }[case]


def _counts(section: ad.AnnData, genes: list[str]) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = np.asarray(section.X.toarray() if hasattr(section.X, "toarray") else section.X, dtype=np.float32)
    cols = [
        x[:, section.var_names.get_loc(g)] if g in section.var_names else rng.poisson(3.0, section.n_obs) for g in genes
    ]
    return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((section.n_obs, 0), np.float32)


def _user_table(section: ad.AnnData, genes: list[str], *, embeddings: bool) -> ad.AnnData:
    """What a user holds: counts of ``genes``, a layer and a var column of their own, spot centres."""
    x = _counts(section, genes)
    table = ad.AnnData(
        X=x,
        obs=section.obs[["region", "spot_id"] if embeddings else ["array_row", "array_col"]].copy(),
        var=pd.DataFrame({"note": [f"n{i}" for i in range(len(genes))]}, index=pd.Index(genes)),
        obsm={"spatial": np.asarray(section.obsm["spatial"]).copy()},
        layers={"counts": x.copy()},
    )
    if embeddings:
        table.obsm[EMB] = np.asarray(section.obsm[EMB]).copy()
        table.uns["hespotex_embed"] = {EMB: dict(section.uns["hespotex_embed"][EMB])}
        table.uns[SAMPLE_KEY] = dict(section.uns[SAMPLE_KEY])
    return table


def _make(kind: str, case: str, trained) -> tuple[object, dict]:
    """The object passed to predict, and the extra predict arguments it needs."""
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    test = trained["test"]
    section = test.tables["table"]
    genes = _genes(case, list(trained["model"].genes))
    if kind == "anndata":
        return _user_table(section, genes, embeddings=True), {}
    if kind == "spatialdata":
        table = _user_table(section, genes, embeddings=True)
        attrs = section.uns["spatialdata_attrs"]
        table = TableModel.parse(
            table, region=attrs["region"], region_key=attrs["region_key"], instance_key=attrs["instance_key"]
        )
        return SpatialData(images=dict(test.images), shapes=dict(test.shapes), tables={"table": table}), {}
    info = section.uns[SAMPLE_KEY]
    image = np.asarray(test.images[info["image_key"]].transpose("y", "x", "c").values)
    adata = _user_table(section, genes, embeddings=False)
    adata.uns["spatial"] = {
        "syn": {
            "images": {"hires": image},
            "scalefactors": {
                "tissue_hires_scalef": 1.0,
                "spot_diameter_fullres": info["spot_diameter_um"] / info["microns_per_pixel"],
            },
        }
    }
    return adata, {"microns_per_pixel": info["microns_per_pixel"]}


def _expected(table: ad.AnnData, model, info: dict) -> pd.DataFrame:
    """The model's predictions at these spots from these embeddings: an AnnData of exactly the model's genes."""
    ref = ad.AnnData(
        X=np.zeros((table.n_obs, len(model.genes)), np.float32),
        obs=pd.DataFrame(index=table.obs_names),
        var=pd.DataFrame(index=pd.Index(model.genes)),
        obsm={"spatial": np.asarray(table.obsm["spatial"]).copy(), EMB: np.asarray(table.obsm[EMB]).copy()},
        uns={"hespotex_embed": {EMB: dict(table.uns["hespotex_embed"][EMB])}, SAMPLE_KEY: dict(info)},
    )
    out = hx.tl.predict(ref, model, device="cpu")
    assert out is ref
    return pd.DataFrame(ref.layers[KEY], index=table.obs_names, columns=list(model.genes))


def _snapshot(table: ad.AnnData) -> dict:
    return {
        "X": np.array(table.X, copy=True),
        "counts": np.array(table.layers["counts"], copy=True),
        "var": table.var.copy(),
        "obs": table.obs.copy(),
    }


def _assert_user_data_kept(table: ad.AnnData, before: dict) -> None:
    np.testing.assert_array_equal(np.asarray(table.X), before["X"])
    np.testing.assert_array_equal(np.asarray(table.layers["counts"]), before["counts"])
    pd.testing.assert_frame_equal(table.var[before["var"].columns], before["var"])
    assert list(table.var_names) == list(before["var"].index)
    pd.testing.assert_frame_equal(table.obs[before["obs"].columns], before["obs"])


def _assert_identical(a: ad.AnnData, b: ad.AnnData) -> None:
    """``a`` is bit-identical to ``b``: the same keys everywhere and the same values."""
    np.testing.assert_array_equal(np.asarray(a.X), np.asarray(b.X))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    for slot in ("layers", "obsm", "obsp"):
        assert set(getattr(a, slot)) == set(getattr(b, slot)), slot
        for k in getattr(a, slot):
            x, y = getattr(a, slot)[k], getattr(b, slot)[k]
            x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
            y = y.toarray() if hasattr(y, "toarray") else np.asarray(y)
            np.testing.assert_array_equal(x, y)
    assert set(a.uns) == set(b.uns)


def _predictions_in(table: ad.AnnData, genes: list[str]) -> pd.DataFrame:
    """The predictions a user finds in the table they passed (predict's docstring), by gene name."""
    if set(table.var_names) == set(genes):
        return pd.DataFrame(np.asarray(table.layers[KEY]), index=table.obs_names, columns=list(table.var_names))
    frame = table.obsm[KEY]
    assert isinstance(frame, pd.DataFrame)
    assert frame.index.equals(table.obs_names) and list(frame.columns) == list(genes)
    return frame


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_predictions_kept_in_the_object_passed(kind, case, trained_synthetic, tmp_path):
    model = trained_synthetic["model"]
    genes = list(model.genes)
    data, extra = _make(kind, case, trained_synthetic)
    table = get_table(data)
    before = _snapshot(table)
    same = set(table.var_names) == set(genes)

    # copy=True: the object passed stays bit-identical, the returned one holds everything
    reference = table.copy()
    copied = hx.tl.predict(data, model, device="cpu", copy=True, **extra)
    _assert_identical(table, reference)
    if kind == "spatialdata":
        assert list(data.tables) == ["table"] and copied is not data
        assert KEY in copied.tables if not same else KEY in copied.tables["table"].layers
    copied_table = get_table(copied)
    assert copied_table is not table

    ret = hx.tl.predict(data, model, device="cpu", **extra)
    expected = _expected(
        table, model, trained_synthetic["test"].tables["table"].uns[SAMPLE_KEY]
    )  # from the embeddings the table now holds (made on the fly for scanpy)
    found = _predictions_in(table, genes)
    np.testing.assert_allclose(found[genes], expected[genes], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_predictions_in(copied_table, genes)[genes], expected[genes], rtol=1e-5, atol=1e-6)
    _assert_user_data_kept(table, before)
    assert f"X_{KEY}" in table.obsm and f"{KEY}_attention" in table.obsp
    record = table.uns[KEY]["params"]
    assert record["model_id"] == model.model_id

    # the return value is the table of the model's genes holding layers[key_added], as before
    np.testing.assert_allclose(
        pd.DataFrame(ret.layers[KEY], columns=ret.var_names)[genes].to_numpy(), expected[genes].to_numpy(), rtol=1e-5
    )
    if same:
        assert ret is table if kind != "scanpy" else ret is data
        assert f"{KEY}_predicted" not in table.var and KEY not in table.obsm
    else:
        assert list(table.var[f"{KEY}_predicted"]) == [g in genes for g in table.var_names]
        if table.n_vars and set(table.var_names) <= set(genes):  # every table gene predicted: a layer, no gaps
            layer = pd.DataFrame(np.asarray(table.layers[KEY]), columns=table.var_names)
            np.testing.assert_allclose(layer, expected[list(table.var_names)].to_numpy(), rtol=1e-5, atol=1e-6)
            assert record["layer"] == KEY
        else:  # a layer would need NaN for the genes the model does not predict: none is written
            assert KEY not in table.layers and record["layer"] is None
        assert record["obsm"] == KEY
        measured_all = set(genes) <= set(table.var_names)
        assert (f"{KEY}_measured" in table.obsm) == measured_all
        if kind == "spatialdata":
            assert data.tables[KEY] is ret and record["table"] == KEY
            np.testing.assert_allclose(ret.layers[KEY], table.obsm[KEY].to_numpy(), rtol=1e-6)

    # the overwrite guard: nothing is replaced, then overwrite=True predicts the same again
    marked = found.to_numpy().copy()
    with pytest.raises(ValueError, match="overwrite=True"):
        hx.tl.predict(data, model, device="cpu", **extra)
    np.testing.assert_array_equal(_predictions_in(table, genes).to_numpy(), marked)
    hx.tl.predict(data, model, device="cpu", overwrite=True, **extra)
    np.testing.assert_allclose(_predictions_in(table, genes)[genes], expected[genes], rtol=1e-5, atol=1e-6)
    _assert_user_data_kept(table, before)

    # readers find them: evaluate (when the table measured the model's genes), pl.spatial, io.write_csv
    gene = next((g for g in genes if g not in table.var_names), genes[3])  # a gene only the prediction has, if any
    if set(genes) <= set(table.var_names):
        truth = target_expression(table, genes, target_norm=model.target_norm, target_sum=model.target_sum)
        scores = hx.tl.evaluate(data, **({"truth": data} if same else {}))
        want = [np.corrcoef(expected[g], truth[:, i])[0, 1] for i, g in enumerate(genes)]
        np.testing.assert_allclose(scores.loc[genes, "pearson"], want, rtol=1e-4, atol=1e-6)
        # results go where the prediction is a layer of the model's genes: tables[KEY] of a SpatialData when the
        # genes differ (predict wrote it), else the spot table
        holder = data.tables[KEY] if hasattr(data, "tables") and KEY in data.tables else table
        assert f"{KEY}_evaluation" in holder.uns
        import holoviews as hv

        view = hx.pl.evaluation(data, kind="scatter", genes=[genes[2]], **({"truth": data} if same else {}))
        (scatter,) = view.traverse(lambda x: x, [hv.Scatter])
        rows = pd.Index(table.obs_names).get_indexer(scatter.dimension_values("spot"))
        np.testing.assert_allclose(
            scatter.dimension_values("predicted"), expected[genes[2]].to_numpy()[rows], rtol=1e-5
        )
        np.testing.assert_allclose(scatter.dimension_values("measured"), truth[rows, 2], rtol=1e-5, atol=1e-6)
    from hespotex.pl._spatial import import_holoviews

    hv = import_holoviews()
    layout = hx.pl.spatial(data, gene, measured=False)
    points = layout.traverse(lambda x: x, [hv.Points])
    np.testing.assert_allclose(points[0].dframe()["predicted"], expected[gene], rtol=1e-5, atol=1e-6)
    path = hx.io.write_csv(data, tmp_path / "p.csv", genes=[gene])
    csv = pd.read_csv(path, index_col=0)
    np.testing.assert_allclose(csv[gene].to_numpy(), expected[gene].to_numpy(), rtol=1e-5, atol=1e-6)


def test_copy_true_returns_a_new_spatialdata_and_leaves_the_store_alone(trained_synthetic):
    model = trained_synthetic["model"]
    data, _ = _make("spatialdata", "partial", trained_synthetic)
    new = hx.tl.predict(data, model, device="cpu", copy=True)
    assert list(data.tables) == ["table"] and KEY not in data.tables["table"].obsm
    assert set(new.tables) == {"table", KEY} and new.images.keys() == data.images.keys()
    np.testing.assert_allclose(new.tables[KEY].layers[KEY], new.tables["table"].obsm[KEY].to_numpy(), rtol=1e-6)


def test_key_added_naming_the_spot_table_is_refused(trained_synthetic):
    data, _ = _make("spatialdata", "partial", trained_synthetic)
    with pytest.raises(ValueError, match="names the sample's spot table"):
        hx.tl.predict(data, trained_synthetic["model"], device="cpu", key_added="table", overwrite=True)
    assert list(data.tables) == ["table"]


def test_streamed_prediction_is_referenced_by_the_object_passed_or_its_copy(trained_synthetic, tmp_path):
    model = trained_synthetic["model"]
    data, _ = _make("spatialdata", "partial", trained_synthetic)
    memory = hx.tl.predict(data, model, device="cpu", copy=True).tables[KEY]
    new = hx.tl.predict(data, model, device="cpu", out=tmp_path / "a.zarr", copy=True)
    assert list(data.tables) == ["table"] and KEY not in data.tables["table"].obsm  # the object passed: untouched
    np.testing.assert_allclose(np.asarray(new.tables[KEY].layers[KEY]), memory.layers[KEY], rtol=1e-4, atol=1e-5)
    streamed = hx.tl.predict(data, model, device="cpu", out=tmp_path / "b.zarr")
    assert data.tables[KEY] is streamed  # the SpatialData passed references the streamed table
    np.testing.assert_allclose(np.asarray(streamed.layers[KEY]), memory.layers[KEY], rtol=1e-4, atol=1e-5)


def test_ensemble_spread_is_kept_beside_the_prediction(trained_synthetic):
    import torch

    model = trained_synthetic["model"]
    other = hx.tl.HESpotEx.load(trained_synthetic["model_dir"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a second, different member: the spread is not zero
        for p in other.module_.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ens = hx.tl.HESpotExEnsemble([model, other])
    genes = list(ens.genes)
    data, _ = _make("anndata", "partial", trained_synthetic)
    ref, _ = _make("anndata", "identical", trained_synthetic)
    hx.tl.predict(ref, ens, device="cpu")
    spread = pd.DataFrame(ref.layers[f"{KEY}_spread"], columns=ref.var_names)[genes]
    assert (spread.to_numpy() > 0).any()
    hx.tl.predict(data, ens, device="cpu")
    np.testing.assert_allclose(
        data.obsm[KEY][genes], pd.DataFrame(ref.layers[KEY], columns=genes), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(data.obsm[f"{KEY}_spread"][genes], spread, rtol=1e-5, atol=1e-6)
    assert f"{KEY}_spread" not in data.layers  # partial overlap: no layer over the table's genes
    record = data.uns[KEY]["params"]
    assert record["spread_key"] == f"{KEY}_spread" and record["ensemble_members"] == 2
    # the agreement per gene on the table's genes the model predicts, NaN on the others
    agreement = data.var[f"{KEY}_agreement"]
    predicted = data.var[f"{KEY}_predicted"].to_numpy()
    np.testing.assert_allclose(agreement[predicted], ref.var[f"{KEY}_agreement"][data.var_names[predicted]], atol=1e-6)
    assert agreement[~predicted].isna().all() and (~predicted).any()
    with pytest.raises(ValueError, match=r"layers\['hespotex_spread'\]|obsm\['hespotex_spread'\]"):
        hx.tl.predict(data, ens, device="cpu")
    again = data.copy()
    for slot, key in (("layers", KEY), ("obsm", KEY), ("obsm", f"{KEY}_spread"), ("obsm", f"X_{KEY}")):
        getattr(again, slot).pop(key, None)
    again.obsm.pop(f"{KEY}_measured", None)
    again.obsp.pop(f"{KEY}_attention", None)
    del again.uns[KEY], again.var[f"{KEY}_predicted"]
    with pytest.raises(ValueError, match=r"var\['hespotex_agreement'\]"):  # the agreement column is guarded too
        hx.tl.predict(again, ens, device="cpu")
