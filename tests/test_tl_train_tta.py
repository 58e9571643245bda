"""``hx.tl.train(tta=...)`` and ``hespotex train --tta``: models trained on test-time-augmented embeddings (the 8
flips/rotations of each patch, averaged) record it, and prediction re-applies it (issue 9, item 4)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from synthetic_sections import cli_samples

import hespotex as hx
from hespotex.models import ModelConfig

pytestmark = pytest.mark.usefixtures("single_threaded")

SMALL = {"ae_epochs": 2, "ae_hidden_dim": 16, "latent_dim": 8, "projection_hidden_dim": 16, "head_hidden_dim": 16,
         "decoder_heads": 2}  # fmt: skip
KEY = "X_hespotex_image"


def _section(name: str, seed: int):
    return hx.datasets.synthetic(
        n_spots=50, n_genes=8, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"ttatrain_{name}"
    )


def _config():
    return ModelConfig.preset("hespotex", epochs=2, patience=None, **SMALL)


def test_train_tta_embeds_records_and_prediction_reapplies_it(tmp_path):
    from hespotex.pp import load_encoder

    hx.settings.progress = False
    train = [_section(n, s) for n, s in (("a", 1), ("b", 2), ("c", 3))]
    genes = list(train[0].tables["table"].var_names)
    encoder = load_encoder("efficientnet_lite0.imagenet", input_size=32)
    model = hx.tl.train(
        train, genes=genes, config=_config(), device="cpu", encoder=encoder, tta=True, stain_augment=False
    )  # 3 samples: the default ensemble, every member trained on TTA embeddings
    assert isinstance(model, hx.tl.HESpotExEnsemble)
    assert [m.embedding["tta"] for m in model.members] == ["dihedral8"] * 6
    # train embedded the samples exactly as hx.pp.embed(tta=True) does (at both scales, the default), and not as plain
    # embed
    assert [m.embedding["context_um"] for m in model.members] == [2 * 55.0] * 6
    ref = _section("a", 1)
    hx.pp.embed(ref, encoder="efficientnet_lite0.imagenet", input_size=32, tta=True, context_um="auto")
    got = train[0].tables["table"].obsm[KEY]
    np.testing.assert_allclose(got, ref.tables["table"].obsm[KEY], rtol=1e-4, atol=1e-5)
    plain_ref = _section("a", 1)
    hx.pp.embed(plain_ref, encoder="efficientnet_lite0.imagenet", input_size=32, context_um="auto")
    assert not np.allclose(got, plain_ref.tables["table"].obsm[KEY], atol=1e-3)

    loaded = hx.tl.load_model(model.save(tmp_path / "model"))
    assert [m.embedding["tta"] for m in loaded.members] == ["dihedral8"] * 6  # saved and read back

    slide = _section("t", 9)  # image only: predict embeds it with the model's settings, TTA included
    pred = hx.tl.predict(copy.deepcopy(slide), loaded, device="cpu")
    assert pred.uns["hespotex"]["params"]["tta"] == "dihedral8"
    tta_slide = copy.deepcopy(slide)
    hx.pp.embed(tta_slide, encoder="efficientnet_lite0.imagenet", input_size=32, tta=True, context_um="auto")
    ref_pred = hx.tl.predict(tta_slide, loaded, device="cpu")
    np.testing.assert_allclose(np.asarray(pred.layers["hespotex"]), np.asarray(ref_pred.layers["hespotex"]), atol=1e-4)
    plain = copy.deepcopy(slide)
    hx.pp.embed(plain, encoder="efficientnet_lite0.imagenet", input_size=32, context_um="auto")
    with pytest.raises(ValueError, match=r"test-time augmentation"):  # plain embeddings are refused, not mixed in
        hx.tl.predict(plain, loaded, device="cpu")


def test_train_tta_refuses_embeddings_made_otherwise():
    hx.settings.progress = False
    plain = [_section(n, s) for n, s in (("p", 4), ("q", 5))]
    tta = [_section(n, s) for n, s in (("r", 6), ("s", 7))]
    for sdata in plain:
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32)
    for sdata in tta:
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32, tta=True)
    genes = list(plain[0].tables["table"].var_names)
    kw = {"genes": genes, "config": _config(), "device": "cpu", "validation": None}
    with pytest.raises(ValueError, match=r"tta=True but samples \['ttatrain_p', 'ttatrain_q'\].*without test-time"):
        hx.tl.train(plain, tta=True, **kw)
    with pytest.raises(ValueError, match=r"tta=False but samples .*with test-time augmentation.*tta=False"):
        hx.tl.train(tta, tta=False, **kw)
    with pytest.raises(ValueError, match=r"Expected `tta` to be True, False or None"):
        hx.tl.train(tta, tta="yes", **kw)
    assert hx.tl.train(tta, **kw).embedding["tta"] == "dihedral8"  # None: the embeddings they have, recorded
    assert hx.tl.train(plain, tta=False, **kw).embedding.get("tta") is None


def test_cli_train_tta_records_it(tmp_path):
    from hespotex.cli import main

    samples, genes = cli_samples(tmp_path, _section, 10)
    args = ["train", "--out", str(tmp_path / "model"), "--encoder", "efficientnet_lite0.imagenet", "--input-size",
            "32", "--epochs", "2", "--genes", str(genes), "--set", "ae_epochs=2",
            "--set", "latent_dim=8", "--stain-views", "0", "--validation", "none", "--tta", *samples]  # fmt: skip
    assert main(args) == 0
    assert hx.tl.load_model(tmp_path / "model").embedding["tta"] == "dihedral8"
    args[2] = str(tmp_path / "plain")
    assert main([a for a in args if a != "--tta"]) == 0
    assert hx.tl.load_model(tmp_path / "plain").embedding.get("tta") is None
