"""Package-wide settings (``hx.settings``) and the package logger."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("hespotex")
if not logger.handlers:
    _handler = logging.StreamHandler()
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
