"""Local Dask clusters for hespotex's parallel work: worker processes, one thread each, fast memory reuse.

``distributed``'s nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``), so that long-lived workers hand freed memory back to the
system. Setting that variable also switches off glibc's dynamic mmap threshold: every allocation
over 128 KiB (every tensor of a training step or an inference batch) is then a fresh ``mmap`` whose
pages fault in one by one and are unmapped on free. Torch workloads pay for it in system time:
one her2st model trained in a worker took about 1.3 times as long with it
(``benchmarks/worker_malloc.py``). The clusters started here leave glibc's default behaviour
(the thresholds adapt to the sizes the process reuses) and keep the nanny's other variables.

The nanny also copies its variables into the parent's ``os.environ`` before spawning (and never
removes them), so after any default ``LocalCluster`` every later process inherits the threshold;
:func:`local_cluster` takes it out of ``os.environ`` while its workers start and puts it back after;
``hx.tl.train(..., strategy="ddp")`` does the same while it spawns its DDP ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TRIM_VARIABLE = "MALLOC_TRIM_THRESHOLD_"


def worker_environ() -> dict[str, Any]:
    """The nanny's pre-spawn environment of the current Dask config, without ``MALLOC_TRIM_THRESHOLD_``."""
    import dask

    environ = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {k: v for k, v in environ.items() if k != TRIM_VARIABLE}


@contextmanager
def without_trim_threshold() -> Iterator[None]:
    """Take ``MALLOC_TRIM_THRESHOLD_`` out of ``os.environ`` while processes are started, then put it back.

    Processes started inside (spawned DDP ranks, dask workers) inherit the environment without it.
    """
    inherited = os.environ.pop(TRIM_VARIABLE, None)  # set by an earlier nanny in this process, or by the user
    try:
        yield
    finally:
        if inherited is not None:
            os.environ[TRIM_VARIABLE] = inherited


def local_cluster(n_workers: int, **kwargs: Any) -> Any:
    """A :class:`distributed.LocalCluster` of ``n_workers`` processes with one thread each.

    Workers start with :func:`worker_environ` (the nanny's variables without the memory-trim
    threshold, also when this process's environment has it); ``kwargs`` go to ``LocalCluster``
    (no dashboard unless ``dashboard_address`` is given).
    Use it as a context manager, as ``LocalCluster`` itself.
    """
    import dask
    from distributed import LocalCluster

    options = {"threads_per_worker": 1, "processes": True, "dashboard_address": None, **kwargs}
    with without_trim_threshold(), dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}):
        return LocalCluster(n_workers=n_workers, **options)
