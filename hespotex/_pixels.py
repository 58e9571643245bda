"""Image pixels read into numpy in this process.

Patch, window and thumbnail reads are small and many. Under a dask distributed ``Client`` the default scheduler
sends each read's task graph to the cluster and the pixels back; for an image held in memory that graph carries the
whole image (hundreds of MiB per read). These reads run on local threads instead, as they do without a client.
Work meant to spread over a cluster (streamed and cohort prediction) does not go through here.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def read_local(array: Any) -> np.ndarray:
    """``array`` (numpy, dask, or an xarray ``DataArray`` over either) as numpy, computed on local threads."""
    if hasattr(array, "dims") and hasattr(array, "variable"):  # xarray: its numpy or dask array
        array = array.data
    if hasattr(array, "dask"):
        array = array.compute(scheduler="threads")
    return np.asarray(array)
