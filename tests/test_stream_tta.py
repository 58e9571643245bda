"""A model trained on test-time-augmented embeddings (``hx.pp.embed(tta=True)``) re-embeds a streamed slide with
the same 8 flips/rotations (issue 9, item 4)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import hespotex as hx
from hespotex.models import ModelConfig

pytestmark = pytest.mark.usefixtures("single_threaded")

SMALL = {"ae_epochs": 3, "ae_hidden_dim": 16, "latent_dim": 8, "projection_hidden_dim": 16, "head_hidden_dim": 16,
         "decoder_heads": 2}  # fmt: skip


def _section(name: str, seed: int):
    return hx.datasets.synthetic(
        n_spots=60, n_genes=8, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=f"tta_{name}"
    )


def test_streaming_re_embeds_with_tta(tmp_path, monkeypatch):
    from hespotex.pp import _encode as _embed  # the encoder loop (hx.pp.embed and the stream)

    hx.settings.progress = False
    train = []
    for name, seed in (("a", 1), ("b", 2)):
        sdata = _section(name, seed)
        hx.pp.embed(sdata, encoder="efficientnet_lite0.imagenet", input_size=32, tta=True)
        train.append(sdata)
    config = ModelConfig.preset("hespotex", epochs=3, patience=None, **SMALL)
    genes = list(train[0].tables["table"].var_names)
    model = hx.tl.train(train, genes=genes, config=config, ensemble=False, validation=None, device="cpu")
    assert model.embedding["tta"] == "dihedral8"  # the model records how its embeddings were made

    slide = _section("t", 3)  # image only: streaming embeds it with the model's settings
    calls = []
    real = _embed.encode_patches

    def spy(plan, encoder, *args, **kwargs):
        calls.append(kwargs.get("tta"))
        return real(plan, encoder, *args, **kwargs)

    monkeypatch.setattr(_embed, "encode_patches", spy)
    streamed = hx.tl.predict(copy.deepcopy(slide), model, device="cpu", out=tmp_path / "s.zarr", chunk_size=32)
    monkeypatch.setattr(_embed, "encode_patches", real)
    assert calls and all(calls)  # every streamed chunk was encoded with TTA

    # the same values as in memory on TTA embeddings, and not those of plain embeddings
    tta = copy.deepcopy(slide)
    hx.pp.embed(tta, encoder="efficientnet_lite0.imagenet", input_size=32, tta=True)
    ref = hx.tl.predict(tta, model, device="cpu")
    got = np.asarray(streamed.layers["hespotex"])
    np.testing.assert_allclose(got, np.asarray(ref.layers["hespotex"]), atol=1e-4)
    plain = copy.deepcopy(slide)
    hx.pp.embed(plain, encoder="efficientnet_lite0.imagenet", input_size=32)
    with pytest.raises(ValueError, match=r"test-time augmentation.*tta=True"):  # plain embeddings: refused, not mixed
        hx.tl.predict(plain, model, device="cpu")
    from hespotex.tl.model._data import GraphData, graph_data

    sample = graph_data(plain.tables["table"], "p", genes=None)
    plain_pred = model.predict_graph(GraphData("p", sample.emb, sample.coords_um), device="cpu")["expression"]
    assert np.abs(got - plain_pred).max() > 1e-3
    assert streamed.uns["hespotex"]["params"]["tta"] == "dihedral8"
