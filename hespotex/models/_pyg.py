"""torch_geometric, imported with its import-time ``FutureWarning`` silenced (its own ``torch.jit.script`` calls,
which no user can act on); only that message, only while it loads."""

from __future__ import annotations

import sys
import warnings


def quiet_torch_geometric() -> None:
    """Import ``torch_geometric`` (and ``torch_geometric.nn``) once, without that warning; later imports are cached."""
    if "torch_geometric.nn" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import torch_geometric.nn  # noqa: F401
