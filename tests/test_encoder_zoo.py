"""Pathology foundation encoders from LazySlide's zoo (lazyslide-models), offline.

Every image-encoder entry of the installed zoo is tested: its metadata, and either its network
built by the zoo's own constructor with random weights or the clear error saying what it needs.

Size rule: networks are built on torch's ``meta`` device (shapes, no memory, ~1 s even for ViT-g)
to check the architecture (parameter count against the zoo's ``param_size``) and the output width.
Real random weights, saved in the hub's file layout and loaded back through the local-file path,
are used for entries of at most 100 M parameters (GigaPath-Flash, 21.7 M; the Lunit ViT-S/16 hub
folder); the ViT-L/H/g entries (UNI 303 M, CROWN 304 M, CRISP 631 M, UNI2-h 681 M) would write and
read 1.2-2.7 GB files on a shared CPU, so only their meta builds run.
"""

from __future__ import annotations

import numpy as np
import pytest

import hespotex as hx

lazyslide_models = pytest.importorskip("lazyslide_models")
torch = pytest.importorskip("torch")

from hespotex.pp._encoder_zoo import EncoderUnavailableError, zoo_entries  # noqa: E402
from hespotex.pp._encoder_zoo_load import _random_zoo_model, load_zoo_encoder  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("single_threaded"),
    pytest.mark.filterwarnings("ignore:As from v0.8.2:UserWarning"),  # CONCH / PLIP / OmiCLIP notices
]


def _zoo_encoder_names() -> list[str]:
    """Image encoders of the registry, found independently of hespotex's filter."""
    out = []
    for key, cls in lazyslide_models.MODEL_REGISTRY.items():
        tasks = cls.task if isinstance(cls.task, list) else [cls.task]
        if {t.value for t in tasks} & {"vision", "multimodal"} and hasattr(cls, "encode_image"):
            out.append(key)
    return out


ZOO = _zoo_encoder_names()
# Entries whose zoo constructor builds the network from code before touching the hub (documented:
# the others need hub config or code, or a package, and say so).
BUILT_OFFLINE = {"uni", "uni2", "gigapath-flash", "crown", "crisp"}
NEEDS_PACKAGE = {  # entry -> the package its constructor imports
    **dict.fromkeys(["biomedclip", "omiclip", "quiltnet-b32", "quiltnet-b16", "quiltnet-b16-pmb"], "open_clip"),
    **dict.fromkeys(["conch", "conch-madeleine"], "Conch"),
    "musk": "MUSK",
    **dict.fromkeys(["hibou-b", "hibou-l"], "transformers < 5.0"),
}


def test_list_encoders_shows_every_zoo_entry_beside_the_builtin():
    df = hx.pp.list_encoders()
    zoo = df[df["source"] == "lazyslide-models"].set_index("name")
    assert sorted(zoo.index) == sorted(ZOO)
    # the encoders the field uses are all there
    assert {
        "uni",
        "uni2",
        "conch",
        "virchow2",
        "h-optimus-0",
        "h-optimus-1",
        "gigapath",
        "phikonv2",
        "ctranspath",
    } <= set(zoo.index)
    for key in ZOO:
        cls = lazyslide_models.MODEL_REGISTRY[key]
        width = zoo.loc[key, "output_width"]
        assert (cls.encode_dim is None and np.isnan(width)) or width == cls.encode_dim, key
        assert zoo.loc[key, "gated"] == bool(cls.is_gated)
        assert zoo.loc[key, "native_mpp"] > 0 and zoo.loc[key, "mpp_source"]  # sources: test_encoder_zoo_scale.py
    assert zoo.loc["uni2", "hub_id"] == "MahmoodLab/UNI2-h" and zoo.loc["uni2", "gated"]
    assert zoo.loc["h-optimus-0", "hub_id"] == "bioptimus/H-optimus-0" and not zoo.loc["h-optimus-0", "gated"]
    assert "model card" in zoo.loc["h-optimus-0", "mpp_source"] and not zoo.loc["h-optimus-0", "mpp_assumed"]
    assert zoo.loc["h-optimus-0", "licence"] == "Apache 2.0" and zoo.loc["uni", "licence"] == "CC-BY-NC-ND-4.0"
    assert not zoo["weights_offline"].any()  # the test machine has no hub cache
    builtin = df[df["source"] == "hespotex"].set_index("name")
    assert list(builtin.index) == ["efficientnet_lite0.imagenet.multilayer", "efficientnet_lite0.imagenet"]
    assert builtin["weights_offline"].all() and list(builtin["output_width"]) == [1984, 1280]
    for name, row in builtin.iterrows():  # the listed width is what the encoder outputs
        assert hx.pp.load_encoder(name).num_features == row["output_width"]

    timm_rows = hx.pp.list_encoders(timm="resnet50.a1*")
    assert set(timm_rows.loc[timm_rows["source"] == "timm", "name"]) == {"resnet50.a1_in1k", "resnet50.a1h_in1k"}


def test_weights_offline_reads_the_huggingface_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--bioptimus--H-optimus-0" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    df = hx.pp.list_encoders().set_index("name")
    assert df.loc["h-optimus-0", "weights_offline"] and not df.loc["h-optimus-1", "weights_offline"]


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_entry_builds_offline_or_says_what_it_needs(name):
    entry = zoo_entries()[name]
    cls = lazyslide_models.MODEL_REGISTRY[name]
    assert entry.output_width == cls.encode_dim and entry.licence and entry.version == lazyslide_models.__version__
    if name not in BUILT_OFFLINE:
        need = NEEDS_PACKAGE.get(name, "huggingface_hub cache")
        with pytest.raises(EncoderUnavailableError, match="cannot be built offline") as err:
            _random_zoo_model(name, device="meta")
        assert need in str(err.value)
        if name not in NEEDS_PACKAGE and entry.hub_id:
            assert f"hf download {entry.hub_id}" in str(err.value)
        return
    zoo_model, built = _random_zoo_model(name, device="meta")
    n_params = sum(p.numel() for p in zoo_model.model.parameters())
    if entry.n_params is not None:  # the recipe is the published architecture
        assert abs(n_params - entry.n_params) / entry.n_params < 0.005, (n_params, entry.param_size)
    out = zoo_model.encode_image(torch.zeros(2, 3, 224, 224, device="meta"))
    assert tuple(out.shape) == (2, entry.output_width)
    assert built[0][0].startswith("vit_")  # a timm architecture named in the zoo's code, no hub config


@pytest.mark.parametrize("name", sorted(BUILT_OFFLINE))
def test_preprocessing_is_the_zoos_transform(name):
    """The Encoder normalises like the zoo's own transform (a 224 px tile in, no crop: same tensor; the crop
    recipes are checked against torchvision on a real slide in test_encoder_zoo_scale.py)."""
    from hespotex.pp._encoder_zoo_load import _transform_spec

    zoo_model, _ = _random_zoo_model(name, device="meta")
    spec = _transform_spec(zoo_model)
    assert spec["input_size"] == 224 and not spec["raw_input"]
    crop_pct = {"gigapath-flash": 0.875}.get(name, 1.0)  # GigaPath's recipe: Resize(256) -> CenterCrop(224)
    assert spec["resize"] == int(224 / crop_pct)
    assert np.allclose(spec["mean"], (0.485, 0.456, 0.406)) and np.allclose(spec["std"], (0.229, 0.224, 0.225))
    if crop_pct == 1.0:
        rng = np.random.default_rng(0)
        tile = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        theirs = zoo_model.get_transform()(tile)
        x = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
        mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
        assert torch.allclose((x - mean) / std, theirs[None], atol=1e-5)


@pytest.fixture(scope="module")
def flash_checkpoint(tmp_path_factory):
    """GigaPath-Flash with random weights, saved as the hub stores it (timm state dict, pytorch_model.bin)."""
    zoo_model, _ = _random_zoo_model("gigapath-flash", seed=1)
    folder = tmp_path_factory.mktemp("prov-gigapath-flash")
    torch.save(zoo_model.model.state_dict(), folder / "pytorch_model.bin")
    return zoo_model, folder / "pytorch_model.bin"


def test_hub_layout_checkpoint_loads_through_the_local_file_path(flash_checkpoint):
    zoo_model, path = flash_checkpoint
    enc = hx.pp.load_encoder("gigapath-flash", weights=path)
    # Resize 256 -> CenterCrop 224: patches come in at 256 px, the network sees their centre 224
    assert enc.num_features == 384 and enc.input_size == 256 and enc.entry["name"] == "gigapath-flash"
    assert enc.entry["source"] == "lazyslide-models" and enc.entry["native_mpp"] == 0.5
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    centre = enc.normalize(x)[:, :, 16:240, 16:240]
    assert torch.allclose(enc.encode(x), zoo_model.encode_image(centre), atol=1e-5)
    assert not any(p.requires_grad for p in enc.model.parameters())
    # the folder holding the file is the same weights, and the prefix names the zoo explicitly
    again = hx.pp.load_encoder("lazyslide:gigapath-flash", weights=path.parent)
    assert again.encoder_id == enc.encoder_id and "lsm" in enc.encoder_id
    other = hx.pp.load_encoder("gigapath-flash", weights=path, input_size=256)
    assert other.encoder_id == enc.encoder_id


def test_a_checkpoint_of_another_architecture_is_refused(flash_checkpoint):
    _, path = flash_checkpoint
    with pytest.raises(ValueError, match="does not fit 'crown'"):
        hx.pp.load_encoder("crown", weights=path)
    with pytest.raises(FileNotFoundError, match="not found"):
        hx.pp.load_encoder("uni", weights=path.parent / "absent.bin")


def test_hub_folder_of_a_timm_entry_loads_through_local_dir(tmp_path):
    """Lunit's ViT-S/16 repo is a timm hub repo: config.json + model.safetensors, written here by timm."""
    import timm
    from lazyslide_models.vision.lunit import LUNIT_MEAN, LUNIT_STD

    torch.manual_seed(3)
    net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    timm.models.save_for_hf(net, tmp_path, safe_serialization=True)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    enc = hx.pp.load_encoder("lunit-dino-s16", weights=tmp_path)
    assert enc.num_features == 384 and np.allclose(enc.mean, LUNIT_MEAN) and np.allclose(enc.std, LUNIT_STD)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.allclose(enc.encode(x), net(enc.normalize(x)), atol=1e-5)
    # a single file is not enough for an entry that builds from the hub config
    with pytest.raises(ValueError, match="folder holding a download"):
        hx.pp.load_encoder("lunit-dino-s16", weights=tmp_path / "model.safetensors")


def test_hub_weights_offline_and_gated_errors_say_what_to_do():
    from huggingface_hub.errors import GatedRepoError

    from hespotex.pp._encoder_zoo import zoo_entry
    from hespotex.pp._encoder_zoo_load import _hub_error

    with pytest.raises(EncoderUnavailableError, match=r"hf download MahmoodLab/UNI2-h") as err:
        hx.pp.load_encoder("uni2")
    assert "huggingface_hub cache" in str(err.value) and "weights=" in str(err.value)
    with pytest.raises(ValueError, match="not an image encoder of lazyslide-models"):
        hx.pp.load_encoder("lazyslide:cellpose")
    # what huggingface_hub raises for a gated repository without access becomes a how-to
    import httpx2

    response = httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co/bioptimus/H-optimus-1"))
    gated = _hub_error(zoo_entry("h-optimus-1"), GatedRepoError("Access restricted", response=response))
    assert "request access at https://huggingface.co/bioptimus/H-optimus-1" in str(gated)
    assert "hf auth login" in str(gated)


def test_random_zoo_model_builds_real_weights_for_small_entries():
    a, _ = _random_zoo_model("gigapath-flash", seed=0)
    b, _ = _random_zoo_model("gigapath-flash", seed=0)
    c, _ = _random_zoo_model("gigapath-flash", seed=1)
    wa, wb, wc = (m.model.patch_embed.proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    enc = load_zoo_encoder("gigapath-flash", _zoo_model=a)
    assert enc.num_features == 384


def test_embed_cuts_at_native_mpp_and_predict_refuses_other_embeddings(flash_checkpoint, tmp_path, sample_factory):
    make_sample = sample_factory
    _, path = flash_checkpoint
    samples = [make_sample(n_spots=30, seed=s, sample_id=f"S{s}") for s in (0, 1)]
    for s in samples:
        hx.pp.embed(s, encoder="gigapath-flash", weights=path)
    record = samples[0].tables["table"].uns["hespotex_embed"]["X_hespotex_image"]
    # the published 256 px tile at 0.5 µm/px, resized to 256 and centre-cropped to 224 in the encoder
    assert record["patch_um"] == pytest.approx(256 * 0.5) and record["mpp"] == pytest.approx(0.5)
    assert record["input_size"] == 256 and record["encoder_entry"]["center_crop"] == 224
    assert (
        record["encoder_entry"]["name"] == "gigapath-flash" and record["encoder_entry"]["source"] == "lazyslide-models"
    )
    assert samples[0].tables["table"].obsm["X_hespotex_image"].shape == (30, 384)

    from hespotex.models import ModelConfig

    tiny = ModelConfig.preset("hespotex", epochs=2, ae_epochs=2, latent_dim=8, ae_hidden_dim=16,
                              projection_hidden_dim=16, head_hidden_dim=16, decoder_heads=1)  # fmt: skip
    genes = [f"g{i}" for i in range(8)]
    model = hx.tl.train(samples, genes=genes, config=tiny, validation=None, seed=0, device="cpu")
    assert model.embedding["encoder_entry"]["name"] == "gigapath-flash"
    model.save(tmp_path / "m")
    loaded = type(model).load(tmp_path / "m")
    assert loaded.embedding["encoder_entry"] == model.embedding["encoder_entry"]

    # a new slide without embeddings is embedded with the model's zoo encoder and predicted
    fresh = make_sample(n_spots=30, seed=2, sample_id="S2")
    hx.tl.predict(fresh, loaded, device="cpu")
    assert (
        fresh.tables["table"].uns["hespotex_embed"]["X_hespotex_image"]["encoder_id"] == model.embedding["encoder_id"]
    )

    # a slide embedded with another encoder is refused, naming both entries
    other = make_sample(n_spots=30, seed=3, sample_id="S3")
    hx.pp.embed(other, encoder="efficientnet_lite0.imagenet", patch_um=112.0, input_size=64)
    with pytest.raises(
        ValueError, match=r"'gigapath-flash' of lazyslide-models .* at 0.5 µm/px, this slide's 'efficientnet"
    ):
        hx.tl.predict(other, loaded, device="cpu")
