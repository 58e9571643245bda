"""Data-parallel training of HESpotEx with torch.distributed and ``DistributedDataParallel``.

``hx.tl.train(..., strategy="ddp")`` ends here. Two ways in:

- **Spawned** (the default): the calling process starts ``n_processes`` workers with
  :func:`torch.multiprocessing.spawn`; they meet over TCP at ``MASTER_ADDR`` (default ``127.0.0.1``)
  and ``MASTER_PORT`` (default: a free port), train, and rank 0 writes the fitted weights
  (safetensors) and history (JSON) to a temporary folder that the caller reads back. No Python
  object is pickled back to the caller.
- **Launched** (``torchrun`` or any launcher that sets ``RANK`` and ``WORLD_SIZE``): every process
  is already a rank; the process group is initialised from the environment (``env://``) and every
  rank returns the same trained model.

What each rank does (:func:`train_rank`):

1. builds the network from the same seed as every other rank and checks that all ranks (and the
   caller) hold identical initial weights;
2. pre-trains the autoencoder and trains the joint stage with ``DistributedDataParallel``: each
   epoch the spatial blocks are permuted with a seed shared by all ranks and dealt round-robin,
   so the ranks' shards are disjoint and cover every block (blocks are repeated only when there
   are fewer blocks than ranks); a rank groups its shard into batches of at most ``max_nodes``
   spots, and ranks with fewer batches repeat theirs so every rank takes the same number of
   optimiser steps (none waits forever in a collective). DDP averages the gradients, so the
   weights stay identical on every rank;
3. scores the validation samples split across ranks and sums the scores with ``all_reduce``, so
   every rank takes the same early-stopping decision and restores the same best epoch.

With two ranks an epoch sees the same spots as single-process training, in batches of half the
size (one batch per rank): the optimisation differs, the quality should not.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hespotex._cluster import without_trim_threshold
from hespotex._settings import settings
from hespotex.tl.model._data import GraphData
from hespotex.tl.model._forward import forward_blocks
from hespotex.tl.training._collectives import Context, state_fingerprint
from hespotex.tl.training._training import fit_net

logger = logging.getLogger("hespotex")

STRATEGIES = ("single", "ddp")
BACKENDS = ("gloo", "nccl")
STATE_FILE = "state.safetensors"
HISTORY_FILE = "history.json"


# ---------------------------------------------------------------------------------------------- checks
def check_strategy(strategy: Any, n_processes: Any, backend: Any) -> None:
    """Refuse an unknown strategy or backend and a non-positive number of processes."""
    if strategy not in STRATEGIES:
        msg = f"Expected strategy to be one of {list(STRATEGIES)}, found {strategy!r}."
        raise ValueError(msg)
    if isinstance(n_processes, bool) or not isinstance(n_processes, int | np.integer) or n_processes < 1:
        msg = (
            "Expected n_processes to be a positive integer (processes of data-parallel training), found "
            f"{n_processes!r}."
        )
        raise ValueError(msg)
    if backend is not None and backend not in BACKENDS:
        msg = f"Expected backend to be None (gloo on CPU, nccl on CUDA) or one of {list(BACKENDS)}, found {backend!r}."
        raise ValueError(msg)


def launched() -> bool:
    """Whether this process is one rank of a job started by a launcher (``RANK`` and ``WORLD_SIZE`` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _resolve_backend(device, backend: str | None, world_size: int) -> str:
    import torch
    import torch.distributed as dist

    if device.type not in ("cpu", "cuda"):
        msg = (
            f"Data-parallel training runs on CPU (gloo) or CUDA (nccl), not on {device.type!r}; pass device='cpu' "
            "or 'cuda'."
        )
        raise ValueError(msg)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl":
        if device.type != "cuda":
            msg = "The nccl backend needs CUDA devices; use backend='gloo' (or None) on CPU."
            raise ValueError(msg)
        if not launched() and world_size > torch.cuda.device_count():
            msg = (
                f"nccl needs one GPU per process: {world_size} processes, {torch.cuda.device_count()} GPUs. "
                "Lower n_processes or use backend='gloo'."
            )
            raise ValueError(msg)
    if not dist.is_available() or not dist.is_backend_available(backend):
        msg = f"This torch build has no {backend!r} distributed backend; use another backend or strategy='single'."
        raise RuntimeError(msg)
    return backend


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- one rank
def train_rank(
    model,
    train: Sequence[GraphData],
    validation: Sequence[tuple[GraphData, np.ndarray]],
    *,
    ctx: Context,
    max_nodes: int,
    seed: int,
    expected_init: str | None = None,
    autoencoder_data: Sequence[GraphData] | None = None,
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Train ``model.module_`` on this rank (inputs already standardised); returns history and this rank's record.
    ``autoencoder_data``: the samples the autoencoder pre-trains on instead of ``train`` (``ae_samples="all"``)."""
    from hespotex.tl.evaluation._metrics import pearson_per_gene

    net = model.module_
    init = ctx.check_identical(net, "initial weights")
    if expected_init is not None and init != expected_init:
        msg = "A DDP worker built initial weights that differ from the calling process's; the seed did not reach it."
        raise RuntimeError(msg)

    def validate(net) -> float:
        scores = np.zeros(len(validation))
        for i in range(ctx.rank, len(validation), ctx.world_size):
            s, mask = validation[i]
            pred = forward_blocks(net, s, ctx.device, max_nodes=max_nodes)["expression"]
            r = pearson_per_gene(s.expr[mask], pred[mask])
            scores[i] = np.nanmean(r) if np.isfinite(r).any() else 0.0
        return float(np.mean(ctx.all_reduce(scores)))  # each entry set by one rank, zeros elsewhere: exact

    trace: dict[str, Any] = {"rank": ctx.rank}
    history = fit_net(
        net, train, validate=validate if validation else None, device=ctx.device, max_nodes=max_nodes, seed=seed,
        distributed=ctx, trace=trace, autoencoder_data=autoencoder_data,
    )  # fmt: skip
    trace["weights_sha256"] = ctx.check_identical(net, "trained weights")
    trace["validation_samples"] = [validation[i][0].name for i in range(ctx.rank, len(validation), ctx.world_size)]
    return history, trace


def _worker(rank: int, world_size: int, job: dict[str, Any]) -> None:
    """Body of one spawned process (module level, so ``spawn`` can import it)."""
    import datetime

    import torch
    import torch.distributed as dist

    from hespotex.models import HESpotExNet

    torch.set_num_threads(job["threads"])
    settings.progress = job["progress"] and rank == 0
    logger.setLevel(job["log_level"] if rank == 0 else max(job["log_level"], logging.WARNING))
    device = torch.device(job["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(
        job["backend"], init_method=f"tcp://{job['addr']}:{job['port']}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=job["timeout_s"]),
    )  # fmt: skip
    try:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=job["threads"]):
            setup = job["setup"]
            model = job["model_class"](
                setup["genes"], embedding=setup["embedding"], config=setup["config"], target_sum=setup["target_sum"]
            )
            model.module_ = HESpotExNet(
                len(model.genes), setup["embedding_dim"], model.config.replace(seed=job["seed"])
            )
            model._start_at_training_means(job["train"])
            history, trace = train_rank(
                model, job["train"], job["validation"], ctx=Context(rank, world_size, device),
                max_nodes=job["max_nodes"], seed=job["seed"], expected_init=job["init_sha256"],
                autoencoder_data=job["autoencoder_data"],
            )  # fmt: skip
        out = Path(job["outdir"])
        if rank == 0:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in model.module_.state_dict().items()}
            save_file(state, out / STATE_FILE)
            (out / HISTORY_FILE).write_text(json.dumps(history))
        (out / f"rank{rank}.json").write_text(json.dumps(trace))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- entry point
def fit_distributed(
    model,
    train: Sequence[GraphData],
    validation: Sequence[tuple[GraphData, np.ndarray]],
    *,
    device,
    max_nodes: int,
    seed: int,
    n_processes: int,
    backend: str | None,
    timeout_s: float = 1800.0,
    autoencoder_data: Sequence[GraphData] | None = None,
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Train ``model.module_`` (built and initialised, inputs standardised) data-parallel; load the result into it.

    Returns the history and the strategy record (``strategy``, ``world_size``, ``backend``,
    ``launcher`` and per-rank ``ranks``: shards, steps and weight fingerprints).
    """
    if launched():
        return _fit_launched(
            model,
            train,
            validation,
            device=device,
            max_nodes=max_nodes,
            seed=seed,
            n_processes=n_processes,
            backend=backend,
            autoencoder_data=autoencoder_data,
        )
    import torch
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    backend = _resolve_backend(device, backend, n_processes)
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else _free_port(addr)
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = settings.num_threads or max(1, min(torch.get_num_threads(), n_cpu // n_processes))
    outdir = Path(tempfile.mkdtemp(prefix="hespotex-ddp-"))
    job = {
        "setup": {
            "genes": model.genes, "embedding": model.embedding, "config": model.config.to_dict(),
            "target_sum": model.target_sum, "embedding_dim": len(model.embedding_mean_),
        },
        "model_class": type(model),  # the worker builds the same class (pickled by reference)
        "init_sha256": state_fingerprint(model.module_), "train": list(train), "validation": list(validation),
        "autoencoder_data": None if autoencoder_data is None else list(autoencoder_data),
        "device": str(device), "backend": backend, "addr": addr, "port": port, "timeout_s": timeout_s,
        "max_nodes": max_nodes, "seed": seed, "threads": threads, "outdir": str(outdir),
        "progress": settings.progress, "log_level": logger.getEffectiveLevel(),
    }  # fmt: skip
    logger.info(
        "DDP training: %d processes (%s backend, %s, %d thread(s) each) at %s:%d.",
        n_processes,
        backend,
        device.type,
        threads,
        addr,
        port,
    )
    try:
        with without_trim_threshold():  # ranks are training loops: glibc's adaptive thresholds (hespotex._cluster)
            context = mp.start_processes(
                _worker, args=(n_processes, job), nprocs=n_processes, join=False, start_method="spawn"
            )
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException as err:
            msg = f"DDP training failed in worker process {err.error_index} of {n_processes}; its error:\n{err}"
            raise RuntimeError(msg) from err
        except mp.ProcessExitedException as err:
            msg = f"DDP worker process {err.error_index} of {n_processes} died ({err}); the others were stopped."
            raise RuntimeError(msg) from err
        finally:  # interrupted (Ctrl-C) or failed: leave no worker behind
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(10)
                    if p.is_alive():
                        p.kill()
                        p.join()
        model.module_.load_state_dict(load_file(outdir / STATE_FILE), strict=True)
        history = json.loads((outdir / HISTORY_FILE).read_text())
        ranks = [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(n_processes)]
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    if state_fingerprint(model.module_) != ranks[0]["weights_sha256"]:
        msg = (
            "The weights read back from the DDP workers differ from those they trained; the temporary folder was "
            "altered."
        )
        raise RuntimeError(msg)
    record = {"strategy": "ddp", "world_size": n_processes, "backend": backend, "launcher": "spawn", "ranks": ranks}
    return history, record


def _fit_launched(model, train, validation, *, device, max_nodes, seed, n_processes, backend, autoencoder_data=None):
    """This process is one rank of a launched job (torchrun): train in place, every rank returns the model."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    if n_processes != world_size:
        logger.info("Launched with WORLD_SIZE=%d; n_processes=%d is ignored.", world_size, n_processes)
    backend = _resolve_backend(device, backend, world_size)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    try:
        history, trace = train_rank(
            model, train, validation, ctx=Context(rank, world_size, device), max_nodes=max_nodes, seed=seed,
            autoencoder_data=autoencoder_data,
        )  # fmt: skip
        # every rank learns every rank's record (small JSON strings)
        traces: list[Any] = [None] * world_size
        dist.all_gather_object(traces, json.dumps(trace))
    finally:
        if created:
            dist.destroy_process_group()
    record = {
        "strategy": "ddp", "world_size": world_size, "backend": backend, "launcher": "env",
        "ranks": [json.loads(t) for t in traces],
    }  # fmt: skip
    return history, record
