"""What every frozen image encoder is: the :class:`Encoder` record and the helpers that build one.

Shared by :mod:`hespotex.pp._encoders` (timm, checkpoints, ImageNet weights) and
:mod:`hespotex.pp._encoder_zoo_load` (LazySlide's pathology model zoo), which both import from here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hespotex._settings import logger

if TYPE_CHECKING:
    from pathlib import Path

    import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: EfficientNet-Lite0 with real ImageNet weights, available offline: its head's 1,280 pooled features.
EFFICIENTNET_LITE0_IMAGENET = "efficientnet_lite0.imagenet"
#: The default encoder: the same network, its head's features with the means of its last four stages of blocks
#: (1,984 features; :mod:`hespotex.pp._layer_pool`).
EFFICIENTNET_LITE0_IMAGENET_MULTILAYER = "efficientnet_lite0.imagenet.multilayer"
DEFAULT_ENCODER = EFFICIENTNET_LITE0_IMAGENET_MULTILAYER


@dataclass(frozen=True)
class Encoder:
    """A frozen image encoder and the input it expects.

    Attributes
    ----------
    model
        The network, in eval mode with ``requires_grad=False`` on every parameter; maps a normalised
        ``(B, 3, input_size, input_size)`` float batch to ``(B, num_features)`` pooled features.
    name
        What the user asked for (architecture name, hub id, built-in name or module class name).
    encoder_id
        Stable unique id for caching: architecture, a fingerprint of the weights (file sha256, or the
        parameter values), the input size and, when overridden, the normalisation.
    input_size
        Side of the square input in pixels.
    mean, std
        Per-channel normalisation applied to RGB values in ``[0, 1]``.
    num_features
        Width of the feature vector (checked with a forward pass when the encoder is built).
    entry
        Registry entry of a zoo encoder (name, source, version, native µm/px; see
        :func:`hespotex.pp.list_encoders`); empty for others.
    """

    model: torch.nn.Module
    name: str
    encoder_id: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    entry: Mapping[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter or buffer (CPU for a model without any)."""
        import torch

        for tensor in (*self.model.parameters(), *self.model.buffers()):
            return tensor.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> Encoder:
        """Move :attr:`model` to ``device`` (in place, as ``nn.Module.to`` does) and return ``self``."""
        self.model.to(device)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a float ``(B, 3, H, W)`` batch with values in ``[0, 1]``: ``(x - mean) / std``.

        Returns a new tensor on ``x``'s device and dtype; ``x`` is not modified. No resizing is done:
        the embedding pipeline resizes patches to :attr:`input_size`.
        """
        import torch

        if x.ndim != 4 or x.shape[1] != 3:
            msg = f"Expected a (B, 3, H, W) batch of RGB values in [0, 1], found shape {tuple(x.shape)}."
            raise ValueError(msg)
        if not torch.is_floating_point(x):
            msg = f"Expected a float tensor with values in [0, 1], found dtype {x.dtype}; divide uint8 images by 255."
            raise TypeError(msg)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of an already normalised batch, under ``torch.inference_mode()``: ``(B, num_features)``."""
        import torch

        with torch.inference_mode():
            return self.model(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a ``[0, 1]`` float batch, move it to the model's device and return its features."""
        return self.forward(self.normalize(x.to(self.device)))


# --------------------------------------------------------------------------------------------------
# public entry points


def check_input_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        msg = f"`input_size` must be an integer of at least 8 pixels, found {size!r}."
        raise ValueError(msg)
    return size


def wrap_encoder(
    model: torch.nn.Module,
    *,
    name: str,
    arch: str,
    fingerprint: str,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    mean_override: tuple[float, ...] | None,
    std_override: tuple[float, ...] | None,
) -> Encoder:
    """Freeze ``model`` (already owned by us), check its output and build the Encoder."""
    model.eval()
    model.requires_grad_(False)
    final_mean = rgb_triple(mean_override if mean_override is not None else mean, "mean")
    final_std = rgb_triple(std_override if std_override is not None else std, "std")
    if any(s <= 0 for s in final_std):
        msg = f"`std` must be positive, found {final_std}."
        raise ValueError(msg)

    num_features = probe_width(model, name=name, input_size=input_size)
    encoder_id = f"{safe_name(arch)}-{fingerprint}-{input_size}px"
    if mean_override is not None or std_override is not None:
        norm = hashlib.sha256(repr((final_mean, final_std)).encode()).hexdigest()[:8]
        encoder_id += f"-norm{norm}"
    logger.debug("Loaded encoder %s (%d features).", encoder_id, num_features)
    return Encoder(
        model=model,
        name=name,
        encoder_id=encoder_id,
        input_size=input_size,
        mean=final_mean,
        std=final_std,
        num_features=num_features,
    )


def rgb_triple(values: Any, what: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        msg = f"`{what}` must have one value per RGB channel (3), found {len(out)}: {out}."
        raise ValueError(msg)
    return out  # type: ignore[return-value]


def probe_width(model: torch.nn.Module, *, name: str, input_size: int) -> int:
    """Run one zero image through ``model`` and return the feature width; insist on ``(B, F)`` output."""
    import torch

    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    x = torch.zeros(1, 3, input_size, input_size, device=device)
    try:
        with torch.inference_mode():
            out = model(x)
    except (RuntimeError, ValueError, AssertionError) as err:
        msg = (
            f"The encoder {name!r} failed on a (1, 3, {input_size}, {input_size}) input: {err}. "
            "Check `input_size` (some architectures, e.g. ViTs, need the size they were built for)."
        )
        raise ValueError(msg) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        msg = (
            f"The encoder {name!r} must output pooled features of shape (B, num_features), found {found}. "
            "Add pooling, e.g. torch.nn.Sequential(model, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), "
            "or create the timm model with num_classes=0."
        )
        raise ValueError(msg)
    return int(out.shape[1])


def file_sha256(path: Path) -> str:
    """The first 12 hex digits of a file's sha256 (read in 1 MiB chunks): a weights file's fingerprint."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def safe_name(text: str) -> str:
    """Make ``text`` safe for file names (encoder ids name cache folders)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def state_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 of every parameter and buffer (names, dtypes, shapes and values)."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:12]
