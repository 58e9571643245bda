"""Pre-trained autoencoders kept on disk (``hx.settings.cachedir / "autoencoders"``), shared between processes.

The autoencoder's pre-training depends only on the expression it reconstructs, its graph, its settings and the seed
(:func:`hespotex.tl.training._training._autoencoder_key`). Ensemble members and cross-validation folds that train on
the same samples with the same seed pre-train the same autoencoder: in leave-one-section-out over 5 sections the
default 8-member ensembles (``ModelConfig.ae_samples="all"``) pre-train one autoencoder per fold, 40 members on 5
(with ``"training"``, 2 members per held-out section, the second on the first's autoencoder: 40 members on 10).
The training process keeps its own in memory; this cache lets other processes (dask workers, a later session) reuse
it too. A lock per key makes a second process wait for the first one's result instead of computing it again. Weights
are stored as safetensors (no pickle); a file that does not load into the network is ignored and rewritten.

The folder is hespotex's own: it is created with the marker file :data:`MARKER`, and a folder of that name without
it (not made by hespotex) is neither written to nor trimmed. Files appear only whole (written beside, then renamed);
trimming keeps the :data:`MAX_FILES` most recently used and removes only hespotex's files (``<sha256>.safetensors``,
and temporary files a process that died while writing left behind); the empty ``.lock`` files stay (another process
may hold one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hespotex._settings import settings

logger = logging.getLogger("hespotex")

#: Autoencoders kept on disk; the least recently used beyond this are removed.
MAX_FILES = 64
#: The marker hespotex writes in the folder it creates; without it the folder is left alone.
MARKER = ".hespotex-autoencoders"
_OURS = re.compile(r"[0-9a-f]{64}\.safetensors")
_TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.safetensors\.\d+\.tmp")
_STALE_S = 3600.0  # a temporary file this old belongs to a process that died while writing


def cache_dir() -> Path | None:
    """The cache folder (created, with its marker, when missing), or ``None``: a folder of that name that hespotex
    did not create, or none can be made."""
    root = Path(settings.cachedir) / "autoencoders"
    try:
        root.mkdir(parents=True)
        (root / MARKER).write_text("Autoencoders pre-trained by hespotex (safe to delete).\n")
    except FileExistsError:
        pass
    except OSError as err:
        logger.debug("No autoencoder cache on disk (%s).", err)
        return None
    if not (root / MARKER).is_file():
        logger.debug("%s was not made by hespotex (no %s): not used as the autoencoder cache.", root, MARKER)
        return None
    return root


@contextlib.contextmanager
def locked(key: str) -> Iterator[Path | None]:
    """Hold the lock of ``key`` and give the path of its cached weights; ``None`` (and no lock) without a usable
    cache folder."""
    from filelock import FileLock

    root = cache_dir()
    if root is None:
        yield None
        return
    lock = FileLock(str(root / f"{key}.lock"))
    try:
        lock.acquire()
    except OSError as err:
        logger.debug("No autoencoder cache lock (%s): pre-training without the disk cache.", err)
        yield None
        return
    try:
        yield root / f"{key}.safetensors"
    finally:
        lock.release()


def load(autoencoder: Any, path: Path | None) -> bool:
    """Load the weights cached at ``path`` into ``autoencoder``; ``False`` when there are none or they do not fit."""
    from safetensors.torch import load_file

    if path is None or not path.is_file():
        return False
    try:
        autoencoder.load_state_dict(load_file(str(path)))
    except Exception as err:  # a damaged or foreign file: pre-train again and replace it
        logger.warning("Ignoring the cached autoencoder %s (%s); pre-training it again.", path.name, err)
        return False
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used
    return True


def save(state: dict[str, Any], path: Path | None) -> None:
    """Write ``state`` (CPU tensors) to ``path`` whole (beside it, then renamed), then trim the folder."""
    from safetensors.torch import save_file

    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("Could not cache the pre-trained autoencoder in %s (%s).", path.parent, err)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return
    trim(path.parent)


def trim(root: Path) -> None:
    """Remove hespotex's cached autoencoders beyond the :data:`MAX_FILES` most recently used, and stale temporary
    files; nothing else in ``root``."""
    now = time.time()
    kept = []
    for p in root.iterdir():
        with contextlib.suppress(OSError):
            if _OURS.fullmatch(p.name):
                kept.append((p.stat().st_mtime, p))
            elif _TEMPORARY.fullmatch(p.name) and now - p.stat().st_mtime > _STALE_S:
                p.unlink()
    for _, old in sorted(kept, reverse=True)[MAX_FILES:]:
        with contextlib.suppress(OSError):
            old.unlink()
