"""Building LazySlide model-zoo encoders (``lazyslide-models``): weights from the hub, a local file or folder.

The registry side (which zoo entries embed tiles, their scale and licence) lives in
:mod:`hespotex.pp._encoder_zoo`; this module builds an entry with the zoo's own constructor and wraps
it as a hespotex :class:`~hespotex.pp._encoder_base.Encoder` (:func:`load_zoo_encoder`).

Centre crops. An entry whose transform is ``Resize(R) -> CenterCrop(C)`` with ``C < R`` (Prov-GigaPath
and GigaPath-Flash: 256 -> 224, crop_pct 0.875; ``lunit-dino-s8-moozy``: 248 -> 224) is reproduced as
its pipeline runs it: the Encoder's ``input_size`` is ``R``, so :func:`hespotex.pp.embed` cuts the
patch (the tile the authors cut: ``R`` px at the native µm/px by default) and resizes it to ``R``, and
the module takes the central ``C`` px with torchvision's own ``center_crop`` before the network. The
network thus sees what the published pipeline shows it: the centre ``C/R`` of the tile, at the tile's
µm/px. The embedding record keeps ``resize`` and ``center_crop``.
"""

from __future__ import annotations

import dis
import hashlib
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hespotex._settings import logger
from hespotex.pp._encoder_zoo import EncoderUnavailableError, ZooEntry, zoo_entry, zoo_registry

if TYPE_CHECKING:
    import torch

    from hespotex.pp._encoder_base import Encoder

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".pt2", ".ckpt")
_PATCH_LOCK = threading.Lock()  # the timm redirect below patches a module attribute


def _module_class() -> type:
    import torch

    class ZooEncoderModule(torch.nn.Module):
        """``encode_image`` of a zoo model as a module: normalised ``(B, 3, S, S)`` -> ``(B, F)``.

        Entries that preprocess with their own image processor (``get_transform() is None``) get
        the batch as uint8 RGB and do their own resizing and normalisation.
        """

        def __init__(self, zoo_model: Any, *, raw_input: bool, center_crop: int | None = None) -> None:
            super().__init__()
            self.zoo_model = zoo_model
            self.raw_input = raw_input
            self.center_crop = center_crop
            if isinstance(zoo_model.model, torch.nn.Module):
                self.net = zoo_model.model  # registered, so .to(), .eval() and parameters() reach it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.center_crop is not None:  # the entry's CenterCrop, after hespotex resized to its Resize size
                from torchvision.transforms.v2.functional import center_crop

                x = center_crop(x, [self.center_crop, self.center_crop])
            if self.raw_input:
                x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
            out = self.zoo_model.encode_image(x)
            return torch.as_tensor(out).float()

    return ZooEncoderModule


def _transform_spec(zoo_model: Any) -> dict[str, Any]:
    """Input size, mean and std from the zoo's own transform (or image processor)."""
    transform = zoo_model.get_transform()
    if transform is None:  # preprocessed inside encode_image by a transformers image processor
        proc = getattr(zoo_model, "img_processor", None) or getattr(zoo_model, "processor", None)
        size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        return {"input_size": int(side or 224), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "raw_input": True}
    spec: dict[str, Any] = {"raw_input": False}
    for step in getattr(transform, "transforms", [transform]):
        kind = type(step).__name__
        if kind == "Resize":
            size = step.size
            spec["resize"] = int(size if isinstance(size, int) else size[0])
        elif kind == "CenterCrop":
            spec["input_size"] = int(step.size[0])
        elif kind == "Normalize":
            spec["mean"], spec["std"] = tuple(step.mean), tuple(step.std)
    spec.setdefault("input_size", spec.get("resize", 224))
    spec.setdefault("mean", (0.0, 0.0, 0.0))
    spec.setdefault("std", (1.0, 1.0, 1.0))
    return spec


def _reads_model_path(cls: type) -> bool:
    """Whether the zoo constructor uses its ``model_path`` argument (read from its bytecode)."""
    return any(
        ins.opname.startswith("LOAD_FAST") and "model_path" in str(ins.argval)
        for ins in dis.get_instructions(cls.__init__)
    )


def _hub_error(entry: ZooEntry, err: BaseException) -> EncoderUnavailableError:
    """Turn a download / import failure of the zoo constructor into an error that says what to do."""
    from huggingface_hub.errors import GatedRepoError

    where = f"https://huggingface.co/{entry.hub_id}" if entry.hub_id else "its hub page"
    if isinstance(err, GatedRepoError) or "gated" in str(err).lower():
        msg = (
            f"The encoder {entry.name!r} is gated: request access at {where} with your Hugging Face account, then "
            "log in on this machine (`hf auth login`, or set HF_TOKEN) and call again. Or download the weights "
            "where you have access and pass them with `weights=`."
        )
    elif isinstance(err, ImportError):
        msg = f"The encoder {entry.name!r} needs a package that cannot be imported here: {err}"
    else:
        msg = (
            f"Could not get the hub files of {entry.name!r} ({type(err).__name__}: {str(err)[:200]}). Offline "
            f"(HF_HUB_OFFLINE=1 or no network) they load only from the huggingface_hub cache. Download them "
            f"where you have network (`hf download {entry.hub_id or '<repo>'}`; gated: {entry.gated}) into the "
            "cache, or pass a local copy with `weights=` (a checkpoint file or the downloaded repo folder)."
        )
    return EncoderUnavailableError(msg)


@contextmanager
def _timm_redirect(local_dir: Path | None, built: list[tuple[str, dict[str, Any], Any]], *, random: bool, device: Any):
    """Let the zoo constructor call ``timm.create_model`` as it does, recording what it builds.

    ``local_dir``: hub ids (``hf-hub:`` / ``hf_hub:``) become ``local-dir:`` so timm reads the config
    and weights of a local download. ``random``: build without pretrained weights (tests).
    """
    import timm
    import torch

    real = timm.create_model

    def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        if local_dir is not None and re.match(r"hf[-_]hub:", model_name):
            model_name = f"local-dir:{local_dir}"
        with torch.device(device):
            model = real(model_name, pretrained=pretrained and not random, **kwargs)
        built.append((model_name, kwargs, model))
        return model

    with _PATCH_LOCK:
        timm.create_model = create_model
        try:
            yield
        finally:
            timm.create_model = real


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _WEIGHT_SUFFIXES)


def _sha(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _construct(entry: ZooEntry, *, weights: str | Path | None, token: str | None) -> tuple[Any, str]:
    """Build the zoo model with its own constructor; return it and a fingerprint of its weights."""
    import lazyslide_models

    cls = zoo_registry()[entry.name]
    if weights is None:
        try:
            zoo_model = cls(token=token)
        except (OSError, ImportError) as err:
            raise _hub_error(entry, err) from err
        from hespotex.pp._encoder_base import state_fingerprint

        return zoo_model, f"hub-{state_fingerprint(zoo_model.model)}"

    path = Path(weights).expanduser()
    if not path.exists():
        msg = f"Weights {path} not found; pass a checkpoint file or a folder holding the hub files of {entry.name!r}."
        raise FileNotFoundError(msg)
    files = _weight_files(path) if path.is_dir() else [path]
    if _reads_model_path(cls):
        if len(files) != 1:
            msg = (
                f"{entry.name!r} loads one checkpoint file; the folder {path} holds {len(files)} "
                f"({[f.name for f in files]}). Pass the file itself."
            )
            raise ValueError(msg)
        try:
            zoo_model = cls(model_path=str(files[0]), token=token)
        except (OSError, ImportError) as err:
            raise _hub_error(entry, err) from err
        except RuntimeError as err:  # load_state_dict: wrong keys or shapes
            msg = f"The checkpoint {files[0].name} does not fit {entry.name!r} as the zoo builds it: {str(err)[:400]}"
            raise ValueError(msg) from err
        return zoo_model, f"file-{_sha(files)}"
    if path.is_dir() and issubclass(cls, lazyslide_models.TimmModel) and (path / "config.json").is_file():
        built: list = []
        with _timm_redirect(path, built, random=False, device="cpu"):
            zoo_model = cls(token=token)
        if not any(name.startswith("local-dir:") for name, _, _ in built):
            msg = f"{entry.name!r} did not build from the folder {path}; pass a checkpoint file or use the hub cache."
            raise ValueError(msg)
        return zoo_model, f"dir-{_sha(files)}"
    how = (
        "a folder holding a download of the hub repository (config.json and model.safetensors or pytorch_model.bin)"
        if issubclass(cls, lazyslide_models.TimmModel)
        else "nothing local: its zoo constructor loads through the hub cache only; download it there "
        f"(`hf download {entry.hub_id}`) and call without `weights`"
    )
    msg = f"{entry.name!r} cannot load {path.name}: it takes {how}."
    raise ValueError(msg)


def _random_zoo_model(name: str, *, seed: int = 0, device: str = "cpu") -> tuple[Any, list]:
    """The zoo model of ``name`` built by its own constructor with random weights (for offline tests).

    Works for entries whose constructor builds a timm architecture from code before touching the
    hub (UNI, UNI2-h, GigaPath-Flash, CROWN, CRISP): a ``model_path`` that does not exist makes the
    constructor stop right after building the network, which is taken from the constructor's frame.
    Other entries raise :class:`EncoderUnavailableError` saying what they need (hub config or code,
    a package). ``device="meta"`` builds without allocating weights (shapes only).
    """
    import torch

    entry = zoo_entry(name)
    cls = zoo_registry()[entry.name]
    absent = Path(tempfile.gettempdir()) / "hespotex-no-weights" / f"{entry.name}.absent"
    built: list = []
    zoo_model = None
    with torch.random.fork_rng(devices=[]), _timm_redirect(None, built, random=True, device=device):
        torch.manual_seed(seed)
        try:
            zoo_model = cls(model_path=str(absent))
        except (FileNotFoundError, OSError, ImportError, ValueError, RuntimeError) as err:
            if not built or absent.name not in str(err) or "Repo id" in str(err):
                reason = str(_hub_error(entry, err))
                msg = f"{entry.name!r} cannot be built offline with random weights: {reason}"
                raise EncoderUnavailableError(msg) from err
            zoo_model = _constructor_self(err, cls)
    if zoo_model is None:
        msg = f"Could not recover the network {entry.name!r}'s constructor built."
        raise EncoderUnavailableError(msg)
    zoo_model.model.eval()
    return zoo_model, built


def _constructor_self(err: BaseException, cls: type) -> Any:
    """The instance under construction in the outermost ``__init__`` frame of ``err``'s traceback."""
    tb = err.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "__init__" and isinstance(candidate, cls):
            return candidate
        tb = tb.tb_next
    return None


def load_zoo_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    token: str | None = None,
    input_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    _zoo_model: Any = None,
) -> Encoder:
    """A zoo entry as a hespotex :class:`~hespotex.pp._encoders.Encoder` (see the module docstring)."""
    from hespotex.pp._encoder_base import check_input_size, state_fingerprint, wrap_encoder

    entry = zoo_entry(name)
    if _zoo_model is None:
        zoo_model, fingerprint = _construct(entry, weights=weights, token=token)
    else:  # a zoo model already built (tests, random weights)
        zoo_model, fingerprint = _zoo_model, f"params-{state_fingerprint(_zoo_model.model)}"
    spec = _transform_spec(zoo_model)
    resize = spec.get("resize", spec["input_size"])
    crop = spec["input_size"] if resize > spec["input_size"] else None
    size = check_input_size(input_size) if input_size is not None else resize
    if crop is not None and size < crop:
        msg = (
            f"{entry.name!r} resizes patches to {resize} px and centre-crops {crop} px for its network; "
            f"`input_size` (the side patches are resized to before that crop) must be at least {crop}, found {size}."
        )
        raise ValueError(msg)
    module = _module_class()(zoo_model, raw_input=spec["raw_input"], center_crop=crop)
    enc = wrap_encoder(
        module,
        name=entry.name,
        arch=f"zoo-{entry.name}-lsm{entry.version}",
        fingerprint=fingerprint,
        input_size=size,
        mean=spec["mean"],
        std=spec["std"],
        mean_override=mean,
        std_override=std,
    )
    if entry.output_width is not None and enc.num_features != entry.output_width:
        logger.warning(
            "%s outputs %d features; the zoo registers %d.", entry.name, enc.num_features, entry.output_width
        )
    record = {**entry.record(), **_scale_record(entry, resize=resize, crop=crop)}
    return replace(enc, entry={**record, **({"weights": str(weights)} if weights is not None else {})})


def _scale_record(entry: ZooEntry, *, resize: int, crop: int | None) -> dict[str, Any]:
    """µm/px at the Encoder's input and the crop recipe, for the embedding record.

    ``native_mpp`` becomes the µm/px of the image the zoo transform resizes to (what
    :func:`hespotex.pp.embed` cuts at): the published tile mpp, rescaled when the source names a tile
    of another size than ``resize`` (MADELEINE: 256 px at 1 µm/px resized to 224 -> 1.143 µm/px).
    """
    out: dict[str, Any] = {"mpp_assumed": entry.mpp_assumed, "resize": resize}
    if crop is not None:
        out["center_crop"] = crop
    if entry.tile_px is not None and entry.tile_px != resize:
        input_mpp = entry.native_mpp * entry.tile_px / resize
        out.update(tile_px=entry.tile_px, tile_mpp=entry.native_mpp, native_mpp=input_mpp)
    return out
