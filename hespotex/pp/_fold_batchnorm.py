"""Folding a frozen convolutional encoder's BatchNorm layers into the convolutions before them (inference only).

In eval mode a BatchNorm is a fixed per-channel scale and shift, so ``bn(conv(x))`` is one convolution with
rescaled weights and a bias. Left apart, each BatchNorm is one more pass over a large activation: on CPU it took
almost as long as the convolutions themselves in EfficientNet-Lite0 at 224 px (profile of ``hx.pp.embed``: 17 s of
BatchNorm against 20 s of convolution). Folded, the same features up to float rounding (3e-5) at 1.5-1.7 times the
patches per second (ResNet-18 1.2 times), the whole default ``hx.pp.embed`` 1.4 times
(``benchmarks/results/encoder_fold.md``).
"""

from __future__ import annotations

import copy
import itertools
import logging
import weakref
from typing import Any

logger = logging.getLogger("hespotex")

#: model -> (the weights' versions when it was folded, its folded copy or itself): one fold per encoder, not one per
#: streamed chunk; a model changed in place since (a tensor's ``_version`` moved) is folded again
_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: timm convolutional networks whose BatchNorm layers directly follow their convolution in registration order
FOLDABLE_MODELS = frozenset({"EfficientNet", "MobileNetV3", "ResNet", "RegNet"})
_BATCHNORMS = ("BatchNorm2d", "BatchNormAct2d")


def _foldable(model: Any) -> bool:
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # someone observes it: run as is
    return (
        type(model).__module__.startswith("timm.")
        and type(model).__name__ in FOLDABLE_MODELS
        and not model.training
        and not hooked
    )


def fold_batchnorm(model: Any, *, probe_size: int = 64) -> Any:
    """A copy of ``model`` with every eval-mode BatchNorm folded into the convolution registered just before it.

    Only for the timm networks of :data:`FOLDABLE_MODELS` in eval mode without forward hooks; any other module
    (vision transformers, user modules, a model in training mode, one with hooks registered on it or its layers,
    which the copy would not run) is returned unchanged, uncopied. A timm ``BatchNormAct2d`` keeps its
    activation (and dropout). The copy is checked against ``model`` on a seeded random ``probe_size`` input: if the
    features differ by more than float rounding (a network whose BatchNorm does not read the convolution before
    it), ``model`` itself is returned. ``model`` is never modified. The result is kept per model and returned again
    while none of its tensors has changed. A :class:`~hespotex.pp._layer_pool.LayerPool` has the network it pools
    from folded (its layers keep their names, so the same layers are pooled).
    """
    from hespotex.pp._layer_pool import LayerPool

    if isinstance(model, LayerPool):
        inner = fold_batchnorm(model.model, probe_size=probe_size)
        return model if inner is model.model else LayerPool(inner, model.layers)
    if not _foldable(model):
        return model
    versions = tuple(t._version for t in (*model.parameters(), *model.buffers()))
    cached = _FOLDED.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    result = _fold_checked(model, probe_size)
    _FOLDED[model] = (versions, result)
    return result


def _fold_checked(model: Any, probe_size: int) -> Any:
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded, n = copy.deepcopy(model), 0
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if (
                isinstance(conv, torch.nn.Conv2d)
                and type(bn).__name__ in _BATCHNORMS
                and bn.track_running_stats
                and bn.running_mean is not None
            ):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                rest = getattr(bn, "act", None), getattr(bn, "drop", None)
                keep = [m for m in rest[::-1] if m is not None and not isinstance(m, torch.nn.Identity)]
                setattr(parent, bn_name, torch.nn.Sequential(*keep) if keep else torch.nn.Identity())
                n += 1
    if not n:
        return model
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, probe_size, probe_size, generator=gen).to(param.device, param.dtype)
    with torch.inference_mode():
        want, got = model(probe).float(), folded(probe).float()
    tol = 1e-3 * max(1.0, float(want.abs().max()))
    if want.shape != got.shape or float((want - got).abs().max()) > tol:
        logger.debug("BatchNorm folding changed the features of %s; running it unfolded.", type(model).__name__)
        return model
    return folded
