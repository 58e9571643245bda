"""Pre-trained autoencoders kept on disk (``hx.settings.cachedir / "autoencoders"``), shared between processes.

The autoencoder's pre-training depends only on the expression it reconstructs, its graph, its settings and the seed
(:func:`hespotex.tl.training._training._autoencoder_key`). Ensemble members and cross-validation folds that train on
the same samples with the same seed pre-train the same autoencoder: in leave-one-section-out over 5 sections with
4-member ensembles, 20 members share 10 autoencoders. The training process keeps its own in memory; this cache lets
other processes (dask workers, a later session) reuse it too. A lock per key makes a second process wait for the
first one's result instead of computing it again. Weights are stored as safetensors (no pickle); a file that does not
load into the network is ignored and rewritten. The directory keeps the :data:`MAX_FILES` most recently used.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hespotex._settings import settings

logger = logging.getLogger("hespotex")

#: Autoencoders kept on disk; the least recently used beyond this are removed.
MAX_FILES = 64


def cache_path(key: str) -> Path:
    """Where the autoencoder of ``key`` is kept."""
    return Path(settings.cachedir) / "autoencoders" / f"{key}.safetensors"


@contextlib.contextmanager
def locked(key: str) -> Iterator[None]:
    """Hold the lock of ``key`` (a file lock beside the cache file); without a writable cache directory, no lock."""
    from filelock import FileLock

    path = cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_suffix(".lock")))
        lock.acquire()
    except OSError as err:
        logger.debug("No autoencoder cache lock (%s): pre-training without it.", err)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def load(autoencoder: Any, key: str) -> bool:
    """Load the cached weights of ``key`` into ``autoencoder``; ``False`` when there are none or they do not fit."""
    from safetensors.torch import load_file

    path = cache_path(key)
    if not path.is_file():
        return False
    try:
        autoencoder.load_state_dict(load_file(str(path)))
    except Exception as err:  # a truncated or foreign file: pre-train again and replace it
        logger.warning("Ignoring the cached autoencoder %s (%s); pre-training it again.", path.name, err)
        return False
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used
    return True


def save(state: dict[str, Any], key: str) -> None:
    """Write ``state`` (CPU tensors) for ``key`` atomically, then trim the directory to :data:`MAX_FILES`."""
    from safetensors.torch import save_file

    path = cache_path(key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("Could not cache the pre-trained autoencoder in %s (%s).", path.parent, err)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return
    files = sorted(path.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[MAX_FILES:]:
        with contextlib.suppress(OSError):
            old.unlink()  # its (empty) lock file stays: another process may hold it
