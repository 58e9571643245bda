"""Pre-trained autoencoders kept on disk (:mod:`hespotex.tl.training._autoencoder_cache`): a later process reuses
the one pre-trained on the same expression with the same seed (the same model results), a damaged file is pre-trained
again, the folder is trimmed of hespotex's own files only, a folder hespotex did not make is left alone, and a second
process waits for the first one's result instead of computing it too."""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pytest

import hespotex as hx
from hespotex.tl.training import _autoencoder_cache as ae_cache
from hespotex.tl.training import _training

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae_cache")
    hx.datasets.synthetic_visium_hd(
        root / "outs", 400, 12, seed=3, microns_per_pixel=1.0, bin_sizes=(8,), fullres_image=False
    )
    table = hx.io.read_visium_hd(root / "outs", bin_size=8).tables["table"]
    table.obsm["X_hespotex_image"] = np.random.default_rng(0).standard_normal((table.n_obs, 16), dtype=np.float32)
    return table


def _train(table, seed=0):
    from hespotex.models import ModelConfig

    small = {"ae_epochs": 5, "ae_hidden_dim": 16, "latent_dim": 8, "projection_hidden_dim": 16, "head_hidden_dim": 16}
    config = ModelConfig.preset("hespotex", epochs=3, patience=None, **small)
    return hx.tl.train(
        table, genes=list(table.var_names), config=config, seed=seed, device="cpu", validation=0.2, ensemble=False
    )


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.module_.autoencoder.state_dict().items()}


def test_a_new_process_reuses_the_autoencoder_on_disk(table, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hx.settings, "cachedir", tmp_path)
    monkeypatch.setattr(_training, "_AE_CACHE", {})
    first = _train(table)
    files = list((tmp_path / "autoencoders").glob("*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(_training, "_AE_CACHE", {})  # as a new process would start
    with caplog.at_level(logging.INFO, logger="hespotex"):
        again = _train(table)
    assert "cached on disk" in caplog.text
    assert all(np.array_equal(v, _weights(again)[k]) for k, v in _weights(first).items())
    assert again.model_id == first.model_id  # the same model, trained from the same autoencoder
    # another seed is another autoencoder
    monkeypatch.setattr(_training, "_AE_CACHE", {})
    _train(table, seed=1)
    assert len(list((tmp_path / "autoencoders").glob("*.safetensors"))) == 2


def test_a_damaged_file_is_pretrained_again(table, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hx.settings, "cachedir", tmp_path)
    monkeypatch.setattr(_training, "_AE_CACHE", {})
    first = _train(table)
    (path,) = (tmp_path / "autoencoders").glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    monkeypatch.setattr(_training, "_AE_CACHE", {})
    with caplog.at_level(logging.INFO, logger="hespotex"):
        again = _train(table)
    assert "Ignoring the cached autoencoder" in caplog.text and "cached on disk" not in caplog.text
    assert again.model_id == first.model_id  # pre-trained again: the same weights
    assert ae_cache.load(again.module_.autoencoder, path)  # and the file rewritten


def test_trimming_removes_only_hespotex_files(table, tmp_path, monkeypatch):
    monkeypatch.setattr(hx.settings, "cachedir", tmp_path)
    monkeypatch.setattr(ae_cache, "MAX_FILES", 1)
    folder = tmp_path / "autoencoders"
    folder.mkdir()
    (folder / ae_cache.MARKER).write_text("")
    (folder / "mine.safetensors").write_bytes(b"a user's file")  # not a hespotex name: never removed
    stale = folder / f".{'0' * 64}.safetensors.123.tmp"  # left by a process that died while writing
    fresh = folder / f".{'1' * 64}.safetensors.456.tmp"  # being written right now by another process
    stale.write_bytes(b"partial"), fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    for seed in (0, 1):
        monkeypatch.setattr(_training, "_AE_CACHE", {})
        _train(table, seed=seed)
    assert len(list(folder.glob("[0-9a-f]*.safetensors"))) == 1  # the most recent of the two
    assert (folder / "mine.safetensors").read_bytes() == b"a user's file"
    assert not stale.exists() and fresh.exists()


def test_a_folder_hespotex_did_not_make_is_left_alone(table, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hx.settings, "cachedir", tmp_path)
    folder = tmp_path / "autoencoders"  # e.g. HESPOTEX_CACHE pointed at a folder of the user's
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"a user's file")
    monkeypatch.setattr(_training, "_AE_CACHE", {})
    _train(table)
    assert sorted(p.name for p in folder.iterdir()) == ["weights.safetensors"]  # nothing written, nothing removed
    assert ae_cache.cache_dir() is None


def test_a_second_process_waits_for_the_first(tmp_path, monkeypatch):
    """While one holder pre-trains a key, another asking for the same key waits; a different key does not."""
    monkeypatch.setattr(hx.settings, "cachedir", tmp_path)
    entered = {"same": threading.Event(), "other": threading.Event()}

    def ask(key: str, name: str) -> None:
        with ae_cache.locked(key):
            entered[name].set()

    with ae_cache.locked("k1") as path:
        assert path == tmp_path / "autoencoders" / "k1.safetensors"
        same = threading.Thread(target=ask, args=("k1", "same"))
        other = threading.Thread(target=ask, args=("k2", "other"))
        same.start(), other.start()
        assert entered["other"].wait(5)
        assert not entered["same"].wait(0.5)  # blocked while the first holder works
    assert entered["same"].wait(5)  # and through once it is done
    same.join(5), other.join(5)
