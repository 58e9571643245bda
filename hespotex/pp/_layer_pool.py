"""Features pooled from inner layers of an encoder as well as its output (:class:`LayerPool`).

An ImageNet network's last layer describes objects; its middle layers describe texture and colour, which is most of
what an H&E patch shows. :class:`LayerPool` wraps a network so that its output is the spatial mean of each named
layer's output followed by the network's own pooled features, one ``(B, F)`` vector per patch. The built-in
``"efficientnet_lite0.imagenet.multilayer"`` (the default encoder) is EfficientNet-Lite0 wrapped so, with
:data:`LITE0_LAYERS`; ``hx.pp.load_encoder(name, layers=[...])`` wraps any other.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from typing import Any

import torch

#: The inner layers the default encoder pools besides its own output: EfficientNet-Lite0's last four stages of
#: blocks (80, 112, 192 and 320 channels, at 1/16 and 1/32 of the input), 1,984 features with the 1,280 of its head.
LITE0_LAYERS: tuple[str, ...] = ("blocks.3", "blocks.4", "blocks.5", "blocks.6")


def pool_output(out: torch.Tensor) -> torch.Tensor:
    """The spatial mean of one layer's output: ``(B, C, H, W)`` over ``H, W``, ``(B, N, C)`` tokens over ``N``."""
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    if out.ndim == 3:
        return out.mean(dim=1)
    if out.ndim == 2:
        return out
    msg = f"A pooled layer must output (B, C, H, W), (B, N, C) or (B, C); found shape {tuple(out.shape)}."
    raise ValueError(msg)


class LayerPool(torch.nn.Module):
    """``model``'s pooled output with the spatial means of the outputs of its sub-modules ``layers`` before it.

    Reads ``model``'s sub-modules by their names in ``model.named_modules()`` (``"blocks.3"``, ``"layer2"``, ...);
    writes nothing to ``model`` but forward hooks held for the length of each call. The output is
    ``[layers[0] mean, ..., layers[-1] mean, model(x)]`` in the order given.
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        if isinstance(layers, str) or not layers:
            msg = f"`layers` must be a non-empty list of sub-module names, found {layers!r}."
            raise ValueError(msg)
        modules = dict(model.named_modules())
        unknown = [name for name in layers if name not in modules or name == ""]
        if unknown:
            close = difflib.get_close_matches(unknown[0], [n for n in modules if n], n=5)
            hint = f" Close names: {close}." if close else ""
            msg = (
                f"The encoder has no sub-module named {unknown}.{hint} Pass names from "
                "`dict(encoder.model.named_modules())`, e.g. 'blocks.3' for an EfficientNet."
            )
            raise ValueError(msg)
        if len(set(layers)) != len(layers):
            msg = f"`layers` names a sub-module twice: {list(layers)}."
            raise ValueError(msg)
        self.model = model
        self.layers = tuple(layers)
        # a tuple, so not registered as sub-modules twice; a (folded) copy is wrapped anew and resolves its own
        self.targets = tuple(modules[name] for name in self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taken: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(_module, _inputs, output) -> None:
                taken[name] = pool_output(output)

            return hook

        handles = [m.register_forward_hook(keep(name)) for name, m in zip(self.layers, self.targets, strict=True)]
        try:
            out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.layers if name not in taken]
        if missing:
            msg = f"The encoder's forward pass never ran the layers {missing}; pool layers it uses."
            raise ValueError(msg)
        return torch.cat([*(taken[name] for name in self.layers), out], dim=1)


def recorded_layers(encoder: Any) -> list[str] | None:
    """The pooled layers an embedding record must name to re-make ``encoder`` (an
    :class:`~hespotex.pp._encoders.Encoder`) by its name: those of a :class:`LayerPool` built with ``layers=``;
    ``None`` for a plain encoder and for the built-in multi-layer one (its name says them)."""
    from hespotex.pp._encoder_base import EFFICIENTNET_LITE0_IMAGENET_MULTILAYER

    if not isinstance(encoder.model, LayerPool) or encoder.name == EFFICIENTNET_LITE0_IMAGENET_MULTILAYER:
        return None
    return list(encoder.model.layers)


def layers_tag(layers: Sequence[str]) -> str:
    """The part of an ``encoder_id`` that says which layers are pooled (short hash of their names)."""
    return "layers" + hashlib.sha256("|".join(layers).encode()).hexdigest()[:8]
