"""Data-parallel training (``hx.tl.train(..., strategy="ddp")``) on CPU: gloo backend, two processes.

Synthetic sections built with the same ``program_seed`` share one image -> expression law, so a model
trained on two of them predicts a third from its image (see ``test_tl_model.py``). DDP training must
give a model of the same quality as single-process training on the same data, really run on two
ranks (disjoint shards, synchronised weights), and fail loudly (worker traceback, no processes left).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import pytest

import hespotex as hx
from hespotex.models import ModelConfig
from hespotex.pp._normalize import log_expression
from hespotex.tl.evaluation._metrics import pearson_per_gene
from hespotex.tl.model._data import EMBEDDING_KEY, graph_data, spatial_block_mask
from hespotex.tl.training._collectives import state_fingerprint

pytestmark = pytest.mark.usefixtures("single_threaded")
ENCODER = "efficientnet_lite0.imagenet"
INPUT_SIZE = 64
N_GENES = 60
SMALL = {
    "ae_epochs": 30,
    "ae_hidden_dim": 64,
    "latent_dim": 16,
    "projection_hidden_dim": 64,
    "head_hidden_dim": 64,
    "decoder_heads": 2,
}
# as in test_tl_model.py: one batch per epoch single-process (400 spots < max_nodes), 80 steps, no early stop
MAIN = ModelConfig.preset("hespotex", epochs=80, lr=3e-3, patience=None, **SMALL)
TINY = ModelConfig.preset("hespotex", **{**SMALL, "epochs": 3, "ae_epochs": 3})
SECTIONS = {"A": (1, 250), "B": (2, 250), "T": (3, 200)}  # name: (seed, spots); T is the unseen test section


@pytest.fixture(scope="module", autouse=True)
def _not_launched():
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        pytest.skip("these tests spawn their own ranks; run them outside torchrun")


@pytest.fixture(scope="module")
def sections():
    out = {}
    for name, (seed, n) in SECTIONS.items():
        sdata = hx.datasets.synthetic(
            n_spots=n,
            n_genes=N_GENES,
            seed=seed,
            program_seed=0,
            microns_per_pixel=1.0,
            sample_id=f"syn_{name.lower()}",
        )
        hx.pp.embed(sdata, encoder=ENCODER, input_size=INPUT_SIZE)
        out[name] = sdata
    return out


@pytest.fixture(scope="module")
def genes(sections):
    return list(sections["A"].tables["table"].var_names)


@pytest.fixture(scope="module")
def single(sections, genes):
    return hx.tl.train([sections["A"], sections["B"]], genes=genes, config=MAIN, seed=0, device="cpu")


@pytest.fixture(scope="module")
def ddp(sections, genes):
    return hx.tl.train(
        [sections["A"], sections["B"]], genes=genes, config=MAIN, seed=0, device="cpu", strategy="ddp", n_processes=2
    )


@pytest.fixture(scope="module")
def control(sections, genes):
    """Single-process training with the training spots' image embeddings permuted across spots."""
    rng = np.random.default_rng(0)
    tables = []
    for name in ("A", "B"):
        table = sections[name].tables["table"].copy()
        table.obsm[EMBEDDING_KEY] = table.obsm[EMBEDDING_KEY][rng.permutation(table.n_obs)]
        tables.append(table)
    return hx.tl.train(tables, genes=genes, config=MAIN, seed=0, device="cpu")


def _test_pearson(model, sections, genes) -> float:
    """Mean per-gene Pearson on the unseen section T."""
    table = sections["T"].tables["table"]
    pred = np.asarray(hx.tl.predict(table.copy(), model, device="cpu").layers["hespotex"])
    return float(np.nanmean(pearson_per_gene(log_expression(table, genes), pred)))


def test_ddp_model_is_as_good_as_single_process(sections, genes, single, ddp, control):
    r_single = _test_pearson(single, sections, genes)
    r_ddp = _test_pearson(ddp, sections, genes)
    r_control = _test_pearson(control, sections, genes)
    # without image information nothing transfers to a new section
    assert abs(r_control) < 0.2, r_control
    # both models learn the image -> expression law (single 0.52, ddp 0.52 here)
    assert r_single - r_control > 0.3 and r_ddp - r_control > 0.3, (r_single, r_ddp, r_control)
    # Not identical: with 2 ranks every epoch sees the same spots, but as two half-size batches whose
    # losses (gene-wise Pearson included) are computed per rank and whose gradients are averaged,
    # and dropout draws differ. Equivalent quality is the claim (seen |difference| < 0.005).
    assert abs(r_ddp - r_single) < 0.05, (r_single, r_ddp)
    assert ddp.model_id != single.model_id


def test_ddp_ran_on_two_ranks_with_synchronised_weights(ddp):
    record = ddp.train_strategy_
    assert {k: record[k] for k in ("strategy", "world_size", "backend", "launcher")} == {
        "strategy": "ddp",
        "world_size": 2,
        "backend": "gloo",
        "launcher": "spawn",
    }
    ranks = record["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    # two training blocks (80 % of A, 80 % of B): one per rank, disjoint, covering both, in both stages
    for stage in ("autoencoder", "joint"):
        shards = [set(r[stage]["blocks"]) for r in ranks]
        assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == {0, 1}
        assert [r[stage]["steps_per_epoch"] for r in ranks] == [1, 1]
    assert [r["joint"]["spots"] for r in ranks] == [200, 200]
    # validation split between the ranks, one section each
    assert sorted(v for r in ranks for v in r["validation_samples"]) == ["syn_a", "syn_b"]
    # gradients were averaged: both ranks ended with the very same weights, and those are the model's
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] == state_fingerprint(ddp.module_)
    assert ddp.is_trained_ and len(ddp.history_) == MAIN.epochs


def test_ddp_restores_the_best_validation_epoch(sections, genes, ddp):
    # the score every rank agreed on each epoch: mean over A and B of the mean per-gene Pearson of
    # the held-out spatial block (20 %, seed 0); the restored weights must score the best of them
    scores = []
    for name in ("A", "B"):
        data = graph_data(sections[name].tables["table"], name, genes=genes)
        block = spatial_block_mask(data.coords_um, 0.2, seed=0)
        pred = ddp.predict_graph(data, device="cpu")["expression"]
        scores.append(np.nanmean(pearson_per_gene(data.expr[block], pred[block])))
    history = [h["validation"] for h in ddp.history_]
    assert float(np.mean(scores)) == pytest.approx(max(history), abs=1e-5)
    assert set(ddp.history_[0]) >= {"epoch", "mse", "alignment", "gene_pearson", "total", "validation"}


def test_one_process_ddp_reproduces_single_process(sections, genes):
    # the data-parallel loop with a world of one is the single-process algorithm, bit for bit
    pair = [sections["A"], sections["B"]]
    alone = hx.tl.train(pair, genes=genes, config=TINY, seed=0, device="cpu")
    one = hx.tl.train(pair, genes=genes, config=TINY, seed=0, device="cpu", strategy="ddp", n_processes=1)
    assert one.train_strategy_["world_size"] == 1 and alone.train_strategy_["strategy"] == "single"
    assert one.model_id == alone.model_id
    assert one.history_ == alone.history_


def _children(pid: int) -> list[str]:
    """Command lines of live child processes of ``pid`` (multiprocessing's resource tracker aside)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and "resource_tracker" not in cmd:
            out.append(cmd)
    return out


def test_worker_error_reaches_the_caller_and_no_worker_survives(sections, genes, monkeypatch):
    before = _children(os.getpid())
    # a real failure inside a worker: rank 0 cannot open the rendezvous port, another socket holds it
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        monkeypatch.setenv("MASTER_PORT", str(blocker.getsockname()[1]))
        with pytest.raises(RuntimeError, match=r"DDP training failed in worker process 0 of 2") as err:
            hx.tl.train([sections["A"], sections["B"]], genes=genes, config=TINY, seed=0, device="cpu", strategy="ddp")
    message = str(err.value)
    assert "Traceback" in message and "init_process_group" in message and "address already in use" in message
    assert multiprocessing.active_children() == []
    assert _children(os.getpid()) == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "horovod"}, r"strategy to be one of \['single', 'ddp'\], found 'horovod'"),
        ({"strategy": "ddp", "n_processes": 0}, "n_processes to be a positive integer"),
        ({"strategy": "ddp", "n_processes": 2.0}, "n_processes to be a positive integer"),
        ({"strategy": "ddp", "backend": "mpi"}, r"backend to be None .* found 'mpi'"),
        ({"strategy": "ddp", "backend": "nccl"}, "nccl backend needs CUDA"),
    ],
)
def test_bad_strategy_arguments_are_refused(sections, genes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hx.tl.train([sections["A"], sections["B"]], genes=genes, config=TINY, device="cpu", **kwargs)
