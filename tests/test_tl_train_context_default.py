"""``hx.tl.train(..., context_um="auto")`` (the default) and ``hespotex train --context-um``: samples that train embeds
get two-scale embeddings (a context patch twice the spot patch as resolved), samples embedded beforehand keep theirs
and are never re-embedded, and prediction embeds new slides at the model's scales."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from model_configs import TINY
from synthetic_sections import cli_samples

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.pp import load_encoder

pytestmark = pytest.mark.usefixtures("single_threaded")

ENC = "efficientnet_lite0.imagenet"
KEY = "X_hespotex_image"
SPOT_UM = 55.0  # the synthetic sections' spot diameter: the default spot patch


def _section(name: str, seed: int):
    return hx.datasets.synthetic(
        n_spots=50, n_genes=8, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"ctxdef_{name}"
    )


def _kw(sections, **extra):
    config = ModelConfig.preset("hespotex", epochs=2, patience=None, **TINY)
    genes = list(sections[0].tables["table"].var_names)
    return {"genes": genes, "config": config, "device": "cpu", "validation": 0.2, **extra}


@pytest.fixture(scope="module")
def encoder():
    """EfficientNet-Lite0 at a 32 px input (quick); train and predict take the loaded encoder."""
    return load_encoder(ENC, input_size=32)


@pytest.fixture(scope="module")
def default_model(encoder):
    """A model trained with the defaults on two SpatialData sections that were never embedded."""
    train = [_section("a", 1), _section("b", 2)]
    assert train[0].tables["table"].uns["hespotex_sample"]["spot_diameter_um"] == SPOT_UM
    return {"model": hx.tl.train(train, **_kw(train, encoder=encoder)), "train": train}


def _record(sdata) -> dict:
    return sdata.tables["table"].uns["hespotex_embed"][KEY]


def _width(sdata) -> int:
    return sdata.tables["table"].obsm[KEY].shape[1]


def test_default_trains_on_two_scale_embeddings(default_model, encoder):
    model, train = default_model["model"], default_model["train"]
    for sdata in train:
        assert _record(sdata)["patch_um"] == SPOT_UM and _record(sdata)["context_um"] == 2 * SPOT_UM
        assert _width(sdata) == 2 * encoder.num_features
    assert model.embedding["patch_um"] == SPOT_UM and model.embedding["context_um"] == 2 * SPOT_UM
    assert model.embedding_mean_.shape == (2 * encoder.num_features,)
    # on 4 stain views per spot, each also cut at a field of view up to ±15 % off and flipped / turned (recorded)
    assert model.stain_augment["n_views"] == 4 and model.stain_augment["method"] == "hed_jitter+zoom+dihedral"
    assert model.stain_augment["ranges"]["zoom"] == pytest.approx([1 / 1.15, 1.15])
    # the spot patch and a context patch twice as wide, exactly as two single-scale hx.pp.embed calls make them
    ref = _section("a", 1)
    hx.pp.embed(ref, encoder=encoder, patch_um=SPOT_UM, key_added="spot", cache=False)
    hx.pp.embed(ref, encoder=encoder, patch_um=2 * SPOT_UM, key_added="wide", cache=False)
    table = ref.tables["table"]
    np.testing.assert_allclose(
        train[0].tables["table"].obsm[KEY],
        np.concatenate([table.obsm["spot"], table.obsm["wide"]], axis=1),
        rtol=1e-5,
        atol=1e-6,
    )


def test_default_model_predicts_a_new_slide_embedding_it_at_both_scales(default_model, encoder, tmp_path):
    loaded = hx.tl.load_model(default_model["model"].save(tmp_path / "model"))
    assert loaded.embedding["context_um"] == 2 * SPOT_UM
    slide = _section("t", 3)  # image only, never embedded
    out = hx.tl.predict(slide, loaded, device="cpu")
    assert _width(slide) == 2 * encoder.num_features
    assert _record(slide)["patch_um"] == SPOT_UM and _record(slide)["context_um"] == 2 * SPOT_UM
    assert out.uns["hespotex"]["params"]["context_um"] == 2 * SPOT_UM
    pred = np.asarray(out.layers["hespotex"])
    assert pred.shape == (slide.tables["table"].n_obs, len(loaded.genes)) and np.isfinite(pred).all()
    # the same as predicting a slide embedded by hand with hx.pp.embed(..., context_um="auto")
    by_hand = _section("t", 3)
    hx.pp.embed(by_hand, encoder=ENC, input_size=32, context_um="auto")
    np.testing.assert_allclose(by_hand.tables["table"].obsm[KEY], slide.tables["table"].obsm[KEY], atol=1e-6)
    ref = hx.tl.predict(by_hand, loaded, device="cpu")
    np.testing.assert_allclose(np.asarray(ref.layers["hespotex"]), pred, atol=1e-5)


def test_context_follows_the_resolved_patch_and_none_is_single_scale(encoder):
    narrow = [_section("p", 4), _section("q", 5)]
    model = hx.tl.train(narrow, **_kw(narrow, encoder=encoder, patch_um=40.0, stain_augment=False))
    assert model.embedding["patch_um"] == 40.0 and model.embedding["context_um"] == 80.0
    assert all(_record(s)["context_um"] == 80.0 and _width(s) == 2 * encoder.num_features for s in narrow)

    single = [_section("r", 6), _section("s", 7)]
    model = hx.tl.train(single, **_kw(single, encoder=encoder, context_um=None, stain_augment=False))
    assert model.embedding.get("context_um") is None and model.embedding["patch_um"] == SPOT_UM
    assert all("context_um" not in _record(s) and _width(s) == encoder.num_features for s in single)
    assert model.embedding_mean_.shape == (encoder.num_features,)


def test_samples_embedded_beforehand_keep_their_embeddings(encoder):
    # single-scale embeddings made beforehand: trained on as they are, never re-embedded
    before = [_section("c", 8), _section("d", 9)]
    for sdata in before:
        hx.pp.embed(sdata, encoder=encoder)
    arrays = [s.tables["table"].obsm[KEY] for s in before]
    records = [copy.deepcopy(dict(_record(s))) for s in before]
    model = hx.tl.train(before, **_kw(before))
    assert model.embedding.get("context_um") is None
    for sdata, array, record in zip(before, arrays, records, strict=True):
        assert sdata.tables["table"].obsm[KEY] is array and dict(_record(sdata)) == record
        assert _width(sdata) == encoder.num_features
    # one sample embedded beforehand (single scale), one not: the one embedded here follows it
    mixed = [_section("e", 10), _section("f", 11)]
    hx.pp.embed(mixed[0], encoder=encoder)
    model = hx.tl.train(mixed, **_kw(mixed, encoder=encoder))
    assert model.embedding.get("context_um") is None
    assert "context_um" not in _record(mixed[1]) and _width(mixed[1]) == encoder.num_features
    # two-scale embeddings made beforehand at another context: the sample embedded here gets the same
    wide = [_section("g", 12), _section("h", 13)]
    hx.pp.embed(wide[0], encoder=encoder, context_um=3 * SPOT_UM)
    model = hx.tl.train(wide, **_kw(wide, encoder=encoder))
    assert model.embedding["context_um"] == 3 * SPOT_UM and _record(wide[1])["context_um"] == 3 * SPOT_UM


def test_a_bad_context_um_is_refused_before_any_work(encoder):
    train = [_section("i", 14), _section("j", 15), _section("k", 16)]
    for bad in ("none", "2x", True, -5.0, 0, float("nan"), [200.0]):
        with pytest.raises(ValueError, match=r"Expected context_um to be 'auto' .*, or None \(single scale\); found"):
            hx.tl.train(train[:2], **_kw(train, encoder=encoder, context_um=bad))
    with pytest.raises(ValueError, match=r"found 'none'\. Pass one of these \(None, not the string 'none'"):
        hx.tl.train(train, **_kw(train, encoder=encoder, context_um="none", validation="auto", ensemble=True))
    assert all(KEY not in s.tables["table"].obsm for s in train)  # refused before embedding anything
    # a context no wider than the spot patch is refused where the patch is known, when embedding
    with pytest.raises(ValueError, match=r"context patch side in µm wider than the spot patch \(55 µm\)"):
        hx.tl.train(train[:2], **_kw(train, encoder=encoder, context_um=SPOT_UM))


def test_default_ensemble_members_train_on_the_same_two_scale_embeddings(encoder):
    train = [_section("l", 17), _section("m", 18), _section("n", 19)]
    kw = _kw(train, encoder=encoder, stain_augment=False)
    del kw["validation"]  # validation="auto" with 3 samples: the default ensemble
    model = hx.tl.train(train, **kw)
    assert isinstance(model, hx.tl.HESpotExEnsemble) and len(model.members) == 6  # 2 per held-out sample
    assert [m.embedding["context_um"] for m in model.members] == [2 * SPOT_UM] * 6
    assert all(_record(s)["context_um"] == 2 * SPOT_UM and _width(s) == 2 * encoder.num_features for s in train)


def test_cli_train_context_none_and_bad_values(tmp_path, capsys):
    from hespotex.cli import main

    samples, genes = cli_samples(tmp_path, _section, 20)
    args = ["train", "--out", str(tmp_path / "model"), "--encoder", ENC, "--input-size", "32", "--epochs", "2",
            "--genes", str(genes), "--set", "ae_epochs=2", "--set", "latent_dim=8",
            "--stain-views", "0", "--validation", "none", *samples]  # fmt: skip
    for bad in ("2x", "0", "-100"):
        assert main([*args, "--context-um", bad]) == 2
        assert "expected auto, none or a context patch side in µm such as 200" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
    assert main([*args, "--context-um", "none"]) == 0  # the default (auto) is checked in test_cli.py
    model = hx.tl.load_model(tmp_path / "model")
    assert model.embedding.get("context_um") is None and model.embedding["patch_um"] == SPOT_UM
    assert len(model.embedding_mean_) == load_encoder(ENC, input_size=32).num_features
