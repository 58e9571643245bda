"""``HESpotEx.load`` builds the network once: on torch's ``meta`` device to check the weights' header, then given
memory and filled by a strict ``load_state_dict`` (no second build, no random initialisation thrown away). The
checks stand: a weights file that does not fit the setup is refused before any memory is given."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hespotex as hx
from hespotex.models import HESpotExNet
from hespotex.tl.model._data import graph_data

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture
def builds(monkeypatch):
    """The devices on which HESpotExNet is built (the real constructor runs; the calls are recorded)."""
    devices: list[str] = []
    init = HESpotExNet.__init__

    def recording(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the default device the network is built on
        init(self, *args, **kwargs)

    monkeypatch.setattr(HESpotExNet, "__init__", recording)
    return devices


def test_load_builds_the_network_once(trained_synthetic, builds):
    model = hx.tl.HESpotEx.load(trained_synthetic["model_dir"])
    assert builds == ["meta"]  # the checked network is the one that holds the weights
    original = trained_synthetic["model"].module_.state_dict()
    loaded = model.module_.state_dict()
    assert loaded.keys() == original.keys()
    assert all(v.device.type == "cpu" and torch.equal(v, original[k]) for k, v in loaded.items())
    assert all(p.requires_grad for p in model.module_.parameters()) and not model.module_.training
    table = trained_synthetic["test"].tables["table"]
    pred = model.predict_graph(graph_data(table, "t", genes=None), device="cpu", smooth=0.5)["expression"]
    np.testing.assert_allclose(pred, np.asarray(table.layers["hespotex"]), atol=1e-5)


def test_load_still_refuses_weights_that_do_not_fit(trained_synthetic, tmp_path, builds):
    folder = shutil.copytree(trained_synthetic["model_dir"], tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.startswith("net.") and tensors[k].ndim == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])  # another network's shape
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"do not fit the model its setup describes \(1 problems: {name} is F32"):
        hx.tl.HESpotEx.load(folder)
    assert builds == ["meta"]  # refused from the header: nothing was given memory
    # a setup describing another network (latent_dim) than the weights hold
    folder = shutil.copytree(trained_synthetic["model_dir"], tmp_path / "model2")
    setup = json.loads((folder / "setup.json").read_text())
    setup["config"]["latent_dim"] = 2 * setup["config"]["latent_dim"]
    (folder / "setup.json").write_text(json.dumps(setup))
    with pytest.raises(ValueError, match=r"do not fit the model its setup describes .*Save the model again"):
        hx.tl.HESpotEx.load(folder)
