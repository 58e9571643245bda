"""Encoders whose features pool inner layers too: the default ``efficientnet_lite0.imagenet.multilayer`` and
``load_encoder(..., layers=)``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hespotex as hx
from hespotex.pp._encoder_base import DEFAULT_ENCODER, EFFICIENTNET_LITE0_IMAGENET
from hespotex.pp._encoders import load_encoder
from hespotex.pp._layer_pool import LITE0_LAYERS


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_default_encoder_is_the_head_after_the_means_of_four_stages(batch):
    enc = load_encoder()
    plain = load_encoder(EFFICIENTNET_LITE0_IMAGENET)
    assert enc.name == DEFAULT_ENCODER == "efficientnet_lite0.imagenet.multilayer"
    assert enc.num_features == 80 + 112 + 192 + 320 + 1280
    assert enc.encoder_id != plain.encoder_id  # embeddings of the two are cached apart
    feats = enc.encode(batch)
    assert torch.allclose(feats[:, -1280:], plain.encode(batch), atol=1e-5)
    # the stage means, computed here by running the network's blocks by hand
    net = plain.model
    with torch.inference_mode():
        x = net.bn1(net.conv_stem(plain.normalize(batch)))
        means = []
        for i, block in enumerate(net.blocks):
            x = block(x)
            if f"blocks.{i}" in LITE0_LAYERS:
                means.append(x.mean(dim=(2, 3)))
    assert torch.allclose(feats[:, :-1280], torch.cat(means, dim=1), atol=1e-5)
    assert not any(m._forward_hooks for m in enc.model.modules())  # no hook outlives a forward pass


def test_layers_of_another_network_and_bad_names(batch):
    enc = load_encoder("resnet18", layers=["layer2", "layer3"])
    assert enc.num_features == 128 + 256 + 512
    assert "layers" in enc.encoder_id
    other = load_encoder("resnet18", layers=["layer3", "layer2"])
    assert other.encoder_id != enc.encoder_id  # the order is part of the features
    a, b = enc.encode(batch), other.encode(batch)
    assert torch.allclose(a[:, :128], b[:, 256:384]) and torch.allclose(a[:, -512:], b[:, -512:])
    with pytest.raises(ValueError, match=r"no sub-module named \['layer9'\].*Close names"):
        load_encoder("resnet18", layers=["layer9"])
    with pytest.raises(ValueError, match="twice"):
        load_encoder("resnet18", layers=["layer2", "layer2"])
    with pytest.raises(ValueError, match="non-empty list"):
        load_encoder("resnet18", layers="layer2")
    with pytest.raises(ValueError, match="pools its own layers"):
        load_encoder(DEFAULT_ENCODER, layers=["blocks.2"])


def test_an_encoder_given_layers_is_left_as_it_was(batch):
    plain = load_encoder(EFFICIENTNET_LITE0_IMAGENET)
    wrapped = load_encoder(plain, layers=["blocks.5"])
    assert plain.num_features == 1280 and wrapped.num_features == 192 + 1280
    assert plain.encode(batch).shape == (2, 1280)


def test_embed_records_the_default_encoder(sample_factory):
    """``hx.pp.embed`` with no encoder named embeds with the multi-layer default and records its name."""
    sdata = sample_factory(n_spots=12)
    hx.pp.embed(sdata, key_added="X_ml", cache=False)
    table = sdata.tables["table"]
    assert table.obsm["X_ml"].shape[1] == 1984
    assert table.uns["hespotex_embed"]["X_ml"]["encoder"] == DEFAULT_ENCODER
    assert np.isfinite(table.obsm["X_ml"]).all()


def test_gradients_reach_the_pixels_through_the_pooled_layers(batch):
    """``hx.tl.explain`` differentiates the encoder's features by the pixels: the inner stages' means carry
    gradients too (the pooled head alone would give other ones)."""
    enc = load_encoder()
    x = batch[:1].clone().requires_grad_(True)
    feats = enc.model(enc.normalize(x))
    feats[:, :80].sum().backward()  # blocks.3's mean only
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in enc.model.parameters())  # the encoder stays frozen


def test_embedding_runs_the_pooled_network_folded_and_channels_last(batch):
    """``hx.pp.embed`` runs the default encoder as fast as the head alone: BatchNorm folded into the convolutions of
    the network it pools from, channels-last input; the same features up to float rounding."""
    from hespotex.pp._encode import inference_model
    from hespotex.pp._layer_pool import LayerPool

    enc = load_encoder()
    model, fmt = inference_model(enc.model)
    assert fmt == torch.channels_last and isinstance(model, LayerPool) and model is not enc.model
    assert model.layers == enc.model.layers
    assert not any(type(m).__name__ in ("BatchNorm2d", "BatchNormAct2d") for m in model.modules())
    assert any(type(m).__name__ == "BatchNormAct2d" for m in enc.model.modules())  # the encoder itself untouched
    x = enc.normalize(batch)
    with torch.inference_mode():
        want, got = enc.model(x), model(x.contiguous(memory_format=fmt))
    assert torch.allclose(want, got, atol=1e-4, rtol=1e-4)


def test_a_model_on_the_default_encoder_embeds_new_slides_with_it(tmp_path):
    """A model trained on default embeddings records the multi-layer encoder; loaded from disk it embeds a slide
    that has none with that encoder, as ``hx.pp.embed`` would."""
    from hespotex.models import ModelConfig
    from hespotex.tl.model._data import EMBEDDING_KEY

    def section(seed: int, name: str):
        return hx.datasets.synthetic(
            n_spots=60, n_genes=12, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=name
        )

    train = {"a": section(1, "a"), "b": section(2, "b")}
    for sdata in train.values():
        hx.pp.embed(sdata, input_size=32)
    small = {"ae_hidden_dim": 16, "latent_dim": 8, "projection_hidden_dim": 16, "head_hidden_dim": 16}
    config = ModelConfig.preset("hespotex", epochs=2, ae_epochs=2, decoder_heads=2, **small)
    genes = list(train["a"].tables["table"].var_names)
    model = hx.tl.train(train, genes=genes, config=config, seed=0, device="cpu", ensemble=False)
    assert model.embedding["encoder"] == DEFAULT_ENCODER
    loaded = hx.tl.load_model(model.save(tmp_path / "model"))
    new, reference = section(3, "new"), section(3, "new")
    hx.tl.predict(new, loaded)
    hx.pp.embed(reference, input_size=32)
    table = new.tables["table"]
    assert table.uns["hespotex_embed"][EMBEDDING_KEY]["encoder"] == DEFAULT_ENCODER
    np.testing.assert_allclose(
        table.obsm[EMBEDDING_KEY], reference.tables["table"].obsm[EMBEDDING_KEY], rtol=1e-5, atol=1e-5
    )
    assert table.obsm[EMBEDDING_KEY].shape[1] == 1984  # the spot patch alone, the scale the model was trained at


def test_a_model_on_an_encoder_with_layers_remakes_it_from_its_record(tmp_path):
    """``load_encoder(name, layers=...)``: the embedding record names the layers, so a saved model embeds a new slide
    with the same layer-pooled encoder in memory and streamed, and ``explain`` loads it too."""
    from hespotex.models import ModelConfig
    from hespotex.tl.explanation._explain_inputs import load_model_encoder
    from hespotex.tl.model._data import EMBEDDING_KEY

    def section(seed: int, name: str):
        return hx.datasets.synthetic(
            n_spots=60, n_genes=12, seed=seed, program_seed=0, microns_per_pixel=1.0, sample_id=name
        )

    enc = load_encoder(EFFICIENTNET_LITE0_IMAGENET, layers=["blocks.5"], input_size=32)
    train = {"a": section(1, "a"), "b": section(2, "b")}
    for sdata in train.values():
        hx.pp.embed(sdata, encoder=enc)
    assert train["a"].tables["table"].uns["hespotex_embed"][EMBEDDING_KEY]["layers"] == ["blocks.5"]
    small = {"ae_hidden_dim": 16, "latent_dim": 8, "projection_hidden_dim": 16, "head_hidden_dim": 16}
    config = ModelConfig.preset("hespotex", epochs=2, ae_epochs=2, decoder_heads=2, **small)
    genes = list(train["a"].tables["table"].var_names)
    model = hx.tl.train(train, genes=genes, config=config, seed=0, device="cpu", ensemble=False)
    loaded = hx.tl.load_model(model.save(tmp_path / "model"))
    assert loaded.embedding["layers"] == ["blocks.5"]
    assert load_model_encoder(loaded).encoder_id == enc.encoder_id  # explain attributes pixels through the same net
    reference = section(3, "new")
    hx.pp.embed(reference, encoder=enc)
    want = reference.tables["table"].obsm[EMBEDDING_KEY]
    assert want.shape[1] == 192 + 1280
    by_name = section(3, "new")  # hx.pp.embed(name, layers=) makes the same encoder as load_encoder does
    hx.pp.embed(by_name, encoder=EFFICIENTNET_LITE0_IMAGENET, layers=["blocks.5"], input_size=32)
    np.testing.assert_allclose(by_name.tables["table"].obsm[EMBEDDING_KEY], want, rtol=1e-5, atol=1e-5)
    assert by_name.tables["table"].uns["hespotex_embed"][EMBEDDING_KEY]["encoder_id"] == enc.encoder_id
    new = section(3, "new")
    hx.tl.predict(new, loaded)
    table = new.tables["table"]
    assert table.uns["hespotex_embed"][EMBEDDING_KEY]["encoder_id"] == enc.encoder_id
    np.testing.assert_allclose(table.obsm[EMBEDDING_KEY], want, rtol=1e-5, atol=1e-5)
    streamed = hx.tl.predict(section(3, "new"), loaded, out=tmp_path / "streamed.zarr")  # embeds chunk by chunk
    layer = streamed.layers["hespotex"]
    layer = np.asarray(layer.compute() if hasattr(layer, "compute") else layer)
    np.testing.assert_allclose(layer, np.asarray(table.layers["hespotex"]), rtol=1e-4, atol=1e-4)
