"""Zoo encoders: the published training scale of every entry, and centre-crop recipes reproduced on a real slide.

The scale table (:data:`hespotex.pp._encoder_zoo_scale.NATIVE_SCALE`) must cover the installed
registry, each row with a source or explicitly assumed. Entries whose transform is ``Resize(R) ->
CenterCrop(C)`` with ``C < R`` (GigaPath-Flash, built offline with random weights) must show their
network the tensor torchvision's own pipeline makes from the same region of a real scanner file
(``cmu-1-small-region.svs``, read independently with OpenSlide).
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

import hespotex as hx

lazyslide_models = pytest.importorskip("lazyslide_models")
torch = pytest.importorskip("torch")

from hespotex.pp._encoder_zoo import zoo_entries  # noqa: E402
from hespotex.pp._encoder_zoo_load import _random_zoo_model, _transform_spec, load_zoo_encoder  # noqa: E402
from hespotex.pp._encoder_zoo_scale import NATIVE_SCALE, NativeScale  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_threaded")]


def test_every_entry_has_a_scale_with_a_source_or_is_marked_assumed():
    registry = {
        k
        for k, cls in lazyslide_models.MODEL_REGISTRY.items()
        if {t.value for t in (cls.task if isinstance(cls.task, list) else [cls.task])} & {"vision", "multimodal"}
        and hasattr(cls, "encode_image")
    }
    assert set(NATIVE_SCALE) == registry  # one row per image encoder, no stale rows
    df = hx.pp.list_encoders().set_index("name")
    zoo = df[df["source"] == "lazyslide-models"]
    for name, scale in NATIVE_SCALE.items():
        row = zoo.loc[name]
        assert 0.1 <= row["native_mpp"] <= 4 and row["native_mpp"] == scale.mpp, name
        if scale.source is None:
            assert row["mpp_assumed"] and row["mpp_source"].startswith("assumed"), name
        else:  # a citable source: a URL or the zoo's own file
            assert not row["mpp_assumed"] and not row["mpp_source"].startswith("assumed"), name
            assert re.search(r"https?://|lazyslide-models \w+/\w+\.py", row["mpp_source"]), (name, row["mpp_source"])
        assert zoo_entries()[name].mpp_assumed == scale.assumed
    # what the survey found: the H-optimus-0 card and the Prov-GigaPath paper; MADELEINE's CONCH tiles at 10x
    assert "huggingface.co/bioptimus/H-optimus-0" in zoo.loc["h-optimus-0", "mpp_source"]
    assert "s41586-024-07441-w" in zoo.loc["gigapath", "mpp_source"] and zoo.loc["gigapath", "tile_px"] == 256
    assert zoo.loc["conch-madeleine", "native_mpp"] == 1.0 and zoo.loc["conch-madeleine", "magnification"] == "10x"
    assert not zoo.loc[["uni", "uni2", "phikonv2"], "mpp_assumed"].any()
    assert (~zoo["mpp_assumed"]).sum() == sum(s.source is not None for s in NATIVE_SCALE.values()) >= 10


def test_evidence_kind_of_every_row_matches_what_its_source_is():
    """``mpp_evidence`` says what backs a row: the authors, TRIDENT's setting, a fine-tune's base, or nothing."""
    df = hx.pp.list_encoders().set_index("name")
    zoo = df[df["source"] == "lazyslide-models"]
    assert set(zoo["mpp_evidence"]) == {"publication", "toolkit", "derived", "assumed"}
    assert (zoo["mpp_assumed"] == (zoo["mpp_evidence"] == "assumed")).all()
    for name, row in zoo.iterrows():
        scale = NATIVE_SCALE[name]
        if row["mpp_evidence"] == "toolkit":  # TRIDENT's README line, its args, and its mag -> µm/px rule
            match = re.search(
                r"TRIDENT/blob/\w+/README\.md#L\d+\): `--patch_encoder \S+ --patch_size (\d+) --mag (\d+)`",
                row["mpp_source"],
            )
            assert match, (name, row["mpp_source"])
            assert int(match.group(1)) == scale.tile_px and 10 / int(match.group(2)) == scale.mpp, name
        elif row["mpp_evidence"] == "derived":  # a fine-tune: the base model's row, same scale
            base = re.search(r"row '([\w.-]+)'", row["mpp_source"]).group(1)
            assert NATIVE_SCALE[base].evidence == "publication", name
            assert (NATIVE_SCALE[base].mpp, NATIVE_SCALE[base].magnification) == (scale.mpp, scale.magnification)
        elif row["mpp_evidence"] == "assumed":  # what was searched, or why there is no single scale
            assert scale.note and scale.note in row["mpp_source"], name
    with pytest.raises(ValueError, match="kind must be one of"):
        NativeScale(0.5, "20x", "https://example.org", kind="hearsay")
    # what this survey found (see the module docstring): 27 of 48 rows sourced, 21 still assumed
    assert (zoo["mpp_evidence"] == "assumed").sum() == 21
    assert dict(zoo.loc[["ctranspath", "chief"], "native_mpp"]) == {"ctranspath": 1.0, "chief": 1.0}  # 10x
    assert "recommended to first try to extract features at 1.0mpp" in zoo.loc["ctranspath", "mpp_source"]
    assert zoo.loc["gpfm", "native_mpp"] == 0.25 and zoo.loc["gpfm", "tile_px"] == 512
    assert "512*512 (extracted from 40X)" in zoo.loc["gpfm", "mpp_source"]
    assert zoo.loc["conch_v1.5", "tile_px"] == zoo.loc["titan", "tile_px"] == 512
    assert zoo.loc["mascaret", "magnification"] == zoo.loc["midnight", "magnification"]
    for mixed in ("virchow2", "midnight", "musk", "open-midnight", "mascaret"):  # one scale used, and said so
        assert zoo.loc[mixed, "magnification"].startswith("mixed") and "used" in zoo.loc[mixed, "magnification"]


@pytest.mark.parametrize(
    ("name", "field_um"),
    [
        ("uni2", 128.0),  # 256 px at 0.5 µm/px, resized to 224
        ("keep", 128.0),
        ("conch", 256.0),  # 512 px at 0.5 µm/px, resized to 448
        ("conch_v1.5", 256.0),
        ("titan", 256.0),
        ("gpfm", 128.0),  # 512 px at 0.25 µm/px (40x), resized to 224
        ("chief", 256.0),  # 256 px at 1 µm/px (10x), resized to 224
        ("ctranspath", 224.0),  # 1 µm/px at the transform's own 224 px
        ("musk", 192.0),  # 384 px at 0.5 µm/px, the transform's own size
        ("h-optimus-1", 112.0),
        ("hibou-l", 112.0),
    ],
)
def test_sourced_tile_sets_the_field_of_view_through_the_zoos_own_transform(name, field_um):
    """The cut keeps the published field of view whatever size the zoo's transform resizes to (read from the zoo)."""
    from hespotex.pp._encoder_zoo import zoo_entry
    from hespotex.pp._encoder_zoo_load import _scale_record

    if name == "uni2":  # its transform needs the built model: built offline on the meta device
        spec = _transform_spec(_random_zoo_model(name, device="meta")[0])
    else:  # the zoo's get_transform reads no weights
        spec = _transform_spec(object.__new__(lazyslide_models.MODEL_REGISTRY[name]))
    entry = zoo_entry(name)
    record = _scale_record(entry, resize=spec["resize"], crop=None)
    native_mpp = record.get("native_mpp", entry.native_mpp)  # µm/px of the image the transform resizes to
    assert spec["resize"] * native_mpp == pytest.approx(field_um)
    if entry.tile_px not in (None, spec["resize"]):
        assert record["tile_px"] == entry.tile_px and record["tile_mpp"] == entry.native_mpp


@pytest.mark.parametrize(("name", "resize", "crop"), [("gigapath-flash", 256, 224), ("uni", 224, None)])
def test_encoder_input_is_the_resize_side_and_the_crop_is_recorded(name, resize, crop):
    zoo_model, _ = _random_zoo_model(name, device="meta")
    spec = _transform_spec(zoo_model)
    assert spec["resize"] == resize and spec["input_size"] == (crop or resize)
    if name != "gigapath-flash":
        return
    zoo_model, _ = _random_zoo_model(name, seed=0)
    enc = load_zoo_encoder(name, _zoo_model=zoo_model)
    assert enc.input_size == 256 and enc.entry["resize"] == 256 and enc.entry["center_crop"] == 224
    assert enc.entry["native_mpp"] == 0.5 and enc.entry["mpp_assumed"]
    seen = []
    hook = zoo_model.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
        enc.encode(x)
    finally:
        hook.remove()
    assert tuple(seen[0].shape) == (2, 3, 224, 224)
    assert torch.allclose(seen[0], enc.normalize(x)[:, :, 16:240, 16:240])  # the centre 224 of the 256 px input
    with pytest.raises(ValueError, match="must be at least 224"):
        load_zoo_encoder(name, _zoo_model=zoo_model, input_size=200)


def test_tile_rescaled_to_the_transform_input_sets_the_cut():
    """MADELEINE's CONCH tiles are 256 px at 10x resized to 224: the cut keeps that field of view (256 µm)."""
    from hespotex.pp._encoder_zoo import zoo_entry
    from hespotex.pp._encoder_zoo_load import _scale_record

    record = _scale_record(zoo_entry("conch-madeleine"), resize=224, crop=None)
    assert record["native_mpp"] == pytest.approx(256 / 224) and record["tile_px"] == 256 and record["tile_mpp"] == 1.0
    assert 224 * record["native_mpp"] == pytest.approx(256.0)  # what embed cuts by default, in µm
    assert "native_mpp" not in _scale_record(zoo_entry("gigapath"), resize=256, crop=224)  # 256 px tiles already


@pytest.mark.realdata
@pytest.mark.parametrize("patch_um", [None, 200.0])
def test_centre_crop_entry_sees_what_torchvision_pipeline_makes_of_the_same_slide_region(
    patch_um, shared_data, tmp_path
):
    """GigaPath-Flash (Resize 256 bicubic -> CenterCrop 224): hespotex's network input against the zoo's own
    torchvision transform applied to the same region read by OpenSlide."""
    openslide = pytest.importorskip("openslide")
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import Compose

    from hespotex.pp._patches import plan_patches, resize_batch

    path = shared_data / "wsi" / "cmu-1-small-region.svs"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    zoo_model, _ = _random_zoo_model("gigapath-flash", seed=0)
    ckpt = tmp_path / "pytorch_model.bin"
    torch.save(zoo_model.model.state_dict(), ckpt)
    sdata = hx.io.read_wsi(path)
    hx.pp.tile(sdata, spot_diameter_um=55.0, spacing_um=350.0, layout="grid")
    hx.pp.embed(sdata, encoder="gigapath-flash", weights=ckpt, patch_um=patch_um, batch_size=8)
    record = sdata.tables["table"].uns["hespotex_embed"]["X_hespotex_image"]
    expected_um = 256 * 0.5 if patch_um is None else patch_um  # default: the published 256 px tile at 0.5 µm/px
    assert record["patch_um"] == pytest.approx(expected_um) and record["input_size"] == 256
    assert record["encoder_entry"]["center_crop"] == 224

    # the same patches as embed read them, through the encoder, capturing what reaches the network
    enc = load_zoo_encoder("gigapath-flash", _zoo_model=zoo_model)
    plan = plan_patches(sdata, patch_um=record["patch_um"], out_px=enc.input_size)
    assert plan.size == record["crop_px"] and plan.level.level == 0
    h, w = plan.level.shape  # patches wholly inside (OpenSlide pads outside with black, hespotex with white)
    idx = np.flatnonzero((plan.x0 >= 0) & (plan.y0 >= 0) & (plan.x0 + plan.size <= w) & (plan.y0 + plan.size <= h))
    assert len(idx) >= 3
    seen = []
    hook = zoo_model.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        feats = enc.encode(resize_batch(plan.read(idx), enc.input_size))
    finally:
        hook.remove()
    ours = seen[0]
    assert np.allclose(feats.numpy(), sdata.tables["table"].obsm["X_hespotex_image"][idx], atol=1e-4)  # embed's path

    transform = zoo_model.get_transform()  # the zoo's: Resize(256, bicubic) -> CenterCrop(224) -> Normalize
    assert [type(t).__name__ for t in transform.transforms][2:4] == ["Resize", "CenterCrop"]
    with openslide.OpenSlide(str(path)) as slide:
        regions = [
            Image.fromarray(
                np.asarray(slide.read_region((int(plan.x0[i]), int(plan.y0[i])), 0, (plan.size,) * 2))[..., :3]
            )
            for i in idx
        ]
    theirs = torch.stack([transform(r) for r in regions])
    assert theirs.shape == ours.shape == (len(idx), 3, 224, 224)
    # same recipe with hespotex's (bilinear) resampling: the same tensor, so field of view, resize and crop agree
    bilinear = copy.deepcopy(transform)
    bilinear.transforms[2].interpolation = InterpolationMode.BILINEAR
    assert torch.allclose(ours, torch.stack([bilinear(r) for r in regions]), atol=1e-4)
    # against the zoo's bicubic resize only interpolation differences remain; without the centre crop (the whole
    # patch resized to the network input, as before) the tensors are far apart
    to_tensor, normalize = Compose(transform.transforms[:2]), transform.transforms[-1]
    uncropped = torch.stack([normalize(to_tensor(r.resize((224, 224), Image.Resampling.BICUBIC))) for r in regions])
    diff, control = (ours - theirs).abs().mean().item(), (uncropped - theirs).abs().mean().item()
    assert diff < 0.05 and diff < control / 4, (diff, control)


def test_embed_cuts_at_the_tables_scale(sample_factory, tmp_path, monkeypatch):
    """The default patch is the table's µm/px times the encoder input: change the row, the cut follows."""
    from hespotex.pp import _encoder_zoo_scale
    from hespotex.pp._encoder_zoo_scale import NativeScale

    zoo_model, _ = _random_zoo_model("gigapath-flash", seed=2)
    ckpt = tmp_path / "pytorch_model.bin"
    torch.save(zoo_model.model.state_dict(), ckpt)
    cuts = {}
    for mpp in (0.5, 0.25):
        row = NativeScale(mpp, "test", f"https://example.org/card-{mpp}")
        monkeypatch.setitem(_encoder_zoo_scale.NATIVE_SCALE, "gigapath-flash", row)
        sdata = sample_factory(n_spots=12, seed=0, sample_id="S0")
        hx.pp.embed(sdata, encoder="gigapath-flash", weights=ckpt)
        record = sdata.tables["table"].uns["hespotex_embed"]["X_hespotex_image"]
        assert record["encoder_entry"]["native_mpp"] == mpp and not record["encoder_entry"]["mpp_assumed"]
        assert record["patch_um"] == pytest.approx(256 * mpp) and record["mpp"] == pytest.approx(mpp)
        cuts[mpp] = record["crop_px"]
    assert cuts == {0.5: 256, 0.25: 128}  # the synthetic slide is 0.5 µm/px
    assert (
        hx.pp.list_encoders().set_index("name").loc["gigapath-flash", "mpp_source"] == "https://example.org/card-0.25"
    )
