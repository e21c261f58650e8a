"""Safe checkpoint loading.

The authors' training script pickles ``{"model", "optimizer", "lr_scheduler",
"epoch", "max_accuracy", "config"}`` with ``config`` a ``yacs.config.CfgNode``.
``torch.load(weights_only=True)`` refuses that class and ``weights_only=False``
would execute whatever the pickle names (and needs yacs). We use PyTorch's
restricted unpickler and allow-list an inert stand-in under yacs' class name: the
config comes back as a plain dict, nothing from the file runs, and any other
global the pickle asks for is refused.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..inputs import InputError
from .registry import VARIANTS, Variant


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


class _InertConfig(dict):
    """Stands in for ``yacs.config.CfgNode``: a dict that keeps its items as data and runs nothing."""

    def __setstate__(self, state):  # pickle BUILD hands over the CfgNode's __dict__: keep it as data only
        if isinstance(state, dict):
            self.__dict__["_state"] = state


# The only globals a checkpoint may name. Each rebuilds data (tensors, containers,
# dtypes, scalars); none can run code chosen by the file. Typed storages
# (``torch.FloatStorage`` ...) are resolved by torch.load itself before this list.
_ALLOWED_GLOBALS = {
    "collections.OrderedDict",
    "collections.defaultdict",
    "builtins.set",
    "builtins.frozenset",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.Size",
    "torch.device",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
}
_INERT_GLOBALS = {"yacs.config.CfgNode": _InertConfig}


def _resolve_allowed(module: str, name: str):
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
    full = f"{module}.{name}"
    if full in _INERT_GLOBALS:
        return _INERT_GLOBALS[full]
    is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
    is_numpy_dtype_class = module == "numpy.dtypes" and name.endswith("DType")
    if full not in _ALLOWED_GLOBALS and not is_dtype and not is_numpy_dtype_class:
        raise pickle.UnpicklingError(f"unsupported GLOBAL {full}")
    import importlib

    return getattr(importlib.import_module(module), name)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _resolve_allowed(module, name)


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an Unpickler whose globals come from the allow-list."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "cloformer_deploy.restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


# wrappers that hold the state dict, tried in this order
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "model_ema", "state_dict_ema")
# prefixes added by DistributedDataParallel, torch.compile and some trainers
_PREFIXES = ("module.", "_orig_mod.", "model.")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the model weights from a checkpoint file without executing code from it.

    Accepts the authors' training checkpoints, bare state dicts, ``state_dict``/
    ``model`` wrappers, DistributedDataParallel's ``module.`` prefixes and
    ``.safetensors`` files. Returns a flat ``{key: tensor}`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass the path of a .pth/.pt/.safetensors file")
    if path.suffix == ".safetensors":
        obj = _load_safetensors(path)
    else:
        obj = _load_pickle(path)
    return _extract_state_dict(obj, path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path.name} is not a readable safetensors file ({_first_line(e)}); "
            "it may be truncated: download or copy it again"
        ) from None


def _load_pickle(path: Path):
    try:
        # weights_only=False only because torch.load accepts a pickle_module only then;
        # the restricted unpickler is the guard, stricter than weights_only's own list
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused:
            raise CheckpointError(
                f"{path.name} asks to run {refused!r}, which is not on the allow-list of a weights file; "
                "nothing was executed. Re-save the weights with torch.save(model.state_dict(), ...) "
                "or convert them to .safetensors"
            ) from None
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint ({_first_line(e)}); "
            "it may be truncated or corrupt: download or copy it again"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path.name} is not a readable PyTorch checkpoint ({_first_line(e)}); "
            "it may be truncated or corrupt: download or copy it again"
        ) from None


def _refused_global(message: str) -> str | None:
    """The global a refused pickle asked for, from PyTorch's restricted-unpickler message."""
    m = re.search(r"unsupported GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def _first_line(e: BaseException) -> str:
    if "central directory" in str(e) or "zip archive" in str(e):
        return "its zip archive is incomplete"
    text = str(e).strip().splitlines()
    return text[0][:160] if text else type(e).__name__


def _extract_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # wrappers may nest, e.g. {"state_dict": {"model": ...}}
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise CheckpointError(
            f"{path.name} holds no state dict (found {type(obj).__name__} with keys "
            f"{list(obj)[:5] if isinstance(obj, Mapping) else '-'}); "
            "pass a file saved from model.state_dict() or the authors' training script"
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _is_tensor_dict(obj: Mapping) -> bool:
    return (
        bool(obj)
        and all(isinstance(k, str) for k in obj)
        and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)
    )


# --- fitting a state dict to a model -------------------------------------------------------------


def _shape_signature(variant: Variant) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = variant.build(num_classes=1000)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("head.")}


def guess_variant(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The variant whose backbone keys and shapes the state dict fits, or None."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith("head.")}
    for name, variant in VARIANTS.items():
        if _shape_signature(variant) == shapes:
            return name
    return None


def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    w = state_dict.get("head.weight")
    return int(w.shape[0]) if w is not None else None


def apply_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], variant: str, source: str = "checkpoint"
) -> None:
    """``load_state_dict(strict=True)`` with errors that say what does not fit and what to do."""
    expected = model.state_dict()
    if getattr(model, "features_only", False):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "norm."))}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state_dict, strict=True)
        return
    fits = guess_variant(state_dict)
    if fits and fits != variant:
        raise CheckpointError(f"{source} is a {fits} checkpoint, not {variant}; use --model {fits.replace('_', '-')}")
    head_only = set(missing + unexpected + mismatched) <= {"head.weight", "head.bias"}
    if head_only and "head.weight" in state_dict:
        n = num_classes_of(state_dict)
        raise CheckpointError(
            f"{source} has a {n}-class head but the model was built with "
            f"{expected['head.weight'].shape[0]} classes; pass --num-classes {n}"
        )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        parts.append(
            f"{len(mismatched)} keys of another shape (e.g. {k}: {tuple(state_dict[k].shape)} "
            f"vs {tuple(expected[k].shape)})"
        )
    raise CheckpointError(
        f"{source} does not fit {variant}: {'; '.join(parts)}. "
        "It was not saved from this architecture; check --model and the file"
    )
