"""A model named by object, folder or Hugging Face Hub id, and the model card that ``save`` writes (issue 11, item 3).

The Hub cache is built the way huggingface_hub lays it out (``models--owner--name/blobs``, ``snapshots/<commit>``
symlinks into the blobs, ``refs/<branch or tag>``) and checked with :func:`huggingface_hub.scan_cache_dir`; the
loads then go through the real :func:`huggingface_hub.snapshot_download`, offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard, constants, scan_cache_dir
from huggingface_hub.utils import filter_repo_objects
from model_configs import SMALL

import hespotex as hx
from hespotex import _ownership
from hespotex.models import ModelConfig
from hespotex.tl.model._card import card_edited
from hespotex.tl.model._resolve import HUB_FILES, as_model, model_folder

pytestmark = pytest.mark.usefixtures("single_threaded")

COMMIT_A = "a" * 39 + "1"
COMMIT_B = "b" * 39 + "2"


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


def _train(sections, names, *, seed=0, **kwargs):
    config = ModelConfig.preset("hespotex", epochs=4, patience=None, **SMALL)
    genes = list(sections["a"].tables["table"].var_names)
    return hx.tl.train([sections[n] for n in names], genes=genes, config=config, seed=seed, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def model(sections):
    return _train(sections, "ab")  # two samples: a spatial block of each is held out for validation


@pytest.fixture(scope="module")
def other(sections):
    return _train(sections, "abc", seed=1, ensemble=False)  # three samples, one model: one whole sample held out


@pytest.fixture(scope="module")
def ensemble(sections):
    return _train(sections, "abc", ensemble=1)  # one member per held-out sample: 3


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test, offline."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_snapshot(cache: Path, repo_id: str, folder: Path, commit: str, *, refs=("main",)) -> Path:
    """Put ``folder`` (a saved model) into ``cache`` as huggingface_hub stores a download of ``repo_id`` at
    ``commit``: content-addressed blobs, the snapshot's files as relative symlinks to them, refs naming the commit.
    Only the files a hespotex download fetches (:data:`HUB_FILES`) are stored, as the real download would."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    for rel in filter_repo_objects(files, allow_patterns=HUB_FILES):
        data = (folder / rel).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return storage / "snapshots" / commit


def _layer(table, model) -> np.ndarray:
    return np.asarray(hx.tl.predict(table.copy(), model, device="cpu").layers["hespotex"])


# ---------------------------------------------------------------------------------------------- hub ids


def test_offline_hub_id_with_empty_cache_is_a_clear_error(hub_cache, sections):
    table = sections["t"].tables["table"].copy()
    with pytest.raises(FileNotFoundError) as err:
        hx.tl.predict(table, "hf-hub:my-lab/hespotex-her2st", device="cpu")
    msg = str(err.value)
    assert "'hf-hub:my-lab/hespotex-her2st'" in msg and "revision 'main'" in msg
    assert "offline (HF_HUB_OFFLINE=1)" in msg and "not in the local cache" in msg and str(hub_cache) in msg
    assert "`hf auth login`" in msg and "`huggingface-cli login`" in msg
    assert "hf download my-lab/hespotex-her2st --local-dir my-model" in msg and "pass that folder" in msg
    assert "hespotex" not in table.layers  # nothing written
    with pytest.raises(FileNotFoundError, match=r"revision 'v2'.*--revision v2"):
        hx.tl.load_model("hf-hub:my-lab/hespotex-her2st@v2")
    with pytest.raises(ValueError, match="Expected a Hugging Face Hub model id 'hf-hub:owner/name'"):
        as_model("hf-hub:just-a-name")


def test_no_network_falls_back_to_the_cache_or_says_so(hub_cache, monkeypatch, model, tmp_path):
    """Online mode with the Hub unreachable (a closed local port as endpoint): the cache is used, else a clear error."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match=r"could not be reached \(no network\?\).*hf download o/n --local-dir"):
        as_model("hf-hub:o/n")
    cache_snapshot(hub_cache, "o/n", model.save(tmp_path / "m"), COMMIT_A)
    assert as_model("hf-hub:o/n").model_id == model.model_id


def test_hub_cache_load_predicts_like_the_original(hub_cache, sections, model, tmp_path):
    folder = model.save(tmp_path / "my-model")
    snapshot = cache_snapshot(hub_cache, "my-lab/hespotex-small", folder, COMMIT_A)
    info = scan_cache_dir(hub_cache)  # huggingface_hub recognises the layout
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "my-lab/hespotex-small" and [r.commit_hash for r in repo.revisions] == [COMMIT_A]
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "model.safetensors", "setup.json"]  # no marker
    assert model_folder("hf-hub:my-lab/hespotex-small") == snapshot
    table = sections["t"].tables["table"]
    out = hx.tl.predict(table.copy(), "hf-hub:my-lab/hespotex-small", device="cpu")
    np.testing.assert_array_equal(np.asarray(out.layers["hespotex"]), _layer(table, model))
    assert out.uns["hespotex"]["params"]["model_id"] == model.model_id


def test_revision_pinning(hub_cache, model, other, tmp_path):
    cache_snapshot(hub_cache, "o/n", model.save(tmp_path / "v1"), COMMIT_A, refs=("v1",))
    cache_snapshot(hub_cache, "o/n", other.save(tmp_path / "v2"), COMMIT_B, refs=("main",))
    assert model.model_id != other.model_id
    assert as_model("hf-hub:o/n").model_id == other.model_id  # main
    assert as_model("hf-hub:o/n@main").model_id == other.model_id
    assert as_model("hf-hub:o/n@v1").model_id == model.model_id  # a tag
    assert as_model(f"hf-hub:o/n@{COMMIT_A}").model_id == model.model_id  # a commit
    with pytest.raises(FileNotFoundError, match=r"revision 'v3'"):
        as_model("hf-hub:o/n@v3")


def test_folder_and_object_inputs(model, ensemble, tmp_path):
    assert as_model(model) is model and as_model(ensemble) is ensemble
    folder = model.save(tmp_path / "m")
    for name in (folder, str(folder)):
        assert type(as_model(name)) is hx.tl.HESpotEx and as_model(name).model_id == model.model_id
        assert hx.tl.load_model(name).model_id == model.model_id
    ens = as_model(ensemble.save(tmp_path / "e"))
    assert isinstance(ens, hx.tl.HESpotExEnsemble) and ens.model_id == ensemble.model_id
    with pytest.raises(
        FileNotFoundError, match=r"found 'my-lab/model', which is not there\. .*write 'hf-hub:my-lab/model'"
    ):
        as_model("my-lab/model")
    with pytest.raises(TypeError, match="found a dict"):
        as_model({"genes": []})


def test_cli_predict_takes_a_hub_id(hub_cache, tmp_path, caplog):
    from hespotex.cli import main

    slide = tmp_path / "slide.tif"
    slide.write_bytes(b"")
    with caplog.at_level(logging.ERROR, logger="hespotex"):
        code = main(["predict", "--model", "hf-hub:o/missing", "--out", str(tmp_path / "out"), str(slide)])
    assert code != 0 and "Cannot load the model 'hf-hub:o/missing'" in caplog.text and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- model card


def _card(folder: Path):
    card = ModelCard.load(folder / "README.md")
    return card, card.data.to_dict()


def test_model_card_content(model, sections, tmp_path):
    folder = model.save(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == [
        ".hespotex.json",
        "README.md",
        "model.safetensors",
        "setup.json",
    ]
    assert _ownership.owned(folder, "model") and not card_edited(folder)
    card, data = _card(folder)
    assert (
        data["library_name"] == "hespotex" and "hespotex" in data["tags"] and "spatial-transcriptomics" in data["tags"]
    )
    rec = data["hespotex"]
    assert rec["genes"] == model.genes and rec["n_genes"] == 10 and rec["model_id"] == model.model_id
    emb = model.embedding
    assert rec["encoder"] == "efficientnet_lite0.imagenet" == emb["encoder"] and rec["encoder_id"] == emb["encoder_id"]
    assert rec["patch_um"] == emb["patch_um"] and rec["patch_px"] == emb["crop_px"] and rec["encoder_input_px"] == 32
    assert "pretrained weights" in rec["encoder_weights"]
    assert rec["target_norm"] == model.target_norm and rec["embedding_norm"] == model.embedding_norm
    assert rec["hespotex_version"] == hx.__version__
    # training data: every spot of both samples, split into training and validation spots
    n = {s: sections[s[1]].tables["table"].n_obs for s in ("sa", "sb")}
    assert set(rec["training_data"]) == {"sa", "sb"}
    for s, counts in rec["training_data"].items():
        assert counts["train_spots"] + counts["validation_spots"] == n[s] and counts["validation_spots"] > 0
    # validation: the best score of the history, i.e. the epoch whose weights training kept
    scores = [h["validation"] for h in model.history_]
    (val,) = rec["validation"]
    assert val["metric"] == "mean per-gene Pearson" and val["score"] == round(max(scores), 4)
    assert val["epoch"] == model.history_[int(np.argmax(scores))]["epoch"] and val["epochs"] == len(scores)
    text = card.text
    assert 'hx.tl.predict(adata, "hf-hub:' in text and "## Genes" in text and "## Training data" in text
    assert f"{val['score']:.4f}" in text and f"{emb['patch_um']} µm ({emb['crop_px']} px" in text
    assert "| sa |" in text and all(f"`{g}`" in text for g in model.genes)


def test_card_survives_a_save_load_save_round_trip(model, tmp_path):
    first = model.save(tmp_path / "one")
    loaded = hx.tl.load_model(first)
    assert loaded.training_data_ == model.training_data_ and loaded.history_ == model.history_
    second = loaded.save(tmp_path / "two")
    assert (first / "README.md").read_text() == (second / "README.md").read_text()
    assert _card(second)[1]["hespotex"]["validation"] == _card(first)[1]["hespotex"]["validation"]


def test_an_edited_card_is_never_silently_overwritten(model, other, tmp_path, caplog):
    folder = model.save(tmp_path / "m")
    generated = (folder / "README.md").read_text()
    model.save(folder, overwrite=True)  # an untouched card is simply written again
    assert (folder / "README.md").read_text() == generated
    edited = generated.replace("# HESpotEx:", "# Our lab's breast cancer model\n\nUse with care.\n\n# HESpotEx:")
    (folder / "README.md").write_text(edited)
    assert card_edited(folder)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save(folder)
    assert (folder / "README.md").read_text() == edited
    with caplog.at_level(logging.WARNING, logger="hespotex"):
        other.save(folder, overwrite=True)  # the model is replaced, the user's card is kept
    assert hx.tl.load_model(folder).model_id == other.model_id
    assert (folder / "README.md").read_text() == edited and "Kept the edited README.md" in caplog.text
    assert _ownership.owned(folder, "model")
    (folder / "README.md").unlink()  # deleting it lets the next save write a fresh card
    other.save(folder, overwrite=True)
    assert not card_edited(folder) and _card(folder)[1]["hespotex"]["model_id"] == other.model_id
    # a card written by someone else entirely (no signature) counts as edited too
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    assert card_edited(folder)


def test_ensemble_card(ensemble, hub_cache, sections, tmp_path):
    folder = ensemble.save(tmp_path / "ens")
    _, data = _card(folder)
    rec = data["hespotex"]
    assert rec["ensemble_members"] == 3 and rec["model_id"] == ensemble.model_id and rec["genes"] == ensemble.genes
    assert [v["member"] for v in rec["validation"]] == [0, 1, 2]
    assert sorted(v["samples"][0] for v in rec["validation"]) == ["sa", "sb", "sc"]
    for v, m in zip(rec["validation"], ensemble.members, strict=True):
        assert v["score"] == round(max(h["validation"] for h in m.history_), 4)
    n = {f"s{k}": sections[k].tables["table"].n_obs for k in "abc"}
    assert rec["training_data"] == {s: {"train_spots": n[s], "validation_spots": n[s]} for s in n}
    assert all((folder / f"member_{i}" / "README.md").is_file() for i in range(3))
    # an ensemble from the Hub cache predicts like the original
    cache_snapshot(hub_cache, "o/ens", folder, COMMIT_A)
    table = sections["t"].tables["table"]
    np.testing.assert_array_equal(_layer(table, "hf-hub:o/ens"), _layer(table, ensemble))


def test_setup_without_training_data_still_loads(model, tmp_path):
    folder = model.save(tmp_path / "m")
    setup = json.loads((folder / "setup.json").read_text())
    assert setup["training_data"] == model.training_data_
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    del setup["training_data"]  # a model saved before the record
    (old / "setup.json").write_text(json.dumps(setup))
    loaded = hx.tl.load_model(old)
    assert loaded.training_data_ == {} and "spot counts not recorded" in hx.tl.model_card(loaded).text
    assert loaded.model_id == model.model_id  # the record is not part of the fingerprint: old predictions still match
    setup["training_data"] = {"sa": {"train_spots": -1, "validation_spots": 0}}
    (old / "setup.json").write_text(json.dumps(setup))
    with pytest.raises(ValueError, match="non-negative spot counts per sample"):
        hx.tl.load_model(old)


def test_config_saved_before_ae_samples_loads_as_trained_with_its_fingerprint(model, tmp_path):
    """A model saved before ``ModelConfig.ae_samples`` existed pre-trained its autoencoder on the training spots: it
    loads with ``"training"`` (not today's default ``"all"``), and its fingerprint is the one it had then."""
    folder = model.save(tmp_path / "m")
    setup = json.loads((folder / "setup.json").read_text())
    assert setup["config"]["ae_samples"] == "all"  # today's default, recorded
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    del setup["config"]["ae_samples"]
    (old / "setup.json").write_text(json.dumps(setup))
    loaded = hx.tl.load_model(old)
    assert loaded.config.ae_samples == "training"
    # the fingerprint leaves a field at its old value out: "training" written or missing hash alike (so a model saved
    # before the field existed keeps the id its predictions record); today's "all" is part of it
    explicit = tmp_path / "explicit"
    shutil.copytree(folder, explicit)
    setup["config"]["ae_samples"] = "training"
    (explicit / "setup.json").write_text(json.dumps(setup))
    assert hx.tl.load_model(explicit).model_id == loaded.model_id != model.model_id
    assert hx.tl.load_model(folder).model_id == model.model_id


def test_tile_explain_and_cli_take_a_hub_id(hub_cache, model, sections, tmp_path):
    """The other places a model is taken: pp.tile's geometry, tl.explain, and `hespotex predict --model hf-hub:...`."""
    import spatialdata

    from hespotex.cli import main

    folder = model.save(tmp_path / "m")
    cache_snapshot(hub_cache, "o/n", folder, COMMIT_A)
    wsi = hx.datasets.synthetic_wsi(
        tmp_path / "s.ome.tif", width=900, height=700, n_blobs=3, microns_per_pixel=1.0, seed=3
    )
    tiled = {}
    for name in ("hf-hub:o/n", folder):
        sdata = hx.io.read_wsi(wsi)
        hx.pp.detect_tissue(sdata)
        tiled[str(name)] = hx.pp.tile(sdata, model=name).obsm["spatial"]
    np.testing.assert_array_equal(*tiled.values())
    assert len(tiled["hf-hub:o/n"]) > 0
    genes = model.genes[:2]
    via_hub = hx.tl.explain(sections["t"], "hf-hub:o/n", genes=genes, pixels=False, n_spots=2, n_steps=4, device="cpu")
    direct = hx.tl.explain(sections["t"], model, genes=genes, pixels=False, n_spots=2, n_steps=4, device="cpu")
    assert via_hub.spots == direct.spots
    np.testing.assert_allclose(via_hub.score, direct.score, rtol=1e-6)
    assert main(["predict", "--model", "hf-hub:o/n", "--out", str(tmp_path / "out"), str(wsi)]) == 0
    table = spatialdata.read_zarr(tmp_path / "out" / "s.zarr").tables["hespotex"]
    assert table.uns["hespotex"]["params"]["model_id"] == model.model_id and table.n_obs == len(tiled["hf-hub:o/n"])


def test_predict_slides_takes_a_hub_id(hub_cache, model, tmp_path):
    import spatialdata
    from distributed import Client

    cache_snapshot(hub_cache, "o/n", model.save(tmp_path / "m"), COMMIT_A)
    wsi = hx.datasets.synthetic_wsi(
        tmp_path / "s.ome.tif", width=900, height=700, n_blobs=3, microns_per_pixel=1.0, seed=3
    )
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        table = hx.tl.predict_slides([wsi], "hf-hub:o/n", out=tmp_path / "out", client=client, progress=False)
    assert list(table["status"]) == ["finished"], table["error"].tolist()
    pred = spatialdata.read_zarr(tmp_path / "out" / "s.zarr").tables["hespotex"]
    assert pred.uns["hespotex"]["params"]["model_id"] == model.model_id and pred.n_obs == table["n_tiles"].iloc[0]
