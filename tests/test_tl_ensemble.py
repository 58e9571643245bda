"""Ensembles: members per held-out validation sample, one model to the user (issue 9, items 4 and 6)."""

from __future__ import annotations

import numpy as np
import pytest
from model_configs import SMALL

import hespotex as hx
from hespotex import _ownership
from hespotex.models import ModelConfig
from hespotex.tl.model._ensemble import member_seed

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def sections():
    hx.settings.progress = False
    out = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 4), ("t", 3)):
        sdata = hx.datasets.synthetic(
            n_spots=70, n_genes=10, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"s{name}"
        )
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32)
        out[name] = sdata
    return out


def test_ensemble_trains_saves_loads_and_predicts_with_spread(sections, tmp_path):
    train = [sections[n] for n in "abc"]
    # autoencoders on each member's training samples (the paper's; the default shares one on every sample, below)
    config = ModelConfig.preset("hespotex", epochs=4, patience=None, ae_samples="training", **SMALL)
    genes = list(sections["a"].tables["table"].var_names)
    ens = hx.tl.train(  # the default (ensemble="auto") with 3 samples: an ensemble
        train,
        genes=genes,
        config=config,
        target_norm="library_modelled",
        embedding_norm="slide",
        device="cpu",
    )
    assert isinstance(ens, hx.tl.HESpotExEnsemble) and len(ens.members) == 6  # 2 per held-out sample
    held = [m.validation_["samples"][0] for m in ens.members]
    assert held == ["sa", "sb", "sc"] * 2  # every sample held out by two members (one per round)
    assert ens.validation_["samples"] == ["sa", "sb", "sc"]  # read as a single model's are
    assert [h["member"] for h in ens.history_] == [k for k, m in enumerate(ens.members) for _ in m.history_]
    seeds = [m.config.seed for m in ens.members]  # each member its own seed, from the one given (0) and its samples
    trained_on = [sorted({"sa", "sb", "sc"} - set(m.validation_["samples"])) for m in ens.members]
    rounds = [0, 0, 0, 1, 1, 1]
    assert seeds == [member_seed(1_000_000 * r, t) for r, t in zip(rounds, trained_on, strict=True)]
    assert ens.seed == 0 and len(set(seeds)) == 6
    assert member_seed(0, ["sb", "sa"]) == member_seed(0, ["sa", "sb"]) != member_seed(1, ["sa", "sb"])
    # the second round shares the first's autoencoders (same training samples), not its image stream
    assert [m.config.ae_seed for m in ens.members] == [None] * 3 + seeds[:3]
    for first, second in zip(ens.members[:3], ens.members[3:], strict=True):
        ae1, ae2 = first.module_.autoencoder.state_dict(), second.module_.autoencoder.state_dict()
        assert all(np.array_equal(ae1[k].numpy(), ae2[k].numpy()) for k in ae1)
        w1, w2 = (m.module_.projection.state_dict() for m in (first, second))
        assert not all(np.array_equal(w1[k].numpy(), w2[k].numpy()) for k in w1)
    aes = [m.module_.autoencoder.state_dict() for m in ens.members[:3]]  # the first round's differ
    assert not all(np.array_equal(aes[0][k].numpy(), aes[1][k].numpy()) for k in aes[0])
    folder = ens.save(tmp_path / "ens")
    with pytest.raises(FileExistsError):
        ens.save(folder)
    assert ens.save(folder, overwrite=True) == folder  # its own folder (marker) is replaced...
    assert _ownership.owned(folder, "model") and sorted(p.name for p in tmp_path.iterdir()) == [
        "ens"
    ]  # no temporary left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"hespotex did not write.*notes\.txt"):
        ens.save(mine, overwrite=True)  # ...a user's folder never is
    assert (mine / "notes.txt").read_text() == "keep"
    mine.joinpath("notes.txt").unlink()
    mine.rmdir()
    with pytest.raises(FileNotFoundError, match=r"holds an ensemble.*load_model"):
        hx.tl.HESpotEx.load(folder)  # one model's loader names the one that reads an ensemble
    loaded = hx.tl.load_model(folder)
    assert isinstance(loaded, hx.tl.HESpotExEnsemble) and loaded.model_id == ens.model_id
    assert loaded.target_norm == "library_modelled" and loaded.embedding_norm == "slide"
    assert loaded.seed == 0 and [m.config.seed for m in loaded.members] == seeds
    assert [m.config.ae_seed for m in loaded.members] == [None] * 3 + seeds[:3]  # recorded with each member
    out = hx.tl.predict(sections["t"].tables["table"].copy(), str(folder), device="cpu")
    params = out.uns["hespotex"]["params"]
    assert params["spread_layer"] == "hespotex_spread" and params["ensemble_members"] == 6
    assert params["target_norm"] == "library_modelled" and params["seed"] == 0  # the ensemble's seed, not a member's
    # the prediction is the members' mean and the spread their standard deviation
    members = np.stack(
        [
            np.asarray(hx.tl.predict(sections["t"].tables["table"].copy(), m, device="cpu").layers["hespotex"])
            for m in loaded.members
        ]
    )
    np.testing.assert_allclose(out.layers["hespotex"], members.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.layers["hespotex_spread"], members.std(0), rtol=1e-4, atol=1e-5)
    assert (np.asarray(out.layers["hespotex_spread"]) > 0).any()
    # the members' agreement per gene: their mean pairwise Pearson across spots, in the table's gene order
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6)]
    expected = [
        np.mean([np.corrcoef(members[a][:, g], members[b][:, g])[0, 1] for a, b in pairs])
        for g in range(members.shape[2])
    ]
    assert params["agreement_key"] == "hespotex_agreement" and params["agreement_spots"] == out.n_obs
    np.testing.assert_allclose(out.var["hespotex_agreement"], expected, atol=2e-4)
    assert np.isfinite(out.var["hespotex_agreement"]).all() and (out.var["hespotex_agreement"] < 1).all()
    scores = hx.tl.evaluate(out, truth="expected")  # beside each gene's score on this slide
    np.testing.assert_array_equal(scores["agreement"], out.var["hespotex_agreement"].reindex(scores.index))
    # decoder attention is the members' mean: rows still sum to 1
    att = out.obsp["hespotex_attention"]
    np.testing.assert_allclose(np.asarray(att.sum(axis=1)).ravel(), 1.0, rtol=1e-4)
    # streaming, cohort, explain: tests/test_ensemble_one_model.py


def test_ensemble_bad_input(sections):
    config = ModelConfig.preset("hespotex", epochs=2, patience=None, **SMALL)
    with pytest.raises(ValueError, match="at least 3 samples"):
        hx.tl.train([sections["a"], sections["b"]], config=config, genes=["g0", "g1"], ensemble=True, device="cpu")
    with pytest.raises(ValueError, match="leave validation='auto'"):
        hx.tl.train([sections[n] for n in "abc"], config=config, ensemble=True, validation=["sa"], device="cpu")
    with pytest.raises(ValueError, match="at least 2 trained members"):
        hx.tl.HESpotExEnsemble([])


def test_ensemble_auto_default(sections):
    from hespotex.tl.training._train import resolve_ensemble

    config = ModelConfig.preset("hespotex", epochs=2, patience=None, **SMALL)
    genes = list(sections["a"].tables["table"].var_names)
    single = hx.tl.train([sections["a"], sections["b"]], genes=genes, config=config, device="cpu")
    assert isinstance(single, hx.tl.HESpotEx)  # 2 samples: one model (spatial blocks for early stopping)
    three = [sections[n] for n in "abc"]
    assert resolve_ensemble("auto", three, "auto") == 2  # members per held-out sample
    assert resolve_ensemble("auto", three, ["sa"]) == 0  # a validation chosen by the user: one model
    assert resolve_ensemble("auto", three, None) == 0
    assert resolve_ensemble(False, three, "auto") == 0 and resolve_ensemble(True, three, "auto") == 2
    assert resolve_ensemble(1, three, "auto") == 1 and resolve_ensemble(np.int64(3), three, "auto") == 3
    explicit = hx.tl.train(three, genes=genes, config=config, validation=["sa"], device="cpu")
    assert isinstance(explicit, hx.tl.HESpotEx) and explicit.validation_["samples"] == ["sa"]
    for bad in ("yes", 0, -1, 1.5):
        with pytest.raises(ValueError, match="'auto', True, False or the number of members per held-out sample"):
            hx.tl.train(three, genes=genes, config=config, ensemble=bad, device="cpu")
    one_each = hx.tl.train(three, genes=genes, config=config, ensemble=1, device="cpu")  # as before: 3 members
    assert [m.validation_["samples"][0] for m in one_each.members] == ["sa", "sb", "sc"]
    # the default (ae_samples="all"): one autoencoder on every sample, shared by the members
    assert [m.config.ae_seed for m in one_each.members] == [member_seed(0, ["sa", "sb", "sc"])] * 3
    own = hx.tl.train(three, genes=genes, config=config.replace(ae_samples="training"), ensemble=1, device="cpu")
    assert all(m.config.ae_seed is None for m in own.members)  # one each, on its training samples


def test_shared_autoencoder_does_not_depend_on_the_cache(sections, tmp_path, monkeypatch):
    """A member given ``config.ae_seed`` pre-trains the autoencoder of the member with that seed from scratch when
    no cache holds it (a new process, an empty cache): its initialisation and pre-training follow ``ae_seed``."""
    from hespotex.tl.training import _training

    config = ModelConfig.preset("hespotex", epochs=1, patience=None, **SMALL)
    genes = list(sections["a"].tables["table"].var_names)
    three = [sections[n] for n in "abc"]

    def fit(seed, **changes):
        monkeypatch.setattr(hx.settings, "cachedir", tmp_path / f"cache{seed}{changes}")
        monkeypatch.setattr(_training, "_AE_CACHE", {})  # as a new process would start
        cfg = config.replace(**changes)
        return hx.tl.train(three, genes=genes, config=cfg, seed=seed, validation=["sa"], device="cpu")

    first, second = fit(11), fit(12, ae_seed=11)
    ae1, ae2 = first.module_.autoencoder.state_dict(), second.module_.autoencoder.state_dict()
    assert all(np.array_equal(ae1[k].numpy(), ae2[k].numpy()) for k in ae1)
    own = fit(12)  # without ae_seed the image stream starts the same, the autoencoder does not
    assert not all(np.array_equal(ae1[k].numpy(), own.module_.autoencoder.state_dict()[k].numpy()) for k in ae1)
    net = hx.models.HESpotExNet(10, 16, config.replace(seed=12, ae_seed=11))
    same = hx.models.HESpotExNet(10, 16, config.replace(seed=12))
    for part in ("projection", "direct_head", "decoder"):
        a, b = getattr(net, part).state_dict(), getattr(same, part).state_dict()
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    with pytest.raises(ValueError, match="`ae_seed` to be an integer or None"):
        config.replace(ae_seed="11")


def test_autoencoder_on_every_sample_is_one_shared_by_all_members(sections, tmp_path, monkeypatch):
    """``config.ae_samples="all"``: the autoencoder pre-trains on every sample given, the held-out ones' expression
    too, and every member shares it; the image stream still trains on each member's training samples only."""
    from hespotex.tl.training import _training

    monkeypatch.setattr(hx.settings, "cachedir", tmp_path / "cache")
    monkeypatch.setattr(_training, "_AE_CACHE", {})
    config = ModelConfig.preset("hespotex", epochs=1, patience=None, **SMALL).replace(ae_samples="all")
    genes = list(sections["a"].tables["table"].var_names)
    three = [sections[n] for n in "abc"]
    ens = hx.tl.train(three, genes=genes, config=config, ensemble=1, device="cpu")
    shared = member_seed(0, ["sa", "sb", "sc"])
    assert [m.config.ae_seed for m in ens.members] == [shared] * 3
    assert [m.train_samples_ for m in ens.members] == [["sb", "sc"], ["sa", "sc"], ["sa", "sb"]]
    aes = [m.module_.autoencoder.state_dict() for m in ens.members]
    assert all(np.array_equal(aes[0][k].numpy(), ae[k].numpy()) for ae in aes[1:] for k in aes[0])
    # it is the autoencoder a model trained on all three samples pre-trains (from scratch: no cache)
    monkeypatch.setattr(hx.settings, "cachedir", tmp_path / "fresh")
    monkeypatch.setattr(_training, "_AE_CACHE", {})
    whole = hx.tl.train(
        three, genes=genes, config=config.replace(ae_samples="training", ae_seed=shared), validation=None, device="cpu"
    )
    ref = whole.module_.autoencoder.state_dict()
    assert all(np.array_equal(aes[0][k].numpy(), ref[k].numpy()) for k in ref)
    # "training" pre-trains on the training samples alone: with the same seed, another autoencoder
    cfg = config.replace(ae_samples="training", ae_seed=shared)
    own = hx.tl.train(three, genes=genes, config=cfg, validation=["sa"], device="cpu")
    other = own.module_.autoencoder.state_dict()
    assert not all(np.array_equal(other[k].numpy(), ref[k].numpy()) for k in ref)
    with pytest.raises(ValueError, match="`ae_samples` to be one of"):
        config.replace(ae_samples="validation")
