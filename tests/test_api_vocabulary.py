"""One vocabulary across the public API (issue #11, item 4).

- every renamed argument (the one table, :data:`hespotex._compat.RENAMED_ARGUMENTS`): the old name warns
  (``FutureWarning`` naming the new one and the removal release) and gives the same result as the new name,
  a result that differs from the default (so an ignored old name would fail); both names: ``TypeError``;
- a signature audit of every public callable of ``hx.io/pp/tl/pl/datasets``;
- a prediction under a non-default ``key_added`` read back by every reader through ``key``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest

import hespotex as hx
from hespotex._compat import OLD_POSITIONALS, RENAMED_ARGUMENTS
from hespotex._constants import EMBEDDING_KEY, PREDICTION_KEY, REMOVAL_RELEASE

pytestmark = pytest.mark.usefixtures("single_threaded")

RENAMES = [(name, old, new) for name, mapping in RENAMED_ARGUMENTS.items() for old, new in mapping.items()]
ALT_REP = "X_alt"  # embeddings scaled, so that reading them changes the result
ALT_LAYER = "alt"  # a second, perturbed prediction layer


def public(name: str) -> Any:
    module, attr = name.split(".")
    return getattr(getattr(hx, module), attr)


@pytest.fixture(scope="module")
def ctx(trained_synthetic, tmp_path_factory):
    """Copies of the trained fixture with an alternative embedding and a perturbed prediction layer."""
    test = copy.deepcopy(trained_synthetic["test"])
    rng = np.random.default_rng(0)
    tables = []
    for sdata in [*trained_synthetic["train"], test]:
        t = copy.deepcopy(sdata.tables["table"]) if sdata is not test else sdata.tables["table"]
        t.obsm[ALT_REP] = np.asarray(t.obsm[EMBEDDING_KEY]) * 1.5 + 0.1
        tables.append(t)
    table = test.tables["table"]
    table.layers[ALT_LAYER] = np.asarray(table.layers[PREDICTION_KEY]) + rng.normal(0, 0.3, table.shape).astype(
        np.float32
    )
    second = copy.deepcopy(table)
    second.layers[ALT_LAYER] = second.layers[ALT_LAYER][::-1].copy()
    slide = hx.datasets.synthetic_wsi(
        tmp_path_factory.mktemp("vocab") / "slide.ome.tif", width=900, height=700, microns_per_pixel=1.0, seed=5
    )
    return {"model": trained_synthetic["model"], "sdata": test, "tables": tables, "second": second, "slide": slide}


def _frames(obj: Any) -> list[pd.DataFrame]:
    """The data of every HoloViews element in a view (what a plot shows)."""
    import holoviews as hv

    return obj.traverse(lambda e: e.dframe().reset_index(drop=True), [hv.Element])


def _train(ctx, **kw):
    from hespotex.models import ModelConfig

    small = {"ae_epochs": 2, "ae_hidden_dim": 16, "latent_dim": 8, "projection_hidden_dim": 16, "head_hidden_dim": 16}
    config = ModelConfig.preset("hespotex", epochs=2, patience=None, decoder_heads=1, **small)
    a, b, _ = (copy.deepcopy(t) for t in ctx["tables"])
    model = hx.tl.train([a, b], config=config, genes=list(a.var_names)[:10], seed=0, device="cpu", **kw)
    return np.concatenate([p.detach().numpy().ravel() for p in model.module_.parameters()])


def _predict(ctx, **kw):
    out = hx.tl.predict(copy.deepcopy(ctx["tables"][2]), ctx["model"], key_added="p", device="cpu", **kw)
    return np.asarray(out.layers["p"])


def _explain(ctx, **kw):
    gene = ctx["model"].genes[0]
    res = hx.tl.explain(copy.deepcopy(ctx["tables"][2]), ctx["model"], genes=gene, pixels=False, n_steps=4, **kw)
    return res.spots, np.asarray(res.score)


def _cross_validate(ctx, **kw):
    named = {f"s{i}": copy.deepcopy(t) for i, t in enumerate(ctx["tables"])}
    df = hx.tl.cross_validate(
        named, folds=["s2"], methods=["ridge"], smoothed=False, genes=list(named["s0"].var_names)[:8], k=3, **kw
    )
    return df.drop(columns=[c for c in df.columns if "second" in c or "time" in c])


def _evaluate(ctx, **kw):
    return hx.tl.evaluate(copy.deepcopy(ctx["sdata"].tables["table"]), truth=ctx["tables"][2], k=5, **kw)


def _consistency(ctx, **kw):
    t = ctx["sdata"].tables["table"]
    if "measured" not in kw and "truth" not in kw:
        kw["truth"] = None  # these tables have no layers["measured"]
    return hx.tl.consistency({"x": t, "y": ctx["second"]}, statistics=["mean", "morans_i"], **kw)


def _diagnostic(ctx, **kw):
    sdata = copy.deepcopy(ctx["sdata"])
    return hx.tl.diagnostic_patches(sdata, by=list(ctx["model"].genes[:3]), **kw).table


def _select_genes(ctx, **kw):
    if "n_top" not in kw and "n_top_genes" not in kw:
        kw["n_top_genes"] = 20  # the comparison run (the default, 2000, exceeds the 40 genes)
    return hx.pp.select_genes([copy.deepcopy(t) for t in ctx["tables"][:2]], flavor="mean", key_added=None, **kw)


def _tile(ctx, **kw):
    slide = hx.io.read_wsi(ctx["slide"])
    table = hx.pp.tile(slide, spot_diameter_um=55.0, spacing_um=100.0, **kw)
    return sorted(slide.tables), np.asarray(table.obsm["spatial"])


def _spatial(ctx, **kw):
    genes = list(ctx["model"].genes[:2])
    col = hx.pl.spatial(ctx["sdata"], genes, image=False, **kw)
    return col.view.pred.layer, col.view.columns, col.view.frame(genes[0])


def _explorer(ctx, fn=None, **kw):
    ex = (fn or hx.pl.explorer)(ctx["sdata"], **kw)
    return ex.predictions.layer, ex.view.columns, ex.view.frame(ex.gene)


def _evaluation(ctx, **kw):
    return _frames(hx.pl.evaluation(ctx["sdata"], kind="scatter", n_genes=2, **kw))


def _attention(ctx, **kw):
    table = ctx["sdata"].tables["table"]
    return _frames(hx.pl.attention(ctx["sdata"], table.obs_names[10], image=False, **kw))


# (function, old name) -> (how to call it, a value for the argument that differs from the default, the default call)
CASES: dict[tuple[str, str], tuple[Any, Any]] = {
    ("tl.train", "embedding_key"): (_train, ALT_REP),
    ("tl.predict", "embedding_key"): (_predict, ALT_REP),
    ("tl.explain", "embedding_key"): (_explain, ALT_REP),
    ("tl.explain", "n_top"): (_explain, 5),
    ("tl.cross_validate", "embedding_key"): (_cross_validate, ALT_REP),
    ("tl.evaluate", "layer"): (_evaluate, ALT_LAYER),
    ("tl.consistency", "layer"): (_consistency, ALT_LAYER),
    ("tl.consistency", "measured"): (_consistency, "X"),
    ("tl.diagnostic_patches", "n"): (_diagnostic, 3),
    ("pp.select_genes", "n_top"): (_select_genes, 7),
    ("pp.tile", "table_key"): (_tile, "tiles"),
    ("pl.spatial", "table_key"): (_spatial, "table"),
    ("pl.spatial", "measured"): (_spatial, False),
    ("pl.explorer", "table_key"): (_explorer, "table"),
    ("pl.explorer", "measured"): (_explorer, False),
    ("pl.Explorer", "table_key"): (lambda ctx, **kw: _explorer(ctx, hx.pl.Explorer, **kw), "table"),
    ("pl.Explorer", "measured"): (lambda ctx, **kw: _explorer(ctx, hx.pl.Explorer, **kw), False),
    ("pl.evaluation", "table_key"): (_evaluation, "table"),
    ("pl.attention", "table_key"): (_attention, "table"),
}
# a table name read as `key` resolves to the same prediction as the default: nothing to tell apart
SAME_AS_DEFAULT = {("pl.spatial", "table_key"), ("pl.explorer", "table_key"), ("pl.Explorer", "table_key")}
SAME_AS_DEFAULT |= {("pl.evaluation", "table_key"), ("pl.attention", "table_key")}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a, b)
        except AssertionError:
            return False
        return True
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_every_rename_has_a_case():
    assert sorted(CASES) == sorted((name, old) for name, old, _ in RENAMES)


@pytest.mark.parametrize(("name", "old", "new"), RENAMES, ids=[f"{n}-{o}" for n, o, _ in RENAMES])
def test_old_name_warns_and_gives_the_new_names_result(ctx, name, old, new):
    run, value = CASES[(name, old)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new name warns about nothing
        expected = run(ctx, **{new: value})
    with pytest.warns(FutureWarning) as record:
        got = run(ctx, **{old: value})
    ours = [str(w.message) for w in record if f"`{old}`" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in record]
    assert f"`{new}`" in ours[0] and REMOVAL_RELEASE in ours[0] and name in ours[0]
    assert _same(expected, got)
    if (name, old) not in SAME_AS_DEFAULT:  # the argument matters: an ignored old name would not pass
        assert not _same(expected, run(ctx))


@pytest.mark.parametrize(("name", "old", "new"), RENAMES, ids=[f"{n}-{o}" for n, o, _ in RENAMES])
def test_old_and_new_together_is_a_type_error(name, old, new):
    fn = public(name)
    with pytest.raises(TypeError, match=f"`{old}`.*`{new}`"):
        fn(None, **{old: 1, new: 1})


def test_the_decorator_keeps_the_new_signature():
    for name, mapping in RENAMED_ARGUMENTS.items():
        fn = public(name)
        fn = fn.__init__ if inspect.isclass(fn) else fn
        params = inspect.signature(fn).parameters
        assert fn.__renamed_arguments__ == mapping
        for old, new in mapping.items():
            assert old not in params
            assert new in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def test_old_positional_warns_and_works(tmp_path):
    assert OLD_POSITIONALS == {"io.read_visium_hd": ("bin_size",)}
    sig = inspect.signature(hx.io.read_visium_hd).parameters
    assert sig["bin_size"].kind is inspect.Parameter.KEYWORD_ONLY
    # both reach the same check of the folder (nothing there): the position is still read as bin_size
    with pytest.warns(FutureWarning, match="bin_size"), pytest.raises(ValueError, match="bin_size") as old:
        hx.io.read_visium_hd(tmp_path, 3)
    with pytest.raises(ValueError, match="bin_size") as new:
        hx.io.read_visium_hd(tmp_path, bin_size=3)
    assert str(old.value) == str(new.value)


# ------------------------------------------------------------------------------------------ signature audit
MODULES = ("io", "pp", "tl", "pl", "datasets")
# optional arguments still allowed by position: the genes of a plot or of an expression matrix, the sizes of
# a generated data set, the folder of a data set (its "data"), the encoder that is loaded
OPTIONAL_POSITIONALS = {
    "pl.spatial": {"genes"},
    "pp.log_normalize": {"genes"},
    "pp.load_encoder": {"encoder"},
    "datasets.synthetic": {"n_spots", "n_genes"},
    "datasets.synthetic_visium_hd": {"n_bins", "n_genes"},
    "datasets.her2st": {"path"},
    "datasets.her2st_path": {"path"},
    "datasets.her2st_genes": {"path"},
    "datasets.her2st_sections": {"path"},
}
BANNED = {old for mapping in RENAMED_ARGUMENTS.values() for old in mapping} - {"layer", "n"}


def _public_callables():
    for module in MODULES:
        mod = getattr(hx, module)
        for attr in mod.__all__:
            obj = getattr(mod, attr)
            if inspect.isclass(obj):
                if f"{module}.{attr}" in RENAMED_ARGUMENTS:
                    yield f"{module}.{attr}", obj.__init__
                continue
            if callable(obj):
                yield f"{module}.{attr}", obj


CALLABLES = list(_public_callables())


@pytest.mark.parametrize(("name", "fn"), CALLABLES, ids=[n for n, _ in CALLABLES])
def test_signature_audit(name, fn):
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert not any(p.kind is p.VAR_POSITIONAL for p in params), name
    optional = {p.name for p in positional if p.default is not p.empty}
    assert optional <= OPTIONAL_POSITIONALS.get(name, set()), f"{name}: options {optional} must be keyword-only"
    assert {p.name for p in params} & BANNED == set(), name
    if name.split(".")[0] in ("pp", "tl", "pl") and positional:  # data first
        assert positional[0].name in {"data", "sdata", "adata", "samples", "paths", "result", "obj", "pred",
                                      "encoder", "name", "table", "model", "path"}, name  # fmt: skip
    for p in params:
        if p.name in ("copy", "overwrite", "inplace"):
            assert p.annotation in ("bool", bool) and p.default is False, f"{name}: {p}"
            assert p.kind is p.KEYWORD_ONLY, f"{name}: {p.name} must be keyword-only"
        if p.name == "key_added":
            assert p.annotation in ("str", "str | None"), f"{name}: {p}"
            assert p.kind is p.KEYWORD_ONLY
        if p.name in ("key", "use_rep"):
            assert p.annotation in ("str", "str | None"), f"{name}: {p}"


def test_readers_default_to_the_key_predict_writes():
    readers = [name for name, fn in CALLABLES if "key" in inspect.signature(fn).parameters]
    assert {"tl.evaluate", "tl.consistency", "tl.attention", "tl.diagnostic_patches", "pl.spatial"} <= set(readers)
    assert {"pl.explorer", "pl.evaluation", "pl.attention", "io.write_csv", "io.write_png"} <= set(readers)
    for name, fn in CALLABLES:
        params = inspect.signature(fn).parameters
        if "key" in params:
            assert params["key"].default == PREDICTION_KEY, name
    assert inspect.signature(hx.tl.predict).parameters["key_added"].default == PREDICTION_KEY
    # tl.attention writes summaries, never under the obsp key predict writes
    assert inspect.signature(hx.tl.attention).parameters["key_added"].default is None


# ------------------------------------------------------------------------------ a non-default prediction key
def test_non_default_key_chain(trained_synthetic, tmp_path):
    """predict(key_added="foo") on a sample whose genes differ (a new table "foo"), then every reader with key="foo"."""
    model = trained_synthetic["model"]
    sdata = copy.deepcopy(trained_synthetic["test"])
    table = sdata.tables["table"]
    del table.uns[PREDICTION_KEY], table.layers[PREDICTION_KEY], table.obsp[f"{PREDICTION_KEY}_attention"]
    # drop two genes from the spot table: the model's genes differ, so predict writes sdata.tables["foo"]
    sdata.tables["table"] = table[:, list(table.var_names[2:])].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = hx.tl.predict(sdata, model, key_added="foo", device="cpu")
        assert sdata.tables["foo"] is out and "foo" in out.layers and "foo_attention" in out.obsp
        spots = sdata.tables["table"]  # the spot table holds them too, by the model's genes (obsm DataFrame)
        assert list(spots.obsm["foo"].columns) == list(out.var_names)
        np.testing.assert_allclose(spots.obsm["foo"].to_numpy(), np.asarray(out.layers["foo"]), rtol=1e-6)
        # nothing is found under the default key
        with pytest.raises(KeyError, match="'hespotex'"):
            hx.tl.evaluate(sdata)

        att = hx.tl.attention(sdata, key="foo", copy=True)
        assert "foo_attention_stats_self" in att.obs
        assert att.uns["foo_attention_stats_summary"]["params"]["attention_key"] == "foo_attention"
        hx.tl.attention(sdata, key="foo")
        assert "foo_attention_stats_self" in out.obs and "foo_attention" in out.obsp  # obsp key untouched

        diag = hx.tl.diagnostic_patches(sdata, by=list(model.genes[:3]), n_patches=4, key="foo", key_added="dfoo")
        assert diag.params["key"] == "foo" and diag.params["table"] == "foo" and diag.params["layer"] == "foo"

        truth = trained_synthetic["test"]  # the measured counts of the same spots
        scores = hx.tl.evaluate(sdata, key="foo", truth=truth, k=5)
        assert "foo_evaluation" in out.uns and out.uns["foo_evaluation"]["params"]["layer"] == "foo"
        pred = np.asarray(out.layers["foo"])
        ref = hx.tl.evaluate(copy.deepcopy(out), key="foo", truth=truth, k=5, key_added="ref")  # the table alone
        pd.testing.assert_frame_equal(scores, ref)
        assert np.isfinite(scores["pearson"]).all() and pred.shape == out.shape
        # evaluate refuses to replace its stored results
        with pytest.raises(ValueError, match="overwrite=True"):
            hx.tl.evaluate(sdata, key="foo", truth=truth, k=5)
        hx.tl.evaluate(sdata, key="foo", truth=truth, k=7, overwrite=True)
        assert len(out.uns["foo_evaluation"]["params"]["hvg"]) == 7

        second = copy.deepcopy(sdata)
        second.tables["foo"].layers["foo"] = second.tables["foo"].layers["foo"][::-1].copy()
        cons = hx.tl.consistency({"a": sdata, "b": second}, key="foo", truth=None, statistics=["mean"])
        assert cons.attrs["params"]["layers"] == {"a": "foo", "b": "foo"}
        assert cons["predicted"].iloc[0] == pytest.approx(1.0)  # same spots reversed: the same gene means

        gene = model.genes[0]
        col = hx.pl.spatial(sdata, list(model.genes[:2]), key="foo", image=False)
        assert col.view.pred.table is out and col.view.pred.layer == "foo"
        np.testing.assert_allclose(col.view.frame(gene)["predicted"], pred[:, 0])
        ex = hx.pl.explorer(sdata, key="foo")
        assert ex.predictions.table is out and ex.predictions.attention_key == "foo_attention"
        assert _frames(hx.pl.evaluation(sdata, key="foo", kind="distribution"))
        edges = _frames(hx.pl.attention(sdata, out.obs_names[5], key="foo", image=False))
        assert edges

        csv = hx.io.write_csv(sdata, tmp_path / "foo.csv", key="foo", genes=[gene])
        written = pd.read_csv(csv)
        np.testing.assert_allclose(written[gene].to_numpy(), pred[:, 0], rtol=1e-5)
        hx.io.write_geojson(sdata, tmp_path / "foo.geojson", key="foo", genes=[gene])
        assert (tmp_path / "foo.geojson").stat().st_size > 0
