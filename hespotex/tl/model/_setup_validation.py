"""Checks of a saved model folder before anything is allocated: ``setup.json`` against a declarative
schema, the weights' shapes against the safetensors header, then finite weights.

:meth:`hespotex.tl.HESpotEx.load` runs, in this order,

1. :func:`validate_setup`: every field of ``setup.json`` has the type of :data:`SETUP_FIELDS` (required
   fields present, values within bounds), ``gene_hash`` matches the gene names, ``config`` is a
   valid :class:`~hespotex.models.ModelConfig` whose fields have their declared types;
2. :func:`read_header` and :func:`check_header`: the tensor names, dtypes and shapes listed in the
   header of ``model.safetensors`` (its JSON only, a few kB) equal those of the network the setup
   describes (built on torch's ``meta`` device, which allocates nothing), and the header accounts for
   every byte of the file. A setup claiming hidden sizes of 10⁹ is refused here, in milliseconds;
3. :func:`read_weights`: the whole file is read into memory (no memory map: replacing or truncating
   the file later cannot change or crash a loaded model) and every tensor is checked to be finite,
   the embedding scale also to be positive.

A new ``setup.json`` field is one entry of :data:`SETUP_FIELDS` (type, required, bounds); a field that
is not declared there is refused, since this hespotex would not know what it means.

The folder's format (:data:`FORMAT_VERSION`, the file names) and what :meth:`~hespotex.tl.HESpotEx.save` records
beside the schema (library :func:`versions`, :func:`json_default`) live here too, so the model imports the
schema and the schema never imports the model.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hespotex.pp._genes import gene_hash

__all__ = [
    "SETUP_FIELDS", "Field", "check_header", "expected_tensors", "materialise", "meta_network", "read_header",
    "read_weights", "validate_setup",
]  # fmt: skip

FORMAT_VERSION = 1  # of a saved model folder (setup.json "format_version")
WEIGHTS_FILE = "model.safetensors"
SETUP_FILE = "setup.json"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded (its message says why and what to do)."""


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(value: Any) -> str | None:
    return None if value >= 1 else "a positive integer"


def _positive_finite(value: Any) -> str | None:
    return None if math.isfinite(value) and value > 0 else "a positive, finite number"


def _unique_names(value: list) -> str | None:
    if not value or not all(isinstance(g, str) and g for g in value) or len(set(value)) != len(value):
        return "a non-empty list of unique, non-empty gene names (strings)"
    return None


def _geometry(value: dict | None) -> str | None:
    for k, v in (value or {}).items():
        if v is not None and (not _number(v) or not math.isfinite(v) or v <= 0):
            return f"positive, finite µm values (found {k}={v!r})"
    return None


def _embedding(value: dict) -> str | None:
    patch = value.get("patch_um")
    if patch is not None and (not _number(patch) or not math.isfinite(patch) or patch <= 0):
        return f"an object whose patch_um is a positive, finite number (found {patch!r})"
    context = value.get("context_um")
    if context is not None and (
        not _number(context) or not math.isfinite(context) or context <= (patch if _number(patch) else 0)
    ):
        return f"an object whose context_um is null or a finite number wider than patch_um (found {context!r})"
    for key in ("encoder", "encoder_id"):
        if value.get(key) is not None and not isinstance(value[key], str):
            return f"an object whose {key} is a string (found {value[key]!r})"
    norm = value.get("stain_norm")
    if norm is not None:
        from hespotex.pp._stain_norm import reference_problem

        problem = reference_problem(norm.get("reference")) if isinstance(norm, dict) else f"found {_short(norm)}"
        if problem is not None:
            return f"an object whose stain_norm holds a valid stain reference ({problem})"
    return None


def _spot_counts(value: dict) -> str | None:
    for name, counts in value.items():
        ok = isinstance(counts, dict) and all(
            isinstance(counts.get(k), int) and not isinstance(counts.get(k), bool) and counts[k] >= 0
            for k in ("train_spots", "validation_spots")
        )
        if not ok or set(counts) != {"train_spots", "validation_spots"}:
            return f"an object of non-negative spot counts per sample (found {name!r}: {counts!r})"
    return None


def _known(module: str, checker: str) -> Callable[[str], str | None]:
    """A bounds check through the setting's own validator (``checker(value)`` raises on unknown names)."""

    def check(value: str) -> str | None:
        import importlib

        try:
            getattr(importlib.import_module(module), checker)(value)
        except ValueError as err:
            return f"a known name ({err})"
        return None

    return check


@dataclass(frozen=True)
class Field:
    """One ``setup.json`` field: accepted JSON types, whether it must be present, and a bounds check
    returning what was expected when the value is out of bounds (``None`` when fine)."""

    types: tuple[type, ...]
    what: str
    required: bool = False
    check: Callable[[Any], str | None] | None = None


NUMBER = (int, float)
SETUP_FIELDS: dict[str, Field] = {
    "format_version": Field((int,), "an integer", required=True),
    "versions": Field((dict,), "an object of package versions"),
    "genes": Field((list,), "a list of gene names", required=True, check=_unique_names),
    "gene_hash": Field((str,), "the fingerprint of the gene list", required=True),
    "gene_selection": Field((dict, type(None)), "an object or null"),
    "spot_geometry": Field((dict, type(None)), "an object of µm values or null", check=_geometry),
    "embedding": Field((dict,), "an object describing the image embeddings", required=True, check=_embedding),
    "embedding_dim": Field((int,), "the width of the image embeddings", required=True, check=_positive_int),
    "config": Field((dict,), "a ModelConfig as an object", required=True),
    "target_sum": Field(NUMBER, "a number", required=True, check=_positive_finite),
    "target_norm": Field(
        (str,), "a target normalisation name", check=_known("hespotex.pp._targets", "check_target_norm")
    ),
    "embedding_norm": Field(
        (str,), "an embedding normalisation name", check=_known("hespotex.pp._stain", "check_embedding_norm")
    ),
    "stain_augment": Field((dict, type(None)), "an object describing the stain-augmented views, or null"),
    "train_samples": Field((list,), "a list of sample names"),
    "validation": Field((dict,), "an object"),
    "history": Field((list,), "a list of per-epoch records"),
    "train_strategy": Field((dict, type(None)), "an object or null"),
    "training_data": Field((dict,), "an object {sample: {train_spots, validation_spots}}", check=_spot_counts),
}
"""The schema of ``setup.json``: field -> :class:`Field`. Add new (optional) fields here."""


def _refuse(path: Path, what: str) -> ModelFolderError:
    return ModelFolderError(f"The model folder {str(path)!r} cannot be loaded: {what}")


def _is_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true/false is not a number
    return isinstance(value, types)


def _config_types() -> dict[str, tuple[tuple[type, ...], str]]:
    """Accepted JSON types of each :class:`~hespotex.models.ModelConfig` field, from its annotations."""
    import dataclasses

    from hespotex.models import ModelConfig

    names = {"int": (int,), "float": NUMBER, "bool": (bool,), "str": (str,), "None": (type(None),)}
    out = {}
    for f in dataclasses.fields(ModelConfig):
        parts = [p.strip() for p in str(f.type).split("|")]
        out[f.name] = (tuple(t for p in parts for t in names[p]), str(f.type))
    return out


def validate_setup(setup: Any, path: Path) -> None:
    """Check ``setup`` (the parsed ``setup.json``) against :data:`SETUP_FIELDS` and its ``config``
    against :class:`~hespotex.models.ModelConfig`; raise :class:`ModelFolderError` (a ``ValueError``)
    naming the first problem."""
    from hespotex.models import ModelConfig

    if not isinstance(setup, dict):
        msg = (
            f"The model folder {str(path)!r} is corrupt (setup.json holds a JSON {type(setup).__name__}, not an "
            "object); save the model again."
        )
        raise ModelFolderError(msg)
    if setup.get("format_version") != FORMAT_VERSION:
        msg = (
            f"Unsupported model format {setup.get('format_version')!r} in {str(path)!r}; this hespotex reads "
            f"format {FORMAT_VERSION}."
        )
        raise ModelFolderError(msg)
    for name, field in SETUP_FIELDS.items():
        if name not in setup:
            if field.required:
                msg = (
                    f"The model folder {str(path)!r} cannot be read by this hespotex ({name}); it is partial, or was "
                    f"written by another version or tool: setup.json lacks {name!r} ({field.what}). Save the "
                    "model again."
                )
                raise ModelFolderError(msg)
            continue
        value = setup[name]
        problem = None if _is_type(value, field.types) else field.what
        if problem is None and field.check is not None:
            problem = field.check(value)
        if problem is not None:
            raise _refuse(
                path,
                f"setup.json's {name!r} should be {problem}, found {_short(value)}. The file was edited or "
                "damaged; save the model again.",
            )
    unknown = sorted(set(setup) - set(SETUP_FIELDS))
    if unknown:
        raise _refuse(
            path,
            f"setup.json has fields this hespotex does not know, {unknown}: it was written by a newer version "
            "or another tool. Upgrade hespotex.",
        )
    if gene_hash(setup["genes"]) != setup["gene_hash"]:
        raise _refuse(
            path,
            f"its {len(setup['genes'])} gene names do not match the gene_hash {setup['gene_hash']!r} recorded "
            "with them "
            "(setup.json was edited?), so predictions would be labelled with the wrong genes. Restore the "
            "original setup.json.",
        )
    types = _config_types()
    for key, value in setup["config"].items():
        if key not in types:
            raise _refuse(
                path,
                f"its config has the unknown field {key!r}; known fields are {sorted(types)}. It was written "
                "by another version.",
            )
        accepted, what = types[key]
        if not _is_type(value, accepted) or (_number(value) and not math.isfinite(value)):
            raise _refuse(path, f"config field {key!r} should be {what}, found {_short(value)}. Save the model again.")
    try:
        ModelConfig.from_dict(setup["config"])
    except (ValueError, TypeError) as err:
        raise _refuse(path, f"its config is invalid ({err}). Save the model again.") from err


def _short(value: Any) -> str:
    text = repr(value)
    return f"{text[:80]}... ({type(value).__name__})" if len(text) > 80 else f"{text} ({type(value).__name__})"


# ---------------------------------------------------------------------------------------------- weights
def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (without reading its data) and the offset where data starts."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
            msg = (
                f"The model folder {str(file.parent)!r} is corrupt ({file.name} has no valid safetensors header); "
                "save the model again."
            )
            raise ModelFolderError(msg)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = (
            f"The model folder {str(file.parent)!r} is corrupt ({file.name}'s header is not JSON: {err}); save the "
            "model again."
        )
        raise ModelFolderError(msg) from err
    if not isinstance(header, dict):
        msg = (
            f"The model folder {str(file.parent)!r} is corrupt ({file.name}'s header is not an object); save the "
            "model again."
        )
        raise ModelFolderError(msg)
    return header, 8 + n


def meta_network(setup: dict[str, Any]) -> Any:
    """The network the model ``setup`` describes, built on torch's ``meta`` device (shapes only: no memory is
    allocated and nothing initialised, whatever the sizes)."""
    import torch

    from hespotex.models import HESpotExNet

    with torch.device("meta"):
        return HESpotExNet(len(setup["genes"]), setup["embedding_dim"], setup["config"])


def expected_tensors(setup: dict[str, Any], net: Any = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` of every tensor the model ``setup`` describes, from its
    network on torch's ``meta`` device (``net``, default: :func:`meta_network`)."""
    import torch

    dtypes = {
        torch.float32: "F32",
        torch.float64: "F64",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.bool: "BOOL",
    }
    net = meta_network(setup) if net is None else net
    out = {f"net.{k}": (dtypes.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in net.state_dict().items()}
    out["setup.embedding_mean"] = ("F32", (setup["embedding_dim"],))
    out["setup.embedding_scale"] = ("F32", (setup["embedding_dim"],))
    return out


_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_header(header: dict[str, Any], data_start: int, file: Path, setup: dict[str, Any], net: Any = None) -> None:
    """Refuse weights whose header does not list exactly the tensors (dtype and shape) the setup describes
    (those of ``net``, its network on the ``meta`` device, default: built here), or whose byte ranges do not
    cover the file: nothing is read or allocated before this passes."""
    path = file.parent
    meta = header.get("__metadata__") or {}
    if isinstance(meta, dict) and "gene_hash" in meta and meta["gene_hash"] != setup["gene_hash"]:
        raise _refuse(
            path,
            f"the weights were saved for the gene list {meta['gene_hash']!r}, setup.json describes "
            f"{setup['gene_hash']!r}. Restore the original setup.json.",
        )
    found = {k: v for k, v in header.items() if k != "__metadata__"}
    expected = expected_tensors(setup, net)
    problems = [f"{k} missing" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    for k in (k for k in expected if k in found):
        entry = found[k]
        got = (entry.get("dtype"), tuple(entry.get("shape", ()))) if isinstance(entry, dict) else (None, None)
        if got != expected[k]:
            problems.append(
                f"{k} is {got[0]} {list(got[1] or [])} in the weights, {expected[k][0]} {list(expected[k][1])} "
                "in setup.json"
            )
    if problems:
        msg = (
            f"The weights in {str(path)!r} do not fit the model its setup describes ({len(problems)} problems: "
            f"{'; '.join(problems[:4])}); the folder is corrupt, partial or edited. Save the model again."
        )
        raise ModelFolderError(msg)
    end = 0
    for k, entry in found.items():
        begin, stop = entry.get("data_offsets", (0, -1))
        if stop - begin != math.prod(expected[k][1]) * _ITEM_BYTES[expected[k][0]]:
            raise _refuse(
                path, f"{file.name} is corrupt (the byte range of {k} does not fit its shape); save the model again."
            )
        end = max(end, stop)
    if data_start + end != file.stat().st_size:
        raise _refuse(
            path,
            f"{file.name} is corrupt ({data_start + end} bytes described, {file.stat().st_size} found: "
            "truncated or padded); save the model again.",
        )


def read_weights(file: Path) -> dict[str, Any]:
    """All tensors of ``file``, read into memory (not memory-mapped), each checked to be finite; the
    embedding scale must also be positive."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = file.parent
    try:
        data = file.read_bytes()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            tensors = load(data)
    except (SafetensorError, OSError) as err:
        msg = f"The model folder {str(path)!r} is corrupt ({err}); save the model again."
        raise ModelFolderError(msg) from err
    del data
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise _refuse(
            path,
            f"{len(bad)} weight tensors hold NaN or infinite values ({bad[:5]}); every prediction would be "
            "NaN. Retrain or restore the model.",
        )
    scale = tensors["setup.embedding_scale"].numpy()
    if not (scale > 0).all():
        raise _refuse(
            path,
            f"its embedding scale has {int((scale <= 0).sum())} zero or negative values; standardised "
            "embeddings would be infinite. Retrain or restore the model.",
        )
    return tensors


def load_checked(path: Path, weights_file: str, setup_file: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``(setup, tensors, net)`` of the model folder ``path``, after every check of this module; ``net`` is the
    network the setup describes, on torch's ``meta`` device (checked against the header, not yet allocated:
    :func:`materialise` it)."""
    try:
        setup = json.loads((path / setup_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        msg = f"The model folder {str(path)!r} is corrupt ({err}); save the model again."
        raise ModelFolderError(msg) from err
    if isinstance(setup, dict) and isinstance(setup.get("config"), dict):  # saved before a field existed
        from hespotex.models._config import LEGACY_FIELDS

        setup["config"] = {**LEGACY_FIELDS, **setup["config"]}
    validate_setup(setup, path)
    file = path / weights_file
    header, start = read_header(file)
    net = meta_network(setup)
    check_header(header, start, file, setup, net)
    tensors = read_weights(file)
    return setup, tensors, net


def materialise(net: Any, setup: dict[str, Any]) -> Any:
    """The ``meta`` network ``net`` given (uninitialised) CPU memory, to be filled by ``load_state_dict(strict=True)``:
    the network is built once, and no random initialisation is spent on weights about to be replaced.

    Only when every parameter and buffer of ``net`` is in its state dict (so the strict load fills all of
    them); otherwise (a non-persistent buffer, which the weights do not hold) the network is built anew.
    """
    from itertools import chain

    from hespotex.models import HESpotExNet

    saved = set(net.state_dict())
    if all(name in saved for name, _ in chain(net.named_parameters(), net.named_buffers())):
        return net.to_empty(device="cpu")
    return HESpotExNet(len(setup["genes"]), setup["embedding_dim"], setup["config"])


def as_array(tensor: Any) -> np.ndarray:
    """A writable numpy copy of a CPU tensor (not a view of the file's bytes)."""
    return np.array(tensor.numpy(), copy=True)


def versions() -> dict[str, str]:
    """Versions of hespotex and its model libraries, recorded in ``setup.json``."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("hespotex", "torch", "torch-geometric", "timm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def json_default(value: Any) -> Any:
    """JSON form of the numpy values in a setup record."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    msg = f"Cannot store {type(value).__name__} in setup.json."
    raise TypeError(msg)
