"""The model an export starts from: the authors' form with its weights, its labels, and what identifies them."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..files import git_commit, sha256_file
from ..formats import BACKENDS
from ..inputs import existing_file
from ..models import apply_state_dict, get_variant, load_checkpoint
from ..models.checkpoint import num_classes_of
from .bundle import state_sha256
from .options import ExportInputError

RANDOM_SEED = 0  # random weights are drawn with this seed, so a bundle of random weights can be re-validated


@dataclass
class PreparedModel:
    """The authors' form with its weights, and what identifies those weights."""

    variant: object
    module: torch.nn.Module
    weights_sha256: str | None  # of the checkpoint file; None for random weights
    state_sha256: str  # of the weights themselves

    @property
    def random_init(self) -> bool:
        return self.weights_sha256 is None


def prepare_model(model: str, weights: str | Path | None, num_classes: int | None) -> PreparedModel:
    """The authors' form with weights loaded (or random ones drawn with :data:`RANDOM_SEED`)."""
    variant = get_variant(model)
    state = sha = None
    if weights is not None:
        state = load_checkpoint(existing_file("--weights", weights, "a .pth/.pt/.safetensors checkpoint"))
        sha = sha256_file(Path(weights))
        if num_classes is None:
            num_classes = num_classes_of(state) or 1000
    num_classes = 1000 if num_classes is None else num_classes
    with torch.random.fork_rng():  # random weights are the same in every run, so reference runs repeat
        torch.manual_seed(RANDOM_SEED)
        net = variant.build(num_classes=num_classes).eval()
    if state is not None:
        apply_state_dict(net, state, variant.name, source=Path(weights).name)
    return PreparedModel(variant, net, sha, state_sha256(net.state_dict()))


def imagenet_labels() -> list[str]:
    text = resources.files("cloformer_deploy").joinpath("data/imagenet1k_labels.txt").read_text()
    return text.splitlines()


def read_labels(path: str | Path, num_classes: int) -> list[str]:
    p = existing_file("--labels", path, "a text file with one class name per line")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ExportInputError(
            f"--labels {str(p)!r} is not text; pass a text file with one class name per line"
        ) from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if len(labels) != num_classes:
        raise ExportInputError(
            f"--labels has {len(labels)} names but the model has {num_classes} classes; give one name per class"
        )
    return unique_labels(labels)


def unique_labels(labels: list[str]) -> list[str]:
    """Core ML classifiers key scores by label, so repeated names get their class index appended."""
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [f"{lab} ({i})" if seen[lab] > 1 else lab for i, lab in enumerate(labels)]


def labels_for(path: str | Path | None, num_classes: int) -> list[str]:
    """The class names of the bundle: a --labels file, ImageNet-1k's for 1000 classes, else the class indices."""
    if path is not None:
        return read_labels(path, num_classes)
    if num_classes == 1000:
        return imagenet_labels()
    return [str(i) for i in range(num_classes)]


def layer_sensitivity(deploy: torch.nn.Module, calibration: np.ndarray, limit: int = 8, on_progress=None) -> list[dict]:
    """How much int8 weights in each single layer move the logits (1 - cosine), worst first.

    Each convolution or linear layer in turn gets its weights rounded to int8 (per output
    channel, symmetric) while every other layer stays fp32; measured on calibration images.
    """
    import copy

    x = torch.from_numpy(calibration[:limit])
    model = copy.deepcopy(deploy).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        ref = model(x).flatten(1).double()
        out = []
        for i, (name, mod) in enumerate(layers):
            w = mod.weight.data
            scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
            shape = (-1,) + (1,) * (w.ndim - 1)
            q = (w / scale.reshape(shape)).round().clamp(-127, 127) * scale.reshape(shape)
            mod.weight.data = q
            y = model(x).flatten(1).double()
            mod.weight.data = w
            cos = torch.nn.functional.cosine_similarity(y, ref, dim=1).min().item()
            out.append({"layer": name, "drift": float(f"{1 - cos:.3g}")})
            if on_progress is not None:
                on_progress(f"{i + 1}/{len(layers)} layers")
    return sorted(out, key=lambda d: -d["drift"])


def quantisable_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.modules())


def versions() -> dict[str, str | None]:
    v: dict[str, str | None] = {
        "cloformer_deploy": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for backend in BACKENDS.values():
        try:
            v.update(backend.versions())
        except Exception:  # a broken optional runtime must not stop the manifest
            pass
    v["git_commit"] = git_commit()
    return v


def reference_outputs(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """PyTorch fp32 outputs of ``module`` on ``images``, one image per forward pass: the memory it takes is
    one image's, which is what the size check before any work measured, however many images there are."""
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(images[i : i + 1])).numpy() for i in range(len(images))])


def reference_module(variant, num_classes: int, state_sha256: str, files: dict) -> torch.nn.Module:
    """The authors' form of ``variant`` with the weights in ``files["weights"]`` (random ones, drawn as an export
    draws them, without it): what an evaluation's workers build, on this machine or a cluster's node. The variant
    travels whole, so that one registered by the caller's program alone is known to its workers too; the weights
    built must be the bundle's (``state_sha256``), or the figures would be another model's."""
    from ..models.registry import VARIANTS

    VARIANTS.setdefault(variant.name, variant)
    prepared = prepare_model(variant.name, files.get("weights"), num_classes)
    if prepared.state_sha256 != state_sha256:
        raise RuntimeError(
            f"the weights built here differ from the bundle's (torch {torch.__version__} draws or loads others); "
            "install the same torch as the driver"
        )
    return prepared.module
