"""Two-scale embeddings (``hx.pp.embed(..., context_um=...)``): the spot patch and its context through one encoder,
recorded in the model and reapplied by every prediction path."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from model_configs import TINY as SMALL
from synthetic_sections import trio

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.pp._stain_augment import views_key

pytestmark = pytest.mark.usefixtures("single_threaded")

ENC = "efficientnet_lite0.imagenet"


def test_embed_context_is_the_concatenation_of_two_single_scale_embeddings(sample_factory, monkeypatch):
    sdata = sample_factory(n_spots=12, seed=5)
    table = sdata.tables["table"]
    hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=30.0, key_added="spot")
    hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=80.0, key_added="wide")
    # both scales are in the disk cache now: the two-scale embedding runs no encoder pass
    from hespotex.pp import _embed

    calls = []
    original = _embed.encode_patches
    monkeypatch.setattr(_embed, "encode_patches", lambda *a, **k: calls.append(1) or original(*a, **k))
    hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=30.0, context_um=80.0, key_added="two")
    assert calls == []
    two = table.obsm["two"]
    d = table.obsm["spot"].shape[1]
    assert two.shape == (12, 2 * d) and two.dtype == np.float32
    np.testing.assert_array_equal(two, np.concatenate([table.obsm["spot"], table.obsm["wide"]], axis=1))
    assert not np.allclose(table.obsm["spot"], table.obsm["wide"], atol=1e-3)  # the scales see different tissue
    rec, spot_rec, wide_rec = (table.uns["hespotex_embed"][k] for k in ("two", "spot", "wide"))
    assert rec["patch_um"] == 30.0 and rec["context_um"] == 80.0 and "context_um" not in spot_rec
    assert rec["context_crop_px"] == wide_rec["crop_px"] and rec["context_level"] == wide_rec["level"]
    assert rec["crop_px"] == spot_rec["crop_px"]
    assert rec["cache_key"] not in (spot_rec["cache_key"], wide_rec["cache_key"])
    # without any cache, computed afresh: the same numbers
    other = sample_factory(n_spots=12, seed=5)
    hx.pp.embed(other, encoder=ENC, input_size=32, patch_um=30.0, context_um=80.0, key_added="two", cache=False)
    np.testing.assert_allclose(other.tables["table"].obsm["two"], two, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # one encoder pass per scale
    # the same call again is a no-op; another context scale over it needs overwrite
    hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=30.0, context_um=80.0, key_added="two")
    with pytest.raises(ValueError, match="already holds other embeddings"):
        hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=30.0, context_um=60.0, key_added="two")
    for bad in (30.0, 10.0, float("nan"), "wide", True):
        with pytest.raises(ValueError, match="context_um to be a context patch side in µm wider than the spot patch"):
            hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=30.0, context_um=bad, key_added="bad")


def test_context_with_stain_views_concatenates_view_by_view(sample_factory):
    sdata = sample_factory(n_spots=8, seed=6)
    table = sdata.tables["table"]
    hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=30.0, stain_augment=2, key_added="spot")
    hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=80.0, stain_augment=2, key_added="wide")
    hx.pp.embed(sdata, encoder=ENC, input_size=32, patch_um=30.0, context_um=80.0, stain_augment=2, key_added="two")
    views = table.obsm[views_key("two")]
    assert views.shape == (8, 2, table.obsm["two"].shape[1])
    np.testing.assert_array_equal(
        views, np.concatenate([table.obsm[views_key("spot")], table.obsm[views_key("wide")]], axis=2)
    )


def _sections():
    return trio("s")


@pytest.fixture(scope="module")
def two_scale(tmp_path_factory):
    """A model trained on 2-scale embeddings (32 px encoder input, to keep the test quick), and a test slide never
    embedded."""
    sections = _sections()
    patch = float(sections["a"].tables["table"].uns["hespotex_sample"]["spot_diameter_um"])
    for name in ("a", "b"):
        hx.pp.embed(sections[name], encoder=ENC, input_size=32, patch_um=patch, context_um=2 * patch)
    config = ModelConfig.preset("hespotex", epochs=3, patience=None, **SMALL)
    model = hx.tl.train(
        [sections["a"], sections["b"]], genes=list(sections["a"].tables["table"].var_names), config=config,
        device="cpu", validation=0.2,
    )  # fmt: skip
    return {"model": model, "patch": patch, "sections": sections, "tmp": tmp_path_factory.mktemp("ctx")}


def test_train_records_the_context_and_predict_reapplies_it(two_scale):
    model, patch, sections = two_scale["model"], two_scale["patch"], two_scale["sections"]
    train_table = sections["a"].tables["table"]
    assert train_table.uns["hespotex_embed"]["X_hespotex_image"]["context_um"] == 2 * patch
    assert model.embedding["context_um"] == 2 * patch and model.embedding["patch_um"] == patch
    width = train_table.obsm["X_hespotex_image"].shape[1]
    # save / load round trip: setup.json holds the scales, the loaded model predicts the same
    folder = model.save(two_scale["tmp"] / "model")
    setup = json.loads((folder / "setup.json").read_text())
    assert setup["embedding"]["context_um"] == 2 * patch and setup["embedding_dim"] == width
    loaded = hx.tl.HESpotEx.load(folder)
    assert loaded.embedding["context_um"] == 2 * patch
    assert (
        "context: " in (folder / "README.md").read_text()
        and f"{2 * patch} µm patch" in (folder / "README.md").read_text()
    )
    # in memory: the never-embedded slide is embedded at both scales, exactly as hx.pp.embed does
    slide = copy.deepcopy(sections["t"])
    table = hx.tl.predict(slide, loaded, device="cpu")
    emb = slide.tables["table"].obsm["X_hespotex_image"]
    assert emb.shape[1] == width and slide.tables["table"].uns["hespotex_embed"]["X_hespotex_image"]["context_um"] == (
        2 * patch
    )
    ref = copy.deepcopy(sections["t"])
    hx.pp.embed(ref, encoder=ENC, input_size=32, patch_um=patch, key_added="spot", cache=False)
    hx.pp.embed(ref, encoder=ENC, input_size=32, patch_um=2 * patch, key_added="wide", cache=False)
    rt = ref.tables["table"]
    np.testing.assert_allclose(emb, np.concatenate([rt.obsm["spot"], rt.obsm["wide"]], axis=1), rtol=1e-5, atol=1e-6)
    assert table.uns["hespotex"]["params"]["context_um"] == 2 * patch
    in_memory = np.asarray(table.layers["hespotex"])
    np.testing.assert_allclose(
        in_memory,
        np.asarray(hx.tl.predict(copy.deepcopy(slide), model, device="cpu", key_added="again").layers["again"]),
        atol=1e-6,
    )
    # streamed (embedding chunk by chunk at both scales): the same predictions
    streamed = hx.tl.predict(
        copy.deepcopy(sections["t"]), loaded, device="cpu", out=two_scale["tmp"] / "s.zarr", chunk_size=25
    )
    assert streamed.uns["hespotex"]["params"]["context_um"] == 2 * patch
    np.testing.assert_allclose(np.asarray(streamed.layers["hespotex"]), in_memory, rtol=1e-4, atol=1e-5)


def test_single_scale_embeddings_are_refused_by_a_two_scale_model_and_back(two_scale, tmp_path):
    model, patch, sections = two_scale["model"], two_scale["patch"], two_scale["sections"]
    slide = copy.deepcopy(sections["t"])
    hx.pp.embed(slide, encoder=ENC, input_size=32, patch_um=patch)  # the spot patch only
    with pytest.raises(ValueError, match=rf"with {2 * patch} µm context.*context_um={2 * patch}"):
        hx.tl.predict(slide, model, device="cpu")
    with pytest.raises(ValueError, match="context_um="):
        hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=tmp_path / "s.zarr")
    # another context scale is refused too
    other = copy.deepcopy(sections["t"])
    hx.pp.embed(other, encoder=ENC, input_size=32, patch_um=patch, context_um=3 * patch)
    with pytest.raises(ValueError, match=rf"with {3 * patch} µm context"):
        hx.tl.predict(other, model, device="cpu")
    # training samples embedded at different scales are refused
    a, b = copy.deepcopy(sections["a"]), copy.deepcopy(sections["b"])
    hx.pp.embed(a, encoder=ENC, input_size=32, patch_um=patch, context_um=2 * patch)
    hx.pp.embed(b, encoder=ENC, input_size=32, patch_um=patch, overwrite=True)
    with pytest.raises(ValueError, match=r"Samples were embedded differently.*context"):
        hx.tl.train([a, b], genes=model.genes, device="cpu", config=model.config)


def test_saved_context_is_validated(two_scale, tmp_path):
    from hespotex.tl.model._setup_validation import ModelFolderError

    folder = two_scale["model"].save(tmp_path / "m")
    setup = json.loads((folder / "setup.json").read_text())
    setup["embedding"]["context_um"] = setup["embedding"]["patch_um"] / 2
    (folder / "setup.json").write_text(json.dumps(setup))
    with pytest.raises(ModelFolderError, match="context_um is null or a finite number wider than patch_um"):
        hx.tl.HESpotEx.load(folder)
