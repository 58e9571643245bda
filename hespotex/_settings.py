"""Package-wide settings (``hx.settings``) and the package logger."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("hespotex")


class _PackageHandler(logging.StreamHandler):
    """hespotex's own stderr handler, used only while no handler up the chain would show the record.

    Without any logging set up, hespotex's INFO messages still reach stderr (as scanpy's and
    scvi-tools' do); once the application configures logging (``logging.basicConfig``, pytest, a
    notebook's setup), records propagate to its handlers and this one stays silent, so every message
    appears exactly once. (scvi-tools sets ``propagate = False`` instead, which hides the package's
    messages from the application's handlers, log files and pytest's ``caplog``.)
    """

    def emit(self, record: logging.LogRecord) -> None:
        parent = logger.parent if logger.propagate else None  # the chain above the "hespotex" logger
        while parent is not None:
            if parent.handlers:
                return  # shown by the application's handler
            parent = parent.parent if parent.propagate else None
        super().emit(record)


if not any(h.get_name() == "hespotex" for h in logger.handlers):
    _handler = _PackageHandler()
    _handler.set_name("hespotex")
    _handler.setFormatter(logging.Formatter("%(levelname)s hespotex: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)


def _default_cachedir() -> Path:
    env = os.environ.get("HESPOTEX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hespotex"


@dataclass
class Settings:
    """Global settings.

    Attributes
    ----------
    progress
        Show tqdm progress bars on long loops.
    cachedir
        Where image embeddings are cached (``HESPOTEX_CACHE`` overrides the default
        ``~/.cache/hespotex``).
    device
        Torch device for encoders and models: ``"auto"`` picks CUDA, then MPS, then CPU.
    num_threads
        Torch intra-op threads; ``None`` keeps torch's default.
    """

    progress: bool = True
    cachedir: Path = field(default_factory=_default_cachedir)
    device: str = "auto"
    num_threads: int | None = None

    @property
    def verbosity(self) -> int:
        """Logging level of the ``hespotex`` logger."""
        return logger.level

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        logger.setLevel(level)


settings = Settings()


def resolve_device(device: str | None = None):
    """Return a ``torch.device`` for ``device`` (``"auto"`` or ``None`` uses :data:`settings`).

    Also applies ``settings.num_threads`` to torch, so every compute entry point honours it.
    """
    import torch

    if settings.num_threads is not None and torch.get_num_threads() != settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    name = settings.device if device in (None, "auto") else device
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    return torch.device(name)
