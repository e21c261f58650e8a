"""Peer models for the benchmark: the mobile backbones people pick instead of CloFormer, and their published accuracy.

A peer is a timm model (random weights: latency does not depend on them) exported through the same
backends as CloFormer, or another size of this project's own family, exported in its deploy form.
Accuracy is never measured here: it comes from ``data/published_top1.json``, each number with its source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from ..inputs import InputError, comma_list

# mobile backbones a user weighs against CloFormer; all export to ONNX and lower to XNNPACK on the pinned stack
DEFAULT_PEERS = (
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "efficientformerv2_s0",
    "fastvit_t8",
    "repvit_m0_9",
    "mobileone_s0",
    "efficientvit_b0",
    "mobilevitv2_050",
)
# the project's own sizes shown beside the peers (the benchmarked model itself is left out of its own list)
FAMILY = ("cloformer_xxs", "cloformer_xs", "cloformer_s", "fat_b0", "fat_b1")


class PeerError(InputError):
    pass


@dataclass(frozen=True)
class Peer:
    name: str
    source: str  # "timm" or "cloformer-deploy"

    @property
    def published(self) -> dict | None:
        return published_top1().get(self.name)


@lru_cache(maxsize=1)
def published_top1() -> dict[str, dict]:
    """Model name -> {top1, eval_size, source_kind, source, ...}: published figures, copied with provenance."""
    text = resources.files("cloformer_deploy").joinpath("data/published_top1.json").read_text()
    return json.loads(text)["models"]


def resolve_peers(baselines: bool, peers, model: str) -> list[Peer]:
    """The peers of one run: ``--baselines`` (the defaults and the family) and/or ``--peers`` names, in order.

    Checked before any work: a name that is neither a timm model nor one of this project's variants
    is refused with the closest names.
    """
    from ..models import get_variant, list_models

    names: list[str] = []
    if baselines:
        names += [*DEFAULT_PEERS, *FAMILY]
    if peers is not None:
        names += comma_list("--peers", peers, "mobilenetv3_large_100,fastvit_t8")
    out: list[Peer] = []
    own = get_variant(model).name
    project = set(list_models())
    timm_names = None
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if name in project or name.replace("_", "") in {p.replace("_", "") for p in project}:
            name = get_variant(name).name
            peer = Peer(name, "cloformer-deploy")
        else:
            if timm_names is None:
                timm_names = _timm_models()
            if name not in timm_names:
                import difflib

                # names that continue what was typed first (shortest first), then look-alikes
                close = sorted((n for n in timm_names if n.startswith(name)), key=lambda n: (len(n), n))[:3]
                close = close or difflib.get_close_matches(name, timm_names, n=3, cutoff=0.6)
                hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
                raise PeerError(f"--peers: {raw!r} is neither a timm model nor a model of this project; {hint}")
            peer = Peer(name, "timm")
        if peer.name != own and peer not in out:
            out.append(peer)
    return out


def _timm_models() -> set[str]:
    try:
        import timm
    except ImportError:
        raise PeerError("--baselines/--peers need timm: pip install 'cloformer-deploy[peers]'") from None
    return set(timm.list_models())


def build_timm_peer(name: str, num_classes: int = 1000):
    """The timm model in eval mode with random weights, reparameterized where timm can fuse its branches
    (MobileOne, FastViT, RepViT: the form the authors time and deploy)."""
    import timm
    import torch
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    return reparameterize_model(model)
