"""Vectorised correlation losses.

HESpotEx uses Pearson correlation twice:

- **Latent alignment** ``1 − r(z, ẑ)`` between the expression latent ``z`` (autoencoder) and the
  image latent ``ẑ`` (projection). The authors' ``PCC(spot_latent, image_embeddings)`` (default
  ``axis=0`` in ``model/models.py``) correlates each *spot's* two latent vectors across the latent
  dimensions and averages over spots; :func:`pearson_loss` with ``dim=-1`` on ``(spots, latent)``
  tensors is exactly that, without the Python loop over spots.
- **Gene-wise Pearson** ``1 − r(x, x̂)`` per gene across spots (the authors' ``PCC(..., axis=1)``,
  which they only monitor): ``dim=0`` on ``(spots, genes)`` tensors.

As in the authors' code, a constant vector (zero variance) has correlation 0 rather than NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pearson_corr(a: Tensor, b: Tensor, dim: int = -1, *, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (the other dimensions are batched).

    Parameters
    ----------
    a, b
        Tensors of the same shape.
    dim
        The dimension the correlation runs over: ``-1`` correlates rows (e.g. each spot across
        latent dimensions), ``0`` correlates columns (e.g. each gene across spots).
    eps
        Guards the denominator: where ``‖a − ā‖·‖b − b̄‖ < eps`` the result tends to 0, so constant
        inputs give 0 (not NaN) and finite gradients.

    Returns
    -------
    The correlations, with ``dim`` reduced.
    """
    if a.shape != b.shape:
        msg = f"Expected `a` and `b` of the same shape, found {tuple(a.shape)} and {tuple(b.shape)}."
        raise ValueError(msg)
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    cov = (a * b).sum(dim=dim)
    var = (a * a).sum(dim=dim) * (b * b).sum(dim=dim)
    return cov / torch.sqrt(var.clamp_min(eps * eps))


def pearson_loss(a: Tensor, b: Tensor, dim: int = -1, *, eps: float = 1e-8, reduction: str = "mean") -> Tensor:
    """``1 − Pearson r`` along ``dim``, vectorised.

    Parameters
    ----------
    a, b
        Tensors of the same shape, e.g. ``(spots, latent)`` or ``(spots, genes)``.
    dim
        Dimension the correlation runs over (see :func:`pearson_corr`). ``-1`` on
        ``(spots, latent)`` is the HESpotEx latent alignment loss; ``0`` on ``(spots, genes)`` is the
        gene-wise loss.
    eps
        Denominator guard, see :func:`pearson_corr`.
    reduction
        ``"mean"`` (default), ``"sum"`` or ``"none"`` over the remaining dimensions.

    Returns
    -------
    A scalar (``"mean"``/``"sum"``) or the per-slice losses (``"none"``), in ``[0, 2]``.
    """
    loss = 1.0 - pearson_corr(a, b, dim, eps=eps)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    msg = f"Expected `reduction` to be 'mean', 'sum' or 'none', found {reduction!r}."
    raise ValueError(msg)
